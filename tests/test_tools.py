"""Tool calling: the chat template renders the tools, llama.cpp's grammar for the template's
tool-call syntax keeps calls well-formed, and its parser reads them (llamagen.tools; the
servers' ``tools`` on /v1/chat/completions and /v1/messages), checked against llama-server.

Neither real model's own template has a tool syntax (SmolLM2's is plain ChatML: llama.cpp then
renders no tools, as llama-server does), so the tests pass llamagen's tool-capable ChatML template
(examples/chatml-tools.jinja) with ``template=`` / ``--chat-template-file``.  The tiny model's variant
makes the call tags single control tokens: the trigger is then a token and the tags reach the
text only as preserved tokens.  The 135M model does not call tools on its own: a logit bias on
the tag's tokens starts the calls; everything after the tag is the grammar's work.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anthropic
import httpx
import jsonschema
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

import llamagen
from llamagen import tools as lt
from llamagen.errors import GrammarError

from server_util import serving

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
# the tool, the conversation (one earlier call and its result, then the question) and the bias
# are bench/tool_calls.py's, which measures this path
from tool_calls import CALL_BIAS, CONVERSATION, WEATHER  # noqa: E402

# examples/chatml-tools.jinja: ChatML with the tools listed in the system turn and calls as
# <tool_call>\n{json}\n</tool_call>: "<tool_call>\n" is a text trigger; the tight variant writes
# "<tool_call>{", so the tag token alone triggers
TEMPLATE = (ROOT / "examples" / "chatml-tools.jinja").read_text()
TIGHT_TEMPLATE = TEMPLATE.replace("<tool_call>\n", "<tool_call>").replace("\n</tool_call>", "</tool_call>")
assert TIGHT_TEMPLATE.count("<tool_call>{") == 1

TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}
# the tiny model's arguments come from a random model: an enum keeps them short
WEATHER_ENUM = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"enum": ["Paris", "Rome"]}}, "required": ["city"], "additionalProperties": False}}}

# SmolLM2's tokens of "<tool_call>" are <, tool, _, call, >: pushing three starts a call
SMOL_BIAS = {str(k): v for k, v in CALL_BIAS.items()}


def _without_ids(message):
    return {**message, "tool_calls": [{k: v for k, v in c.items() if k != "id"}
                                      for c in message.get("tool_calls") or ()]}


def _calls(message):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in message.get("tool_calls") or ()]


def _opened(path, n_ctx):
    with llamagen.Model(path) as m, llamagen.Context(m, n_ctx=n_ctx) as ctx:
        yield m, ctx


@pytest.fixture(scope="module")
def smol_pair(smollm2_path):
    yield from _opened(smollm2_path, 2048)


@pytest.fixture(scope="module")
def tool_pair(make_tiny_model):
    yield from _opened(make_tiny_model(control_tokens=("<tool_call>", "</tool_call>")), 1024)


# -- rendering --------------------------------------------------------------------------------

def test_a_template_without_tool_syntax_renders_no_tools(smol_pair):
    smol = smol_pair[0]
    # llama-server's behaviour: SmolLM2's ChatML has no place for tools, so none are rendered,
    # no grammar is made, and the reply is plain content
    chat = lt.prepare(smol, [{"role": "user", "content": "Hi"}], tools=[WEATHER])
    assert chat.prompt == smol.render_chat([{"role": "user", "content": "Hi"}])
    assert "grammar" not in chat.sampling
    assert chat.parse("Hello there") == {"role": "assistant", "content": "Hello there"}


def test_tool_choices_give_what_llama_server_gives(smol_pair):
    smol = smol_pair[0]
    msgs = [{"role": "user", "content": "Hi"}]
    auto = lt.prepare(smol, msgs, tools=[WEATHER, TIME], template=TEMPLATE)
    assert '"name": "get_weather"' in auto.prompt and '"name": "get_time"' in auto.prompt
    s = auto.sampling
    # lazy: free text until the model writes the tag, then the call's grammar
    assert s["grammar_lazy"] and s["grammar_triggers"] == ("<tool_call>\n",)
    assert "get-weather" in s["grammar"] and "get-time" in s["grammar"]
    assert "grammar_prefill" not in s
    req = lt.prepare(smol, msgs, tools=[WEATHER, TIME], tool_choice="required", template=TEMPLATE).sampling
    # required: the grammar holds from the first token and starts at the generation prompt
    assert "grammar_lazy" not in req
    assert req["grammar_prefill"] == tuple(smol.tokenize("<|im_start|>assistant\n", add_special=False,
                                                         parse_special=True))
    none = lt.prepare(smol, msgs, tools=[WEATHER], tool_choice="none", template=TEMPLATE)
    assert "get_weather" in none.prompt and "grammar" not in none.sampling and not none.tools
    named = lt.prepare(smol, msgs, tools=[WEATHER, TIME], template=TEMPLATE,
                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert "get_weather" not in named.prompt and "get_time" in named.prompt
    assert named.tool_choice == "required" and "get-weather" not in named.sampling["grammar"]


def test_earlier_calls_and_results_are_rendered(smol_pair):
    smol = smol_pair[0]
    chat = lt.prepare(smol, CONVERSATION, tools=[WEATHER], template=TEMPLATE)
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n'
            '</tool_call>\n<|im_end|>') in chat.prompt
    assert "<tool_response>\nsunny, 25 C\n</tool_response>" in chat.prompt


def test_an_earlier_call_with_broken_arguments_is_rendered_not_refused(smol_pair):
    """A small model's own earlier call whose arguments are not JSON, sent back by the agent
    loop: llama.cpp refused the conversation ("Failed to parse tool call arguments"); the
    template now gets the text as a JSON string."""
    smol = smol_pair[0]
    broken = [dict(m) for m in CONVERSATION]
    for i, m in enumerate(broken):
        if m.get("tool_calls"):
            call = dict(m["tool_calls"][0], function={"name": "get_weather",
                                                      "arguments": '{"city": "Rome"'})
            broken[i] = dict(m, tool_calls=[call])
    chat = lt.prepare(smol, broken, tools=[WEATHER], template=TEMPLATE)
    assert '"arguments": "{\\"city\\": \\"Rome\\""' in chat.prompt, chat.prompt
    assert "<tool_response>\nsunny, 25 C\n</tool_response>" in chat.prompt


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"tools": "get_weather"}, TypeError, "tools must be a list"),
    ({"tools": [{"type": "function", "function": {}}]}, ValueError, r"tools\[0\]\['function'\]\['name'\]"),
    ({"tools": [{"type": "retrieval"}]}, ValueError, "only 'function' tools"),
    ({"tools": [WEATHER, WEATHER]}, ValueError, "a second tool named"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, TypeError,
     "must be a JSON schema"),
    ({"tools": [WEATHER], "tool_choice": "always"}, ValueError, "tool_choice must be"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     ValueError, "not among the tools"),
    ({"tool_choice": "required"}, ValueError, "tool_choice needs tools"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, TypeError, "parallel_tool_calls"),
])
def test_bad_tools_are_named(smol_pair, kwargs, exc, match):
    smol = smol_pair[0]
    with pytest.raises(exc, match=match):
        lt.prepare(smol, [{"role": "user", "content": "Hi"}], template=TEMPLATE, **kwargs)


# -- generation -------------------------------------------------------------------------------

@pytest.mark.parametrize("choice", ["auto", "required"])
def test_a_call_is_generated_and_parsed(smol_pair, choice):
    smol, smol_ctx = smol_pair
    chat = lt.prepare(smol, CONVERSATION, tools=[WEATHER], tool_choice=choice, template=TEMPLATE)
    texts = {}
    for impl in ("fast", "llama.cpp"):
        p = chat.params(max_new_tokens=120, temp=0, sampler_impl=impl,
                        logit_bias=CALL_BIAS)
        texts[impl] = llamagen.generate(smol_ctx, chat.prompt, params=p, parse_special=True)
    assert texts["fast"] == texts["llama.cpp"]      # the engines agree under a lazy grammar too
    msg = chat.reply(texts["fast"])
    calls = _calls(msg)
    assert [name for name, _ in calls] == ["get_weather"], texts["fast"]
    jsonschema.validate(calls[0][1], WEATHER["function"]["parameters"])
    assert msg["tool_calls"][0]["id"].startswith("call_")
    assert "<tool_call>" not in (msg["content"] or "")


def test_the_tag_token_triggers_and_shows_as_a_preserved_token(tool_pair):
    tool_model, tool_ctx = tool_pair
    # the tags are control tokens: the trigger is the tag's id, and the tag reaches the text
    # (which the parser needs) only because it is a preserved token
    tag = tool_model.tokenize("<tool_call>", add_special=False, parse_special=True)
    assert len(tag) == 1
    msgs = [{"role": "user", "content": "weather in Paris?"}]
    chat = lt.prepare(tool_model, msgs, tools=[WEATHER_ENUM], template=TIGHT_TEMPLATE)
    assert chat.sampling["grammar_trigger_tokens"] == tuple(tag)
    assert chat.sampling["grammar_triggers"] == ()
    assert set(tag) <= set(chat.sampling["preserved_tokens"])
    p = chat.params(max_new_tokens=300, temp=0, logit_bias={tag[0]: 30.0})
    text = llamagen.generate(tool_ctx, chat.prompt, params=p, parse_special=True)
    assert text.startswith("<tool_call>")
    calls = _calls(chat.reply(text, "length"))
    assert calls and all(name == "get_weather" for name, _ in calls)
    for _, args in calls:
        jsonschema.validate(args, WEATHER_ENUM["function"]["parameters"])
    # without the preserved tokens the tag is a control token with no text: no call to parse
    bare = llamagen.generate(tool_ctx, chat.prompt, params=p.replace(preserved_tokens=()),
                             parse_special=True)
    assert "<tool_call>" not in bare and not _calls(chat.reply(bare, "length"))


def test_stream_deltas_rebuild_the_reply(tool_pair):
    tool_model, tool_ctx = tool_pair
    msgs = [{"role": "user", "content": "weather in Paris?"}]
    chat = lt.prepare(tool_model, msgs, tools=[WEATHER_ENUM], tool_choice="required",
                      template=TIGHT_TEMPLATE)
    tag = tool_model.tokenize("<tool_call>", add_special=False, parse_special=True)[0]
    p = chat.params(max_new_tokens=120, temp=0, logit_bias={tag: 30.0})
    stream = lt.ToolStream(chat)
    st = llamagen.gen_begin(tool_ctx, chat.prompt, params=p, parse_special=True)
    deltas = []
    for piece in st:
        deltas += stream.feed(piece)
    deltas += stream.finish(st.finish_reason)
    text = stream.text
    assert text == llamagen.generate(tool_ctx, chat.prompt, params=p, parse_special=True)
    content, calls = "", {}
    for d in deltas:
        content += d.get("content", "")
        for tc in d.get("tool_calls", ()):
            c = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
            c["id"] = tc.get("id") or c["id"]
            c["name"] = tc["function"].get("name") or c["name"]
            c["arguments"] += tc["function"].get("arguments", "")
    final = stream.message
    # the same message as parsing the whole text at once (the call ids aside: the stream's are
    # the ones it sent)
    assert _without_ids(final) == _without_ids(chat.reply(text, st.finish_reason))
    assert (content or None) == final["content"]
    assert [(c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        (c["id"], c["function"]["name"], c["function"]["arguments"]) for c in final["tool_calls"]]
    assert len(calls) >= 1


def test_a_lazy_grammar_is_free_until_it_wakes(tool_pair):
    tool_model, tool_ctx = tool_pair
    tag = tool_model.tokenize("<tool_call>", add_special=False, parse_special=True)[0]
    base = dict(max_new_tokens=40, temp=1.0, seed=5, grammar="root ::= [a-z]+", ignore_eos=True)
    strict = llamagen.generate(tool_ctx, "x", **base)
    assert strict and all("a" <= ch <= "z" for ch in strict)
    # never triggered (the trigger token is banned): nothing constrains the text
    asleep = llamagen.generate(tool_ctx, "x", **base, grammar_lazy=True, grammar_trigger_tokens=[tag],
                               logit_bias={tag: float("-inf")})
    assert asleep == llamagen.generate(tool_ctx, "x", **{**base, "grammar": None})
    assert any(not "a" <= ch <= "z" for ch in asleep)


@pytest.mark.parametrize("kwargs, match", [
    ({"grammar_lazy": True}, "need a grammar"),
    ({"grammar": "root ::= [a-z]+", "grammar_lazy": True}, "nothing would ever wake it"),
    ({"grammar": "root ::= [a-z]+", "grammar_triggers": ["x"]}, "only apply to a lazy grammar"),
    ({"grammar_prefill": [5]}, "need a grammar"),
    ({"grammar": "root ::= [a-z]+", "grammar_prefill": [-1]}, "token id"),
    ({"grammar": "root ::= [a-z]+", "grammar_lazy": True, "grammar_triggers": [""]}, "non-empty"),
])
def test_tool_sampling_fields_are_checked(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        llamagen.SamplingParams(**kwargs)


def test_what_llama_cpp_refuses_is_a_grammar_error(tool_pair):
    tool_model, tool_ctx = tool_pair
    with pytest.raises(GrammarError, match="trigger patterns"):      # not a regex
        llamagen.generate(tool_ctx, "x", max_new_tokens=2, grammar="root ::= [a-z]+",
                          grammar_lazy=True, grammar_triggers=["(unclosed"])
    b = tool_model.tokenize("B", add_special=False)
    with pytest.raises(GrammarError, match="prefill"):               # the grammar cannot start so
        llamagen.generate(tool_ctx, "x", max_new_tokens=2, grammar="root ::= [a-z]+",
                          grammar_prefill=b)
    with pytest.raises(ValueError, match="not a token id"):
        llamagen.generate(tool_ctx, "x", max_new_tokens=2, grammar="root ::= [a-z]+",
                          grammar_lazy=True, grammar_trigger_tokens=[10 ** 6])
    chat = lt.prepare(tool_model, [{"role": "user", "content": "x"}], tools=[WEATHER_ENUM],
                      template=TIGHT_TEMPLATE)
    with pytest.raises(ValueError, match="cannot be combined with tool calls"):
        chat.params(grammar="root ::= [a-z]+")
    # the context still works afterwards
    assert llamagen.generate(tool_ctx, "x", max_new_tokens=2, ignore_eos=True)


# -- the servers --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tmpl") / "tools.jinja"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def smol_tools(smollm2_path, template_file, tmp_path_factory):
    yield from serving(tmp_path_factory, "smol-tools", smollm2_path, "--ctx-size", 4096, "--parallel", 2,
                       "--threads", 1, "--chat-template-file", template_file)


def _oai(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _ant(srv):
    return anthropic.Anthropic(base_url=srv.url, api_key="none", max_retries=0, timeout=120)


def test_openai_tool_calls_streamed_and_not(smol_tools):
    c = _oai(smol_tools)
    kw = dict(model="m", messages=CONVERSATION, tools=[WEATHER], tool_choice="required", temperature=0,
              max_tokens=120, logit_bias=SMOL_BIAS)
    r = c.chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    calls = [(t.function.name, json.loads(t.function.arguments)) for t in ch.message.tool_calls]
    assert [n for n, _ in calls] == ["get_weather"]
    jsonschema.validate(calls[0][1], WEATHER["function"]["parameters"])
    state = ChatCompletionStreamState()
    for chunk in c.chat.completions.create(**kw, stream=True):
        state.handle_chunk(chunk)
    f = state.get_final_completion().choices[0]
    assert f.finish_reason == "tool_calls"
    assert [(t.function.name, json.loads(t.function.arguments)) for t in f.message.tool_calls] == calls
    assert f.message.tool_calls[0].id and f.message.tool_calls[0].id != ch.message.tool_calls[0].id
    # no tools: the same conversation (earlier calls and results in it) is plain chat
    r = c.chat.completions.create(model="m", messages=CONVERSATION, max_tokens=8, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"


def test_anthropic_tool_use_streamed_and_not(smol_tools):
    c = _ant(smol_tools)
    tools = [{"name": "get_weather", "description": "The weather in a city",
              "input_schema": WEATHER["function"]["parameters"]}]
    msgs = [{"role": "user", "content": "What is the weather in Rome?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                               "input": {"city": "Rome"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                          "content": "sunny, 25 C"}]},
            {"role": "assistant", "content": "It is sunny in Rome, 25 C."},
            {"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model="m", messages=msgs, tools=tools, tool_choice={"type": "any"}, max_tokens=120,
              extra_body={"temperature": 0, "logit_bias": SMOL_BIAS})
    r = c.messages.create(**kw)
    assert r.stop_reason == "tool_use"
    uses = [(b.name, b.input) for b in r.content if b.type == "tool_use"]
    assert [n for n, _ in uses] == ["get_weather"]
    jsonschema.validate(uses[0][1], tools[0]["input_schema"])
    with c.messages.stream(**kw) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == uses
    # the Anthropic conversation renders as the OpenAI one does (same prompt length)
    n = c.messages.count_tokens(model="m", messages=msgs, tools=tools).input_tokens
    chat = httpx.post(smol_tools.url + "/v1/chat/completions", json={
        "messages": CONVERSATION, "tools": [WEATHER], "max_tokens": 1}, timeout=60).json()
    assert n == chat["usage"]["prompt_tokens"]


def _post(srv, path, body):
    return httpx.post(srv.url + path, json=body, timeout=60)


@pytest.mark.parametrize("body, param", [
    ({"tools": "get_weather"}, "tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "tools"),
    ({"tools": [WEATHER], "grammar": "root ::= [a-z]+"}, "tools"),
])
def test_bad_openai_tool_requests_are_400(smol_tools, body, param):
    r = _post(smol_tools, "/v1/chat/completions",
              {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("messages, where", [
    ([{"role": "user", "content": "Hi", "tool_calls": [{"type": "function"}]}], "messages[0].tool_calls"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {}}]}],
     "messages"),
    (CONVERSATION[:2], "messages"),            # ends with an assistant's calls: results missing
])
def test_bad_tool_messages_are_400(smol_tools, messages, where):
    r = _post(smol_tools, "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == where, r.text


@pytest.mark.parametrize("body", [
    {"tools": [{"description": "no name"}]},
    {"tools": [{"name": "f", "input_schema": {}}], "tool_choice": {"type": "sometimes"}},
    {"tool_choice": {"type": "any"}},
    {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "f", "input": {}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "x", "name": "f", "input": {}}]}]},
])
def test_bad_anthropic_tool_requests_are_400(smol_tools, body):
    r = _post(smol_tools, "/v1/messages",
              {"max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}], **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_the_same_call_as_llama_server(smol_tools, smollm2_path, template_file, tmp_path):
    # llama-server (same llama.cpp, --jinja, the same template file) answers the same request
    # with the same call
    from server_util import running_llama_server
    body = {"messages": CONVERSATION, "tools": [WEATHER], "tool_choice": "required", "temperature": 0,
            "max_tokens": 120, "logit_bias": SMOL_BIAS}
    with running_llama_server(smollm2_path, ["--jinja", "--chat-template-file", str(template_file)],
                               tmp_path) as url:
        theirs = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
    ours = _post(smol_tools, "/v1/chat/completions", body).json()
    assert ours["choices"][0]["finish_reason"] == theirs["choices"][0]["finish_reason"] == "tool_calls"
    assert _calls(ours["choices"][0]["message"]) == _calls(theirs["choices"][0]["message"])


def test_serve_refuses_a_bad_template_file(tmp_path, smollm2_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    for args in (["--chat-template-file", str(tmp_path / "missing.jinja")], ["--chat-template-file", str(bad)]):
        p = subprocess.run([sys.executable, "-m", "llamagen.cli", "serve", "--model", str(smollm2_path),
                            "--port", "1", *args], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stderr
        assert "template" in p.stderr


def test_the_engine_calls_tools_as_generate_does(tool_pair):
    tool_model, tool_ctx = tool_pair
    # AsyncEngine.prepare_chat renders with the engine's template; one request alone in the
    # engine gives generate()'s tokens for the same seed, so the same reply
    msgs = [{"role": "user", "content": "weather in Paris?"}]
    tag = tool_model.tokenize("<tool_call>", add_special=False, parse_special=True)[0]
    engine = llamagen.AsyncEngine(tool_model, n_ctx=1024, n_parallel=2, chat_template=TIGHT_TEMPLATE)
    try:
        chat = engine.prepare_chat(msgs, tools=[WEATHER_ENUM], tool_choice="required")
        assert chat == lt.prepare(tool_model, msgs, tools=[WEATHER_ENUM], tool_choice="required",
                                  template=TIGHT_TEMPLATE)
        p = chat.params(max_new_tokens=80, temp=0.7, seed=11, logit_bias={tag: 30.0})
        got = engine.generate_sync(chat.prompt, p)
        want = llamagen.generate(tool_ctx, chat.prompt, params=p, parse_special=True)
        assert got.text == want
        assert _calls(chat.reply(got.text, got.choices[0].finish_reason))
    finally:
        engine.close()
    with pytest.raises(ValueError, match="template"):
        llamagen.AsyncEngine(tool_model, n_ctx=256, chat_template="{% for m in messages %}")
