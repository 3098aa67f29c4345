"""Reasoning models (issue 29, section 5): a chat template that thinks (``<think>`` ... ``</think>``,
written here in Qwen3's manner: the generation prompt opens the block, ``enable_thinking=false``
closes it empty), llama.cpp's parser splitting the reasoning out, and each API's shape for it:
chat ``reasoning_content`` (replies and deltas), ``reasoning_format``, ``chat_template_kwargs``,
``reasoning_effort``; Anthropic ``thinking`` blocks in and out; Responses ``reasoning`` items.

SmolLM2 never writes ``</think>`` by itself, so a grammar shapes its output as
``<reasoning></think><answer>``: what the parser does with a thinking model's reply."""
from __future__ import annotations

import json
import re

import anthropic
import httpx
import openai
import pytest

import llamagen
from llamagen import chat

from server_util import serving

THINK_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' -}}"
    "{%- if m['role'] == 'assistant' and m.get('reasoning_content') -%}"
    "{{- '<think>\\n' + m['reasoning_content'] + '\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{{- (m['content'] or '') + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- else -%}{{- '<think>\\n' -}}{%- endif -%}"
    "{%- endif -%}")
# the model's reply: some reasoning, the end tag, an answer
SHAPE = 'root ::= [a-z]{3,8} " " [a-z]{3,8} "</think>" [A-Z] [a-z]{2,8} "."'
Q = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def smol(smollm2_model):
    return smollm2_model


def test_prepare_knows_the_template_thinks(smol):
    cp = chat.prepare(smol, Q, template=THINK_TEMPLATE)
    assert cp.thinking and cp.parses and not cp.tools
    assert cp.prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert cp.reply("first step\n</think>\n\nHello!") == {
        "role": "assistant", "content": "Hello!", "reasoning_content": "first step\n"}
    # cut short inside the reasoning: all of it is reasoning
    assert cp.reply("still thinking", "length") == {
        "role": "assistant", "content": None, "reasoning_content": "still thinking"}
    off = chat.prepare(smol, Q, template=THINK_TEMPLATE, enable_thinking=False)
    assert off.prompt.endswith("<think>\n\n</think>\n\n")
    kw = chat.prepare(smol, Q, template=THINK_TEMPLATE,
                      chat_template_kwargs={"enable_thinking": False})
    assert kw.prompt == off.prompt
    raw = chat.prepare(smol, Q, template=THINK_TEMPLATE, reasoning_format="none")
    assert raw.thinking and not raw.parses
    # an earlier turn's reasoning is rendered by the template
    hist = chat.prepare(smol, Q + [{"role": "assistant", "content": "Hi", "reasoning_content": "greet"},
                                   {"role": "user", "content": "Again."}], template=THINK_TEMPLATE)
    assert "<think>\ngreet\n</think>" in hist.prompt
    with pytest.raises(ValueError, match="reasoning_format"):
        chat.prepare(smol, Q, template=THINK_TEMPLATE, reasoning_format="verbose")
    # a template without a thinking syntax: nothing to parse
    plain = chat.prepare(smol, Q)
    assert not plain.thinking and not plain.parses


