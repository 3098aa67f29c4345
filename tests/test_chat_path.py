"""One chat-prompt path (llamagen.chat.prepare) behind the engine, the server, Ray and the CLI;
the engine finishing its output (logprobs of the text a chunk shows); errors that carry their
field (issue 27, points 3 and 4)."""
from __future__ import annotations

import pytest

import llamagen
from llamagen import chat

MSGS = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": " Hi "},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]


@pytest.fixture(scope="module")
def smol(smollm2_path):
    m = llamagen.Model(str(smollm2_path))
    yield m
    m.close()


def test_prepare_gives_the_tokens_llama_server_would(smol):
    c = chat.prepare(smol, MSGS[1:2])
    assert c.prompt == smol.render_chat(MSGS[1:2])
    assert c.tokens == smol.tokenize(c.prompt, add_special=True, parse_special=True)
    start = smol.tokenize("<|im_start|>", add_special=False, parse_special=True)
    assert len(start) == 1 and c.tokens.count(start[0]) == 3     # (its default system turn too)
    assert not c.tools and c.sampling == {} and c._parser is None      # no parser until asked
    assert c.reply("Hello!") == {"role": "assistant", "content": "Hello!"}
    assert chat.prepare(smol, MSGS[1:2], tokenize=False).tokens == []


def test_a_template_that_writes_the_bos_gets_one(tiny_model):
    bos = tiny_model.bos
    tmpl = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    c = chat.prepare(tiny_model, [{"role": "user", "content": "hi"}], template=tmpl)
    assert c.tokens[0] == bos and c.tokens[1] != bos


def test_every_caller_gets_the_same_tokens(smol):
    want = chat.prepare(smol, MSGS).tokens
    with llamagen.AsyncEngine(smol, n_ctx=512, n_parallel=1) as eng:
        assert eng.prepare_chat(MSGS).tokens == want
        # the engine takes the ChatPrompt itself as a prompt
        r = eng.generate_sync(eng.prepare_chat(MSGS), max_new_tokens=2, temp=0)
        assert r.usage.prompt_tokens == len(want)
    from llamagen.ray import ChatStage
    stage = ChatStage.__new__(ChatStage)          # (no Ray cluster needed to read its prompt)
    stage.model, stage.template, stage.chat_template_kwargs, stage.enable_thinking = \
        smol, None, None, None
    assert stage._prompt(MSGS) == want


def test_a_gemma_base_model_chats_in_gemma_turns(real_model):
    # the CLI's template for a Gemma base model: llama.cpp's built-in "gemma" format, as Jinja
    assert real_model.chat_template is None
    tmpl = chat.base_template(real_model)
    for msgs in (MSGS, MSGS[1:2], MSGS[:2]):
        assert real_model.render_chat(msgs, template=tmpl) == \
            real_model.apply_chat_template(msgs, template="gemma")
    c = chat.prepare(real_model, MSGS[1:2], template=tmpl)
    turn = real_model.tokenize("<start_of_turn>", add_special=False, parse_special=True)
    assert len(turn) == 1 and c.tokens.count(turn[0]) == 2 and c.tokens[0] == real_model.bos


def test_cli_chat_uses_the_chat_path(real_model_path, real_model, capsys):
    from llamagen import cli
    rc = cli.main(["generate", "-m", str(real_model_path), "--chat", "Name a color.",
                   "--max-new-tokens", "6", "--temp", "0", "-v"])
    out = capsys.readouterr()
    assert rc == 0 and "tokens" in out.err
    with llamagen.Context(real_model, n_ctx=512) as ctx:
        c = chat.prepare(real_model, [{"role": "user", "content": "Name a color."}],
                         template=chat.base_template(real_model))
        want = llamagen.generate(ctx, c.tokens, max_new_tokens=6, temp=0)
    assert out.out == want + "\n"


def test_a_trailing_tool_call_message_is_refused_with_its_field(smol):
    msgs = MSGS[1:2] + [{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "id": "c1", "function": {"name": "f", "arguments": "{}"}}]}]
    with pytest.raises(llamagen.InvalidParamError, match="assistant's tool calls") as e:
        chat.prepare(smol, msgs)
    assert e.value.field == "messages"


