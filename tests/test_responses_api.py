"""OpenAI's Responses API (issue 29, section 1) with the official client, against ``llamagen serve``
running SmolLM2 with llamagen's tool-capable ChatML template: text, streamed events, function
calls and their outputs, ``text.format`` JSON schemas, ``previous_response_id``, input token
counts, stored responses, and errors in the API's shape."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from server_util import serving

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from tool_calls import CALL_BIAS, WEATHER  # noqa: E402

TEMPLATE = (ROOT / "examples" / "chatml-tools.jinja").read_text()
# Responses' function tools are flat: {"type": "function", "name", "parameters", ...}
TOOL = {"type": "function", **WEATHER["function"]}
BIAS = {str(k): v for k, v in CALL_BIAS.items()}      # (SmolLM2 does not call tools unprompted)


@pytest.fixture(scope="module")
def srv(smollm2_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("tmpl") / "tools.jinja"
    path.write_text(TEMPLATE)
    yield from serving(tmp_path_factory, "responses", smollm2_path, "--ctx-size", 4096,
                       "--parallel", 2, "--chat-template-file", path)


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_text_response_and_its_usage(client, srv):
    r = client.responses.create(model="m", instructions="Answer briefly.",
                                input="What is the capital of France?", max_output_tokens=12,
                                temperature=0)
    assert r.id.startswith("resp_") and r.object == "response"
    assert r.status in ("completed", "incomplete")
    [msg] = r.output
    assert msg.type == "message" and msg.id.startswith("msg_") and msg.role == "assistant"
    assert r.output_text and r.output_text == msg.content[0].text
    assert r.usage.input_tokens > 10 and 0 < r.usage.output_tokens <= 12
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    # the same text as chat completions with the same messages
    chat = client.chat.completions.create(
        model="m", messages=[{"role": "system", "content": "Answer briefly."},
                             {"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12, temperature=0)
    assert r.output_text == chat.choices[0].message.content
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"


def test_streamed_events_as_the_sdk_parses_them(client):
    kw = dict(model="m", input=[{"role": "user", "content": "Name three colors."}],
              max_output_tokens=16, temperature=0)
    plain = client.responses.create(**kw)
    types, text = [], ""
    with client.responses.stream(**kw) as stream:
        for ev in stream:
            types.append(ev.type)
            if ev.type == "response.output_text.delta":
                text += ev.delta
        final = stream.get_final_response()
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete")
    for t in ("response.output_item.added", "response.content_part.added",
              "response.output_text.done", "response.content_part.done",
              "response.output_item.done"):
        assert types.count(t) == 1, t
    assert text == final.output_text == plain.output_text
    assert final.usage.output_tokens == plain.usage.output_tokens


def test_sequence_numbers_and_item_ids_on_the_wire(srv):
    body = {"input": "Hi", "max_output_tokens": 4, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/responses", json=body, timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    item = next(e for e in events if e["type"] == "response.output_item.added")["item"]
    assert all(e["item_id"] == item["id"] for e in events if "item_id" in e)


# bench/tool_calls.py's conversation (one earlier call and its result, then a question), as
# Responses items: the earlier call is a function_call item, its result a function_call_output
HISTORY = [
    {"role": "user", "content": "What is the weather in Rome?"},
    {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\": \"Rome\"}"},
    {"type": "function_call_output", "call_id": "c1", "output": "sunny, 25 C"},
    {"role": "assistant", "content": [{"type": "output_text", "text": "It is sunny in Rome, 25 C."}]},
    {"role": "user", "content": "What is the weather in Paris?"},
]


def test_function_call_streamed_and_not(client):
    kw = dict(model="m", input=HISTORY, tools=[TOOL], tool_choice="required", temperature=0,
              max_output_tokens=120, extra_body={"logit_bias": BIAS})
    r = client.responses.create(**kw)
    assert r.status == "completed", r.output
    calls = [o for o in r.output if o.type == "function_call"]
    assert [c.name for c in calls] == ["get_weather"]
    args = json.loads(calls[0].arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    assert calls[0].call_id and calls[0].id.startswith("fc_")
    # streamed: the same call, its arguments in deltas
    events, pieces = [], ""
    with client.responses.stream(**kw) as stream:
        for ev in stream:
            events.append(ev.type)
            if ev.type == "response.function_call_arguments.delta":
                pieces += ev.delta
        final = stream.get_final_response()
    [fc] = [o for o in final.output if o.type == "function_call"]
    assert "response.function_call_arguments.done" in events
    assert json.loads(pieces) == json.loads(fc.arguments) == args
    assert fc.call_id != calls[0].call_id
    # the same conversation through chat completions gives the same call
    from tool_calls import CONVERSATION
    chat = client.chat.completions.create(model="m", messages=CONVERSATION, tools=[WEATHER],
                                          tool_choice="required", temperature=0, max_tokens=120,
                                          logit_bias=BIAS)
    assert json.loads(chat.choices[0].message.tool_calls[0].function.arguments) == args


def test_function_call_output_gets_a_text_answer(client):
    r = client.responses.create(model="m", tools=[TOOL], temperature=0, max_output_tokens=24,
                                input=HISTORY[:3])
    assert r.output_text and not [o for o in r.output if o.type == "function_call"]


def test_previous_response_id_continues_the_conversation(client, srv):
    first = client.responses.create(model="m", input="My name is Ada. Say OK.", temperature=0,
                                    max_output_tokens=8)
    second = client.responses.create(model="m", previous_response_id=first.id,
                                     input="What is my name?", temperature=0, max_output_tokens=16)
    # the server rendered both turns: the prompt is longer than the question alone
    alone = client.responses.input_tokens.count(model="m", input="What is my name?") \
        if hasattr(client.responses, "input_tokens") else None
    n_alone = alone.input_tokens if alone is not None else httpx.post(
        srv.url + "/v1/responses/input_tokens", json={"input": "What is my name?"}).json()["input_tokens"]
    assert second.usage.input_tokens > n_alone + first.usage.output_tokens
    # stored: readable, deletable; then unknown
    assert client.responses.retrieve(first.id).output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="m", previous_response_id=first.id, input="again")
    assert e.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    # store: false keeps nothing
    r = client.responses.create(model="m", input="Hi", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_text_format_json_schema(client):
    schema = {"type": "object", "properties": {"city": {"type": "string"},
                                               "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    r = client.responses.create(model="m", input="Give a city and its population as JSON.",
                                text={"format": {"type": "json_schema", "name": "city",
                                                 "schema": schema, "strict": True}},
                                temperature=0, max_output_tokens=60)
    jsonschema.validate(json.loads(r.output_text), schema)


@pytest.mark.parametrize("body, param", [
    ({"input": []}, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input[0].content[0].type"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"input": "x", "max_output_tokens": -1}, "max_output_tokens"),
    ({"input": "x", "temperature": "hot"}, "temperature"),
    ({"input": "x", "previous_response_id": "resp_nope"}, "previous_response_id"),
])
def test_bad_requests_are_400_in_the_api_shape(srv, body, param):
    r = httpx.post(srv.url + "/v1/responses", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


# -- the clients that default to the Responses API ---------------------------------------------------

HELLO = dict(instructions="You are a helpful assistant.", input="Say hello.")


def _direct(client, **kw):
    return client.responses.create(model="m", temperature=0, max_output_tokens=80, **kw)


def test_openai_agents_sdk(srv, client):
    from agents import (Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool,
                        set_tracing_disabled)
    from openai import AsyncOpenAI
    set_tracing_disabled(True)
    model = OpenAIResponsesModel(model="m", openai_client=AsyncOpenAI(base_url=srv.url + "/v1",
                                                                      api_key="none"))
    agent = Agent(name="a", instructions=HELLO["instructions"], model=model,
                  model_settings=ModelSettings(max_tokens=80, temperature=0))
    assert Runner.run_sync(agent, HELLO["input"]).final_output == _direct(client, **HELLO).output_text

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city"""
        return f"sunny in {city}"
    agent = Agent(name="w", model=model, tools=[get_weather], tool_use_behavior="stop_on_first_tool",
                  model_settings=ModelSettings(max_tokens=120, temperature=0, tool_choice="required",
                                               extra_body={"logit_bias": BIAS}))
    assert Runner.run_sync(agent, HISTORY).final_output == "sunny in Paris"


def test_pydantic_ai_responses_model(srv, client):
    from pydantic import BaseModel
    from pydantic_ai import Agent, NativeOutput
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider
    model = OpenAIResponsesModel("m", provider=OpenAIProvider(base_url=srv.url + "/v1", api_key="none"))
    settings = {"max_tokens": 80, "temperature": 0}
    out = Agent(model, instructions=HELLO["instructions"]).run_sync(HELLO["input"],
                                                                   model_settings=settings).output
    assert out == _direct(client, **HELLO).output_text

    class City(BaseModel):          # NativeOutput: the schema goes as text.format
        city: str
        population: int
    city = Agent(model, output_type=NativeOutput(City)).run_sync(
        "Give a city and its population.", model_settings=settings).output
    assert isinstance(city, City) and city.city


def test_langchain_chat_openai_with_use_responses_api(srv, client):
    from langchain_openai import ChatOpenAI
    lc = ChatOpenAI(base_url=srv.url + "/v1", api_key="none", model="m", use_responses_api=True,
                    max_tokens=80, temperature=0)
    msg = lc.invoke("Say hello.")
    assert msg.text and msg.text == _direct(client, input="Say hello.").output_text
