"""Saved and restored state (issue 30): the whole context to a file and back, one sequence as bytes
or a file, a generation continued from a loaded state without prefilling its tokens again, with
the very tokens and logprobs of a cold run, and a running GenerationState saved and resumed on
another context with the tokens it would have produced."""
from __future__ import annotations

import pytest

import llamagen
from llamagen.errors import LlamaError

PROMPT = "The history of the bicycle begins in the early nineteenth century, when inventors"
KW = dict(max_new_tokens=16, temp=0, logprobs=0, return_logprobs=True)


def _trace(c):
    return c.tokens, [t.logprob for t in c.logprobs]


def _prefilled(model, **ctx_kw):
    """A context whose sequence 0 holds PROMPT's cells (a 1-token generation prefilled it), and
    those tokens."""
    ctx = llamagen.Context(model, n_ctx=512, **ctx_kw)
    st = llamagen.gen_begin(ctx, PROMPT, max_new_tokens=1, temp=0)
    for _ in st:
        pass
    return ctx, model.tokenize(PROMPT)


def test_state_file_round_trip_continues_as_a_cold_run(real_model, tmp_path):
    with llamagen.Context(real_model, n_ctx=512) as cold_ctx:
        cold = _trace(llamagen.generate(cold_ctx, PROMPT, **KW))
    ctx, toks = _prefilled(real_model)
    path = tmp_path / "state.bin"
    ctx.save_state(path, tokens=toks)
    ctx.close()
    with llamagen.Context(real_model, n_ctx=512) as ctx2:
        assert ctx2.load_state(path) == toks
        st = llamagen.gen_begin(ctx2, PROMPT, max_new_tokens=16, temp=0, logprobs=0)
        for _ in st:
            pass
        assert st.timings["n_cached_tokens"] == len(toks) - 1     # only the last one decoded
        assert (st.tokens, [t.logprob for t in st.logprobs]) == cold    # bit-equal
        # used once: a second generation prefills again (the state was taken over)
        st = llamagen.gen_begin(ctx2, PROMPT, max_new_tokens=2, temp=0)
        for _ in st:
            pass
        assert st.timings["n_cached_tokens"] == 0


def test_a_longer_prompt_prefills_only_its_new_part(real_model, tmp_path):
    ctx, toks = _prefilled(real_model)
    data = ctx.seq_state(0)
    assert isinstance(data, bytes) and len(data) == ctx.seq_state_size(0)
    ctx.close()
    longer = PROMPT + " built machines that riders pushed along"
    with llamagen.Context(real_model, n_ctx=512) as ctx2:
        ctx2.set_seq_state(data, 0, tokens=toks)
        st = llamagen.gen_begin(ctx2, longer, max_new_tokens=8, temp=0)
        text = "".join(st)
        assert st.timings["n_cached_tokens"] == len(toks)
        assert text == llamagen.generate(ctx2, longer, max_new_tokens=8, temp=0)   # (cold: close)


def test_sequence_files_into_another_sequence(real_model, tmp_path):
    ctx, toks = _prefilled(real_model, n_seq_max=2)
    path = tmp_path / "seq.bin"
    assert ctx.save_seq_state(path, 0, tokens=toks) > 0
    a = ctx.seq_state(0)
    assert ctx.load_seq_state(path, 1) == toks
    assert ctx.seq_state(1)[:64] and len(ctx.seq_state(1)) == len(a)
    ctx.close()