@pytest.fixture(scope="module")
def srv(smollm2_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("tmpl") / "think.jinja"
    path.write_text(THINK_TEMPLATE)
    yield from serving(tmp_path_factory, "think", smollm2_path, "--ctx-size", 2048,
                       "--parallel", 2, "--chat-template-file", path)


@pytest.fixture(scope="module")
def oai(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _chat(oai, **kw):
    body = dict(model="m", messages=Q, temperature=0, max_tokens=40, extra_body={"grammar": SHAPE})
    body["extra_body"] = {**body["extra_body"], **kw.pop("extra_body", {})}
    return oai.chat.completions.create(**body, **kw)


def test_chat_reasoning_content_streamed_and_not(oai):
    r = _chat(oai)
    m = r.choices[0].message
    reasoning = m.model_extra["reasoning_content"]
    assert reasoning and "</think>" not in reasoning and " " in reasoning
    assert m.content and m.content[0].isupper() and m.content.endswith(".")
    parts = {"reasoning_content": "", "content": ""}
    for chunk in _chat(oai, stream=True):
        if chunk.choices:
            d = chunk.choices[0].delta
            parts["content"] += d.content or ""
            parts["reasoning_content"] += (d.model_extra or {}).get("reasoning_content") or ""
    assert parts == {"reasoning_content": reasoning, "content": m.content}


def test_reasoning_format_none_keeps_it_in_the_content(oai):
    r = _chat(oai, extra_body={"reasoning_format": "none"})
    m = r.choices[0].message
    assert "</think>" in m.content and not (m.model_extra or {}).get("reasoning_content")
    bad = httpx.post(str(oai.base_url) + "chat/completions",
                     json={"messages": Q, "reasoning_format": "loud", "max_tokens": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "reasoning_format"


def test_thinking_off_through_kwargs_and_reasoning_effort(oai):
    on = _chat(oai).usage.prompt_tokens
    off = _chat(oai, extra_body={"chat_template_kwargs": {"enable_thinking": False}}).usage.prompt_tokens
    effort_none = _chat(oai, reasoning_effort="none").usage.prompt_tokens
    assert off == effort_none > on          # the closed, empty think block is in the prompt
    # other efforts reach the template as reasoning_effort (this one ignores it)
    assert _chat(oai, reasoning_effort="high").usage.prompt_tokens == on


def test_anthropic_thinking_blocks_out_and_in(srv):
    c = anthropic.Anthropic(base_url=srv.url, api_key="none", max_retries=0, timeout=120)
    kw = dict(model="m", max_tokens=40, messages=Q, extra_body={"grammar": SHAPE, "temperature": 0})
    r = c.messages.create(**kw)
    assert [b.type for b in r.content] == ["thinking", "text"]
    thinking, text = r.content[0].thinking, r.content[1].text
    with c.messages.stream(**kw) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert (final.content[0].thinking, final.content[1].text) == (thinking, text)
    # thinking disabled: the template closes the block in the prompt
    off = c.messages.create(**kw, thinking={"type": "disabled"})
    assert off.usage.input_tokens > r.usage.input_tokens
    # an earlier turn's thinking block goes back to the template
    turn = [{"role": "assistant", "content": [{"type": "thinking", "thinking": "greet them",
                                                "signature": ""},
                                               {"type": "text", "text": "Hello."}]},
            {"role": "user", "content": "Again."}]
    with_block = c.messages.count_tokens(model="m", messages=Q + turn).input_tokens
    turn[0]["content"] = turn[0]["content"][1:]
    without = c.messages.count_tokens(model="m", messages=Q + turn).input_tokens
    assert with_block > without


def test_responses_reasoning_items(oai):
    kw = dict(model="m", input="Say hello.", temperature=0, max_output_tokens=40,
              extra_body={"grammar": SHAPE})
    r = oai.responses.create(**kw)
    assert [o.type for o in r.output] == ["reasoning", "message"]
    reasoning = r.output[0].content[0].text
    assert reasoning and r.output_text
    deltas = ""
    with oai.responses.stream(**kw) as s:
        for ev in s:
            if ev.type == "response.reasoning_text.delta":
                deltas += ev.delta
        final = s.get_final_response()
    assert deltas == reasoning and final.output_text == r.output_text


# -- the thinking budget (common/reasoning-budget.h) -----------------------------------------------

def _think_split(model, tokens):
    """(tokens before the first "</think>", the whole text) of generated ``tokens``."""
    text = model.detokenize(tokens)
    end = model.tokenize("</think>", add_special=False, parse_special=True)
    for i in range(len(tokens) - len(end) + 1):
        if tokens[i:i + len(end)] == end:
            return i, text
    return None, text


@pytest.mark.parametrize("budget", [0, 6])
def test_a_thinking_budget_forces_the_end_tag_after_its_tokens(smol, budget):
    cp = chat.prepare(smol, Q, template=THINK_TEMPLATE)
    p = cp.params(max_new_tokens=40, temp=0.8, seed=3, reasoning_budget=budget)
    assert p.reasoning_start and p.reasoning_end and p.reasoning_forced == p.reasoning_end[0]
    with llamagen.Context(smol, n_ctx=1024, n_seq_max=2) as ctx:
        free = llamagen.generate(ctx, cp.tokens, params=cp.params(max_new_tokens=40, temp=0.8, seed=3),
                                 return_logprobs=True)
        assert _think_split(smol, free.tokens)[0] is None or _think_split(smol, free.tokens)[0] > budget
        c = llamagen.generate(ctx, cp.tokens, params=p, return_logprobs=True)
        at, text = _think_split(smol, c.tokens)
        assert at == budget, text                  # exactly the budget, then the end tag
        assert len(c.tokens) > at + 3              # and the answer goes on after it
        assert c.tokens[:budget] == free.tokens[:budget]     # nothing changed before the cut
        st = llamagen.gen_begin(ctx, cp.tokens, params=p)
        assert "".join(st) + st.end() == c.text    # the stream: the same text
        bg = llamagen.BatchGenerator(ctx, params=p)
        sid = bg.add(cp.tokens)
        assert "".join(ch for _, ch in bg) == c.text
    reply = cp.reply(c.text)                       # the parser splits the cut block out
    assert "</think>" not in (reply["content"] or "")
    assert bool(reply.get("reasoning_content")) == (budget > 0)


def test_a_budget_needs_thinking_tags():
    with pytest.raises(ValueError, match="thinking"):
        llamagen.SamplingParams(reasoning_budget=10)
    with pytest.raises(llamagen.InvalidParamError):
        llamagen.SamplingParams(reasoning_budget=-3, reasoning_start=(1,), reasoning_end=((2,),))


def test_budget_over_http_chat_and_anthropic(oai, srv, smol):
    r = oai.chat.completions.create(model="m", messages=Q, max_tokens=40, temperature=0,
                                    extra_body={"reasoning_budget_tokens": 3})
    reasoning = r.choices[0].message.model_extra["reasoning_content"]
    assert len(smol.tokenize(reasoning, add_special=False)) <= 4, reasoning
    free = oai.chat.completions.create(model="m", messages=Q, max_tokens=40, temperature=0)
    assert len(free.choices[0].message.model_extra.get("reasoning_content") or "") > len(reasoning)
    c = anthropic.Anthropic(base_url=srv.url, api_key="none", max_retries=0, timeout=120)
    m = c.messages.create(model="m", max_tokens=40, messages=Q, extra_body={"temperature": 0},
                          thinking={"type": "enabled", "budget_tokens": 3})
    assert m.content[0].type == "thinking"
    assert len(smol.tokenize(m.content[0].thinking, add_special=False)) <= 4


def test_a_budget_message_is_written_before_the_end_tag(smol, oai):
    cp = chat.prepare(smol, Q, template=THINK_TEMPLATE)
    p = cp.params(max_new_tokens=30, temp=0, reasoning_budget=2,
                  reasoning_budget_message=" Time is up.")
    assert p.reasoning_forced[-len(p.reasoning_end[0]):] == p.reasoning_end[0]
    with llamagen.Context(smol, n_ctx=1024) as ctx:
        text = llamagen.generate(ctx, cp.tokens, params=p)
    assert " Time is up.</think>" in text
    r = oai.chat.completions.create(model="m", messages=Q, max_tokens=30, temperature=0, extra_body={
        "reasoning_budget_tokens": 2, "reasoning_budget_message": " Time is up."})
    assert r.choices[0].message.model_extra["reasoning_content"].rstrip().endswith("Time is up.")


def test_a_lazy_grammar_sleeps_inside_the_thinking_block(smol):
    # A template's tool-call grammar is lazy: a trigger wakes it.  Written while thinking, the
    # trigger is not a call: the grammar sleeps until the thinking block ends (llama-server
    # wakes it there).  The thinking is forced (a budget of 0) and holds the trigger token.
    def ids(t):
        return tuple(smol.tokenize(t, add_special=False, parse_special=True))

    prompt = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n<think>\n"
    tags = dict(reasoning_start=ids("<think>"), reasoning_end=(ids("</think>"),),
                max_new_tokens=40, temp=0)
    with llamagen.Context(smol, n_ctx=512) as ctx:
        # the forced thought holds a newline token, and the model's first token after it is a
        # newline again: the trigger
        forced = ids("Plan\nmore.</think>\n")
        nl = ids("\n")[0]
        first = llamagen.generate(ctx, prompt, reasoning_budget=0, reasoning_forced=forced,
                                  return_logprobs=True, **tags).tokens[len(forced)]
        assert first == nl and forced.count(nl) == 2
        p = llamagen.SamplingParams(grammar='root ::= "\\n" "CALL(" [a-z]{1,8} ")"',
                                    grammar_lazy=True, grammar_trigger_tokens=(nl,),
                                    reasoning_budget=0, reasoning_forced=forced, **tags)
        c = llamagen.generate(ctx, prompt, params=p, return_logprobs=True)
        thought = smol.detokenize(list(forced), unparse_special=True)
        # asleep through the thought's two newlines (awake at the first, the grammar would have
        # allowed only "CALL(" next, and the forced "more" would have been a dead end, a
        # GrammarError); awake at the first newline after it: the grammar's call, then the end
        assert re.fullmatch(re.escape(thought + "\n") + r"CALL\([a-z]{1,8}\)", c.text), c.text
        assert c.finish_reason == "stop"