# -- errors carry their field --------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field, kind", [
    ({"temp": "hot"}, "temp", TypeError),
    ({"top_p": 2.0}, "top_p", ValueError),
    ({"logit_bias": {5: float("nan")}}, "logit_bias", ValueError),
    ({"stop": [""]}, "stop", ValueError),
    ({"grammar": "x", "json_object": True}, "grammar", ValueError),
    ({"json_schema": "{not json"}, "json_schema", ValueError),
    ({"grammar": 'root ::= "a"', "grammar_triggers": ["a"]}, "grammar_triggers", ValueError),
    ({"grammar_lazy": True}, "grammar_lazy", ValueError),
])
def test_sampling_errors_name_their_field(kwargs, field, kind):
    with pytest.raises(llamagen.InvalidParamError) as e:
        llamagen.SamplingParams(**kwargs)
    assert e.value.field == field and isinstance(e.value, kind)


def test_engine_errors_name_their_field(tiny_model):
    with llamagen.AsyncEngine(tiny_model, n_ctx=256, n_parallel=1) as eng:
        for call, field in ((lambda: eng.generate_sync("x", n=0), "n"),
                            (lambda: eng.generate_sync([10**9]), "prompt"),
                            (lambda: eng.generate_sync(None), "prompt"),
                            (lambda: eng.generate_sync("x", logit_bias={10**6: 1.0}), "logit_bias")):
            with pytest.raises(llamagen.InvalidParamError) as e:
                call()
            assert e.value.field == field, e.value


def test_a_lone_surrogate_in_one_text_names_that_text(tiny_model):
    # was a TypeError about constructor arguments (UnicodeEncodeError rebuilt with one)
    bad = ["fine", "bad \ud800 text"]
    with llamagen.Context(tiny_model, n_ctx=256, embeddings=True) as ectx:
        with pytest.raises(ValueError, match="text 1") as e:
            llamagen.embed(ectx, bad)
        assert e.value.index == 1 and isinstance(e.value, llamagen.InvalidParamError)
    with llamagen.Context(tiny_model, n_ctx=256) as ctx:
        with pytest.raises(ValueError, match="text 1") as e:
            llamagen.score(ctx, bad)
        assert e.value.index == 1


# -- the engine finishes its output ---------------------------------------------------------------

def test_chunk_logprobs_are_those_of_the_text_shown(smol):
    # emoji and accents: tokens whose bytes end mid-character are held back with their logprobs
    prompt = chat.prepare(smol, [{"role": "user", "content":
                                  "Write three French words with accents and an emoji."}])
    with llamagen.AsyncEngine(smol, n_ctx=1024, n_parallel=2) as eng:
        for kw in ({"temp": 0}, {"temp": 1.0, "seed": 4}, {"temp": 1.0, "seed": 9}):
            with eng.stream_sync(prompt, max_new_tokens=60, logprobs=1, **kw) as s:
                chunks = list(s)
            shown, text = [], ""
            for c in chunks:
                assert c.logprobs is not None
                if not c.text and c.finish_reason is None:
                    assert c.logprobs == []          # held until the chunk that shows the text
                shown += c.logprobs
                text += c.text
                # the text shown so far is the start of these tokens' text, and only the last
                # token's bytes may still be held back (part of a character)
                got = b"".join(t.piece for t in shown)
                assert got.startswith(text.encode()), (got, text)
                if shown and c.finish_reason is None:
                    assert len(got) - len(text.encode()) < len(shown[-1].piece), (got, text)
            last = chunks[-1]
            assert last.finish_reason in ("stop", "length")
            # the end-of-generation token is not among them; every other token is
            toks = [t for c in chunks for t in c.token_ids]
            if last.finish_reason == "stop" and last.stop_sequence is None:
                assert smol.is_eog(toks[-1]) and [t.token for t in shown] == toks[:-1]
            else:
                assert [t.token for t in shown] == toks
            r = eng.generate_sync(prompt, max_new_tokens=60, logprobs=1, **kw)
            assert r.choices[0].logprobs == shown


def test_the_failure_types_carry_the_choice_and_reason():
    # (the engine raises them where a choice ends "cancelled" / "error"; no test reaches
    # that branch: a grammar dead end raises GrammarError from the step instead)
    assert issubclass(llamagen.RequestCancelledError, llamagen.GenerationError)
    e = llamagen.GenerationError("x", index=2, reason="error")
    assert (e.index, e.reason) == (2, "error") and isinstance(e, llamagen.LlamaError)