def test_bad_state_is_a_clear_error_not_a_crash(real_model, tiny_model, tmp_path):
    with llamagen.Context(real_model, n_ctx=512) as ctx:
        with pytest.raises(FileNotFoundError):
            ctx.load_state(tmp_path / "missing.bin")
        junk = tmp_path / "junk.bin"
        junk.write_bytes(b"not a state" * 100)
        with pytest.raises(LlamaError, match="could not load"):
            ctx.load_state(junk)
        with pytest.raises(LlamaError, match="could not load"):
            ctx.load_seq_state(junk, 0)
        with pytest.raises(ValueError, match="seq_id"):
            ctx.seq_state(5)
        with pytest.raises(TypeError, match="data"):
            ctx.set_seq_state(b"", 0)
        # still usable
        assert llamagen.generate(ctx, "Hello", max_new_tokens=3, temp=0)
    # truncated, and another model's state
    ctx, toks = _prefilled(real_model)
    good = tmp_path / "good.bin"
    ctx.save_state(good, tokens=toks)
    data = ctx.seq_state(0)
    ctx.close()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with llamagen.Context(real_model, n_ctx=512) as ctx:
        with pytest.raises(LlamaError):
            ctx.load_state(cut)
        with pytest.raises(LlamaError):
            ctx.set_seq_state(data[: len(data) // 2], 0)
    with llamagen.Context(tiny_model, n_ctx=512) as other:
        with pytest.raises(LlamaError):
            other.load_state(good)
        with pytest.raises(LlamaError):
            other.set_seq_state(data, 0)
        assert llamagen.generate(other, "hi", max_new_tokens=2, temp=0) is not None


# -- a running generation saved and resumed (GenerationState.save / gen_resume) -----------------

SEEDED = dict(max_new_tokens=40, temp=0.9, top_k=40, top_p=0.95, seed=7, repeat_penalty=1.2,
              repeat_last_n=16, logprobs=2)


def _stream(st):
    return "".join(st) + st.end()


@pytest.mark.parametrize("kw", [dict(max_new_tokens=40, temp=0, logprobs=1), SEEDED,
                                dict(SEEDED, dry_multiplier=0.8, mirostat=2, seed=3),
                                dict(SEEDED, json_schema={"type": "object", "properties": {
                                    "name": {"type": "string"}}, "required": ["name"]})],
                         ids=["greedy", "seeded", "dry-mirostat", "grammar"])
def test_a_saved_generation_resumes_on_another_context_with_the_same_tokens(real_model, tmp_path, kw):
    with llamagen.Context(real_model, n_ctx=512) as ctx:
        whole = llamagen.gen_begin(ctx, PROMPT, **kw)
        want = _stream(whole)
        want_tokens, want_lp = whole.tokens, [t.logprob for t in whole.logprobs]
        st = llamagen.gen_begin(ctx, PROMPT, **kw)
        head = "".join(next(st) for _ in range(5))
        saved = st.save(tmp_path / "gen.state")
        assert head + _stream(st) == want    # the original goes on: the save changed nothing
    with llamagen.Context(real_model, n_ctx=1024) as other:     # (another size: same streams)
        r = llamagen.gen_resume(other, tmp_path / "gen.state")
        assert r.timings["n_cached_tokens"] > 5
        tail = _stream(r)
        assert head + tail == want and r.tokens == want_tokens
        assert [t.logprob for t in r.logprobs] == want_lp
        r2 = llamagen.gen_resume(other, saved)           # bytes work as well as a file
        assert _stream(r2) == tail


def test_resume_refuses_what_it_cannot_continue(real_model, tiny_model, tmp_path):
    with llamagen.Context(real_model, n_ctx=512) as ctx:
        st = llamagen.gen_begin(ctx, PROMPT, **SEEDED)
        next(st)
        saved = st.save()
        with pytest.raises(ValueError, match="not a saved generation"):
            llamagen.gen_resume(ctx, b"nonsense bytes here")
        with pytest.raises(ValueError, match="truncated"):
            llamagen.gen_resume(ctx, saved[:40])
        with pytest.raises(LlamaError, match="do not fit"):
            llamagen.gen_resume(ctx, saved[:-100])
        assert llamagen.generate(ctx, PROMPT, max_new_tokens=4, temp=0)   # still usable
        ch = llamagen.gen_begin(ctx, PROMPT, max_new_tokens=8, temp=0.9, seed=1,
                                sampler_impl="llama.cpp")
        with pytest.raises(ValueError, match="sampler_impl"):
            ch.save()
        done = llamagen.gen_begin(ctx, PROMPT, max_new_tokens=2, temp=0)
        _stream(done)
        with pytest.raises(LlamaError, match="over"):
            done.save()
    with llamagen.Context(tiny_model, n_ctx=512) as tctx:
        with pytest.raises(ValueError, match="another model"):
            llamagen.gen_resume(tctx, saved)
