"""Logprobs of generated tokens, prompt scoring (against llama-perplexity) and n samples."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import llamagen
from llamagen import _core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.real_model


def log_softmax64(row_bytes: bytes) -> np.ndarray:
    x = np.frombuffer(row_bytes, dtype=np.float32).astype(np.float64)
    m = x.max()
    return x - (m + math.log(np.exp(x - m).sum()))


def recorded_rows(ctx, prompt, tokens):
    """The logits rows a generation of ``tokens`` saw (same decode schedule as gen_begin)."""
    rows = []
    forced = _core._replay_run(ctx, prompt, llamagen.SamplingParams(temp=0.0), [], len(tokens),
                               stop_at_eog=False, logits_out=rows)
    return forced, rows


# -- generated tokens ---------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 5, 20])
def test_greedy_logprobs_equal_float64_log_softmax(real_ctx, k):
    prompt = "The three primary colours are"
    c = llamagen.generate(real_ctx, prompt, max_new_tokens=12, temp=0.0, logprobs=k,
                          ignore_eos=True, return_logprobs=True)
    assert len(c.logprobs) == len(c.tokens) == 12
    forced, rows = recorded_rows(real_ctx, prompt, c.tokens)
    assert forced == c.tokens                       # greedy: the same tokens, the same rows
    for i, (lp, row) in enumerate(zip(c.logprobs, rows)):
        ref = log_softmax64(row)
        assert lp.token == c.tokens[i]
        assert abs(lp.logprob - ref[lp.token]) < 1e-4
        assert len(lp.top) == k
        if k:
            want = np.sort(ref)[::-1][:k]
            got = np.array([t.logprob for t in lp.top])
            assert np.all(np.abs(got - want) < 1e-4)
            assert all(abs(ref[t.token] - t.logprob) < 1e-4 for t in lp.top)
            # greedy picks the most likely token
            assert lp.top[0].logprob == pytest.approx(lp.logprob, abs=1e-6)


def test_sampled_logprobs_are_before_the_sampler(real_ctx):
    # temperature, top-k and a penalty change the distribution sampled from, not the logprobs
    p = llamagen.SamplingParams(temp=1.5, top_k=40, repeat_penalty=1.3, seed=3, max_new_tokens=10,
                                ignore_eos=True, logprobs=3)
    prompt = "Once upon a time"
    c = llamagen.generate(real_ctx, prompt, params=p, return_logprobs=True)
    rows = []
    driver = p.replace(logprobs=None, sampler_impl="llama.cpp")
    toks = _core._replay_run(real_ctx, prompt, driver, [], len(c.tokens), stop_at_eog=False,
                             logits_out=rows)
    assert toks == c.tokens                          # fast engine == llama.cpp's chain
    for lp, row in zip(c.logprobs, rows):
        ref = log_softmax64(row)
        assert abs(lp.logprob - ref[lp.token]) < 1e-4
        assert [t.token for t in lp.top] == list(np.argsort(-ref, kind="stable")[:3])


def test_stream_chunks_and_state_agree_with_generate(real_ctx):
    kw = dict(max_new_tokens=10, temp=0.7, seed=11, logprobs=2)
    c = llamagen.generate(real_ctx, "A list of fruits:", return_logprobs=True, **kw)
    st = llamagen.gen_begin(real_ctx, "A list of fruits:", **kw)
    per_chunk, text = [], []
    for chunk in st:
        text.append(chunk)
        per_chunk.extend(st.chunk_logprobs)
        assert len(st.chunk_logprobs) == 1           # one token per step
    text.append(st.end())
    assert "".join(text) == c.text
    assert per_chunk == st.logprobs == c.logprobs
    assert [t.token for t in c.logprobs] == c.tokens
    # pieces render the token; text is its decoded form
    assert b"".join(t.piece for t in c.logprobs).decode("utf-8", "replace") == \
        real_ctx.model.detokenize(c.tokens, unparse_special=True)


def test_logprobs_off_by_default(real_ctx):
    st = llamagen.gen_begin(real_ctx, "Hello", max_new_tokens=3)
    list(st)
    assert st.logprobs is None and st.chunk_logprobs is None
    c = llamagen.generate(real_ctx, "Hello", max_new_tokens=3, return_logprobs=True)
    assert c.logprobs is not None and all(t.top == () for t in c.logprobs)   # None -> 0


def test_batch_and_map_generate_logprobs(real_model):
    with llamagen.Context(real_model, n_ctx=1024, n_seq_max=4, kv_unified=True) as ctx:
        b = llamagen.BatchGenerator(ctx, max_new_tokens=6, temp=0.0, logprobs=4, ignore_eos=True)
        ids = [b.add(p) for p in ["One", "Two and", "Three, four"]]
        for _ in b:
            pass
        for sid in ids:
            lps = b.logprobs(sid)
            assert [t.token for t in lps] == b.tokens(sid)
            assert b.logprobs(sid, 4) == lps[4:]
            for t in lps:
                assert t.logprob <= 0.0 and len(t.top) == 4
                assert t.top[0].logprob == pytest.approx(t.logprob, abs=1e-6)     # greedy
                assert sum(math.exp(x.logprob) for x in t.top) <= 1.0 + 1e-6
        res = list(llamagen.map_generate(ctx, ["Red", "Blue"], max_new_tokens=5, logprobs=1))
        assert all(r.ok and [t.token for t in r.logprobs] == r.tokens for r in res)
        res = list(llamagen.map_generate(ctx, ["Red"], max_new_tokens=5))
        assert res[0].logprobs is None


def test_engine_chunks_carry_logprobs(real_model):
    with llamagen.AsyncEngine(real_model, n_ctx=1024, n_parallel=2) as eng:
        r = eng.generate_sync("Hello there", max_new_tokens=6, temp=0.0, logprobs=2, ignore_eos=True)
        ch = r.choices[0]
        assert [t.token for t in ch.logprobs] == ch.tokens and len(ch.tokens) == 6
        r = eng.generate_sync("Hello there", max_new_tokens=3)
        assert r.choices[0].logprobs is None


@pytest.mark.parametrize("bad, exc", [(21, ValueError), (-1, ValueError), (1.0, TypeError),
                                      (True, TypeError), ("3", TypeError)])
def test_bad_logprobs(bad, exc):
    with pytest.raises(exc, match="logprobs"):
        llamagen.SamplingParams(logprobs=bad)


def test_logprobs_refuse_backend_sampling():
    with pytest.raises(ValueError, match="logprobs"):
        llamagen.SamplingParams(logprobs=1, sampler_impl="backend")


def test_row_kernel_on_extreme_rows():
    # -inf entries (masked) and huge spreads stay exact; the normaliser is log-sum-exp
    row = np.full(262144, -1e30, dtype=np.float32)
    row[7] = 3.0
    row[9] = 3.0 + math.log(3.0)
    row[100:200] = -np.inf
    norm, ids, lps, _ = _core._row_logprobs(row, 2)
    assert ids == [9, 7]
    assert lps == pytest.approx([math.log(0.75), math.log(0.25)], abs=1e-6)
    rng = np.random.default_rng(0)
    row = (rng.standard_normal(262144) * 4).astype(np.float32)
    norm, ids, lps, _ = _core._row_logprobs(row, 20)
    ref = log_softmax64(row.tobytes())
    assert norm == pytest.approx(float(row[ids[0]] - ref[ids[0]]), abs=1e-6)
    assert list(ids) == list(np.argsort(-ref, kind="stable")[:20])


# -- scoring -------------------------------------------------------------------------------------

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Paris is the capital and largest city of France.",
         "colourless green ideas sleep furiously, said nobody ever"]


def test_score_shapes_and_perplexity(real_ctx):
    res = llamagen.score(real_ctx, TEXTS)
    for text, r in zip(TEXTS, res):
        assert r.tokens == real_ctx.model.tokenize(text)
        assert r.logprobs[0] is None and len(r.logprobs) == len(r.tokens)
        assert all(x <= 0.0 for x in r.logprobs[1:])
        assert r.sum_logprob == pytest.approx(math.fsum(r.logprobs[1:]))
        assert r.perplexity == pytest.approx(math.exp(-r.sum_logprob / (len(r.tokens) - 1)))
    # a fluent sentence is more likely than its words shuffled
    shuffled = llamagen.score(real_ctx, ["France of city largest and capital the is Paris."])[0]
    assert res[1].perplexity < shuffled.perplexity / 5


def test_score_equals_generation_logprobs(real_ctx):
    # the logprob of a generated token given the prompt and what came before it
    prompt = "Water boils at"
    c = llamagen.generate(real_ctx, prompt, max_new_tokens=8, temp=0.0, logprobs=0,
                          ignore_eos=True, return_logprobs=True)
    toks = real_ctx.model.tokenize(prompt) + c.tokens
    r = llamagen.score(real_ctx, [toks], top_logprobs=3)[0]
    n = len(c.tokens)
    # (one decode of all tokens vs one per token: llama.cpp is not batch-invariant, and a
    # quantized model's batched kernels round differently: up to ~0.1 apart on gemma3 Q4_K_M;
    # a token scored at the wrong position would be off by whole units.  The first generated
    # token too: generation decodes the last prompt token alone, as after a cached prompt,
    # where score computes it with the rest -- docs/engine.md)
    assert np.allclose(r.logprobs[-n:], [t.logprob for t in c.logprobs], atol=0.15)
    echo = r.token_logprobs()
    assert echo[0].logprob is None and echo[0].top == ()
    assert [t.token for t in echo] == toks and all(len(t.top) == 3 for t in echo[1:])


@pytest.mark.parametrize("deterministic", [True, False])
def test_score_side_by_side_equals_alone(real_model, deterministic):
    with llamagen.Context(real_model, n_ctx=1024, n_seq_max=3, kv_unified=True,
                          deterministic=deterministic) as ctx:
        together = llamagen.score(ctx, TEXTS)
    with llamagen.Context(real_model, n_ctx=1024, deterministic=deterministic) as ctx:
        alone = [llamagen.score(ctx, [t])[0] for t in TEXTS]
    for a, b in zip(together, alone):
        assert a.tokens == b.tokens
        if deterministic:               # batch-invariant kernels: the same numbers
            assert a.logprobs == b.logprobs
            continue
        # llama.cpp's default kernels are not batch-invariant: the texts' cells in one unified
        # cache put a row's attention blocks elsewhere (measured, gemma3 on an AMD EPYC: equal
        # everywhere but the last tokens of two texts, 0.04 and 0.116 nats; within 0.02 on a
        # Sapphire Rapids)
        assert np.allclose(a.logprobs[1:], b.logprobs[1:], atol=0.15)
        assert a.perplexity == pytest.approx(b.perplexity, rel=2e-2)


def test_score_long_text_in_chunks(real_model):
    # more tokens than n_batch: decoded in several batches, same result as one big batch
    text = " ".join(TEXTS * 12)
    with llamagen.Context(real_model, n_ctx=1024, n_batch=64, n_ubatch=64) as ctx:
        small = llamagen.score(ctx, [text])[0]
    with llamagen.Context(real_model, n_ctx=1024, n_batch=512) as ctx:
        big = llamagen.score(ctx, [text])[0]
    assert len(small.tokens) > 64
    assert small.perplexity == pytest.approx(big.perplexity, rel=1e-2)


def test_score_a_continuation_given_a_context(real_ctx):
    ctx_text = "Question: What is the capital of France?\nAnswer:"
    good, bad = llamagen.score(real_ctx, [(ctx_text, " Paris"), (ctx_text, " Berlin")])
    head = real_ctx.model.tokenize(ctx_text)
    assert good.tokens[:len(head)] == head and good.logprobs[:len(head)] == [None] * len(head)
    assert good.n_scored == len(good.tokens) - len(head) >= 1
    assert good.sum_logprob > bad.sum_logprob          # the model knows its capitals
    # the same numbers as scoring the joined tokens and reading the continuation's part
    whole = llamagen.score(real_ctx, [good.tokens])[0]
    assert whole.logprobs[len(head):] == pytest.approx(good.logprobs[len(head):], abs=1e-3)
    # token lists work too
    r = llamagen.score(real_ctx, [(head, good.tokens[len(head):])])[0]
    assert r.tokens == good.tokens
    with pytest.raises(ValueError, match="continuation is empty"):
        llamagen.score(real_ctx, [(ctx_text, "")])


def test_score_bad_input(real_ctx):
    with pytest.raises(TypeError, match="list of texts"):
        llamagen.score(real_ctx, "one text")
    with pytest.raises(ValueError, match="text 1"):
        llamagen.score(real_ctx, ["fine", []])
    with pytest.raises(llamagen.PromptTooLongError, match="text 0"):
        llamagen.score(real_ctx, [[2] * 1025])
    with pytest.raises(ValueError, match="token"):
        llamagen.score(real_ctx, [[2, 10**9]])
    for k in (-1, 21, 1.5, True):
        with pytest.raises(ValueError, match="top_logprobs"):
            llamagen.score(real_ctx, ["x"], top_logprobs=k)
    one = llamagen.score(real_ctx, [[2]])[0]
    assert one.logprobs == [None] and math.isnan(one.perplexity)
    assert llamagen.score(real_ctx, []) == []


# the same text llama-perplexity reads (the test writes it to a file)
PPL_TEXT = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in Europe "
    "built machines that riders pushed along with their feet. These early designs were heavy and "
    "uncomfortable, and roads of the time were rough, so the machines remained curiosities for "
    "decades. The addition of pedals attached to the front wheel made the bicycle faster, and "
    "makers soon enlarged the front wheel to cover more ground with each turn of the pedals. The "
    "result was the high wheeler, a tall and dangerous machine that young men raced in parks and "
    "on tracks. A fall from such a height could cause serious injury, and many people were "
    "unwilling to ride at all. The safety bicycle changed this. It had two wheels of equal size, "
    "a chain that drove the rear wheel, and a frame shaped much like the frames of today. Soon "
    "after, pneumatic tyres filled with air made the ride smoother, and the bicycle became a "
    "practical means of transport for workers, students and families. Cycling clubs were formed "
    "in many towns, and riders demanded better roads, which later helped the early motor car. "
    "Women in particular found new freedom on two wheels, and the bicycle influenced fashion, as "
    "long skirts gave way to clothing better suited to riding. In the twentieth century the "
    "bicycle spread around the world. In some countries it became the main way to travel to work, "
    "while in others it was mostly used for sport and leisure. Racing grew into a major "
    "professional sport with famous multi-day stage races. Engineers experimented with lighter "
    "materials such as aluminium and carbon fibre, with gears that let riders climb steep hills, "
    "and with brakes that worked in the rain. Today cities plan lanes for cyclists, and electric "
    "bicycles help riders travel farther with less effort than ever before. The simple machine "
    "that began as a wooden toy has become one of the most efficient forms of transport ever "
    "invented, turning human energy into motion with remarkably little waste.")


def llama_perplexity_exe() -> str:
    sys.path.insert(0, os.path.join(ROOT, "bench", "native"))
    from build import llama_tool
    return llama_tool("llama-perplexity")


def llamagen_perplexity(model, text: str, n_ctx: int, **context) -> float:
    """llama-perplexity's figure computed with llamagen.score: the text's tokens in chunks of
    n_ctx, each starting with BOS, the second half of each chunk scored (``context``: more
    Context arguments, e.g. the KV cache types)."""
    toks = model.tokenize(text)
    # (llama-perplexity puts BOS first in each chunk where the model adds one)
    head = [toks[0]] if model.add_bos else []
    chunks = [head + toks[c * n_ctx + len(head):(c + 1) * n_ctx] for c in range(len(toks) // n_ctx)]
    first = n_ctx // 2
    with llamagen.Context(model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=2,
                          **context) as ctx:
        # the first half of each chunk is context (llama-perplexity asks no logits for it)
        res = llamagen.score(ctx, [(ch[:first + 1], ch[first + 1:]) for ch in chunks])
    assert all(r.n_scored == n_ctx - first - 1 for r in res)
    return math.exp(-math.fsum(r.sum_logprob for r in res) / sum(r.n_scored for r in res))


@pytest.mark.slow
def test_score_matches_llama_perplexity(real_model, real_model_path, tmp_path):
    n_ctx = 128
    path = tmp_path / "text.txt"
    path.write_text(PPL_TEXT)
    assert len(real_model.tokenize(PPL_TEXT)) >= 2 * n_ctx      # llama-perplexity needs two chunks
    out = subprocess.run([llama_perplexity_exe(), "-m", str(real_model_path), "-f", str(path),
                          "-c", str(n_ctx), "-b", str(n_ctx), "-t", "2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    assert m, (out.stdout + out.stderr)[-2000:]
    theirs = float(m.group(1))
    ours = llamagen_perplexity(real_model, PPL_TEXT, n_ctx)
    # four significant digits
    assert float(f"{ours:.4g}") == pytest.approx(float(f"{theirs:.4g}"), rel=1.5e-4), (ours, theirs)


# -- n samples -------------------------------------------------------------------------------------

def test_generate_n_on_one_sequence_equals_seeds(real_ctx):
    kw = dict(max_new_tokens=10, temp=0.9, seed=5)
    texts = llamagen.generate(real_ctx, "Once upon a time", n=3, **kw)
    assert texts == llamagen.generate(real_ctx, "Once upon a time", n=3, **kw)     # reproducible
    assert len(set(texts)) == 3                                                      # distinct
    assert texts == [llamagen.generate(real_ctx, "Once upon a time", **{**kw, "seed": 5 + i})
                     for i in range(3)]
    comps = llamagen.generate(real_ctx, "Once upon a time", n=2, return_logprobs=True, **kw)
    assert [c.text for c in comps] == texts[:2] and [c.seed for c in comps] == [5, 6]


def test_generate_n_shares_the_prompt_across_sequences(real_model):
    prompt = "In a quiet village by the sea, there lived"
    with llamagen.Context(real_model, n_ctx=2048, n_seq_max=4, kv_unified=True) as ctx:
        a = llamagen.generate(ctx, prompt, n=4, max_new_tokens=8, temp=1.0, seed=1)
        assert a == llamagen.generate(ctx, prompt, n=4, max_new_tokens=8, temp=1.0, seed=1)
        assert len(set(a)) == 4
        b = llamagen.BatchGenerator(ctx, max_new_tokens=4)
        ids = [b.add(prompt, seed=i) for i in range(3)]
        for _ in b:
            pass
        n_prompt = b.n_prompt_tokens(ids[0])
        # the first prefills, the others copy all but the last prompt token
        assert [b.n_cached(i) for i in ids] == [0, n_prompt - 1, n_prompt - 1]


def test_generate_batch_and_map_generate_n(real_model):
    with llamagen.Context(real_model, n_ctx=2048, n_seq_max=4, kv_unified=True) as ctx:
        out = llamagen.generate_batch(ctx, ["Hello", "The sky is"], n=3, max_new_tokens=6,
                                      temp=1.0, seed=9)
        assert len(out) == 2 and all(len(row) == 3 and len(set(row)) == 3 for row in out)
        comps = llamagen.generate_batch(ctx, ["Hello"], n=2, max_new_tokens=6, temp=1.0, seed=9,
                                        return_logprobs=True)[0]
        assert [c.seed for c in comps] == [9, 10] and all(c.logprobs for c in comps)
        res = list(llamagen.map_generate(ctx, ["Hello", "The sky is", [2] * 3000], n=2, max_new_tokens=6,
                                         temp=1.0, seed=9))
        assert [r.ok for r in res] == [True, True, False]
        for r in res[:2]:
            assert len(r.choices) == 2 and r.text == r.choices[0].text
            assert r.choices[0].text != r.choices[1].text


@pytest.mark.parametrize("bad", [0, -1, 129, 1.0, True])
def test_bad_n(real_ctx, bad):
    with pytest.raises(ValueError, match="n must be"):
        llamagen.generate(real_ctx, "x", n=bad)
    with pytest.raises(ValueError, match="n must be"):
        llamagen.generate_batch(real_ctx, ["x"], n=bad)
