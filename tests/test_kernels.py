"""Our CPU kernels (patches under third_party/) against the ones they replace, bit for bit."""
from __future__ import annotations

import pytest

import llamagen
from script_util import run_script
from tiny_gguf import QUANTIZABLE, write_tiny_gguf

# a batch's decodes at several row counts (the prompts' prefills, then steps of 2-12 rows: full
# tiles and every remainder), every token and top-3 logprob as exact floats.  gemma3's Q4_K_M has
# Q8_0 (its 262k-row output matrix) and Q5_0 (its 640-wide rows) weights, SmolLM2's Q4_1 layers
# and a Q8_0 output matrix
_BATCHES = """
import hashlib, struct
model = llamagen.Model(MODEL)
prompts = [f"Rewrite the line below in capitals.\\n\\nLine {i}: the {w} sat on the mat, and then "
           f"it rained for {i + 2} days over the town." for i, w in enumerate(
               ["cat", "dog", "bird", "fox", "cow", "owl", "bee", "ant", "elk", "yak", "emu", "eel"])]
for size in (2, 3, 5, 7, 9, 12):
    ctx = llamagen.Context(model, n_ctx=size * 256, n_seq_max=size, kv_unified=True, n_threads=2)
    h = hashlib.md5()
    for r in llamagen.map_generate(ctx, prompts[:size], batch_size=size, max_new_tokens=6,
                                   logprobs=3, temp=0):
        h.update(str(r.tokens).encode())
        for lp in r.logprobs:
            h.update(struct.pack("f", lp.logprob))
            for t in lp.top:
                h.update(struct.pack("if", t.token, t.logprob))
    print("SIZE", size, h.hexdigest())
    ctx.close()
# exact speculative verification: its many-row decodes take the one-row kernels (patch 0009's
# for Q8_0, Q5_0, Q4_0 and Q4_1 on AVX-512 VNNI, vec_dot's with the reference switch)
ctx = llamagen.Context(model, n_ctx=1024, n_threads=2)
spec = llamagen.Speculative(type="ngram-simple", ngram_n=2, ngram_m=8, n_max=8, adaptive=False)
st = llamagen.gen_begin(ctx, prompts[0] + " " + prompts[0], max_new_tokens=48, temp=0, logprobs=3,
                        speculative=spec, ignore_eos=True)
"".join(st)
st.end()
h = hashlib.md5(str(st.tokens).encode())
for lp in st.logprobs:
    h.update(struct.pack("f", lp.logprob))
    for t in lp.top:
        h.update(struct.pack("if", t.token, t.logprob))
print("STREAM", h.hexdigest())
print("DRAFTED", st.speculative_stats["drafted"])
"""


def _hashes(model_path, env):
    rc, out = run_script(_BATCHES, env_extra=env, MODEL=str(model_path))
    assert rc == 0, out
    lines = out.splitlines()
    drafted = next(int(x.split()[1]) for x in lines if x.startswith("DRAFTED "))
    assert drafted > 0                  # (the stream's verify decodes had several rows)
    return [x for x in lines if x.startswith(("SIZE ", "STREAM "))]


@pytest.fixture(scope="module")
def tiny_quantized(tmp_path_factory):
    """tiny_quantized(type) -> a tiny model with every weight in ``type`` (pure: not the default
    mix), for the types no real model here has."""
    folder = tmp_path_factory.mktemp("kernels")
    src = write_tiny_gguf(folder / "src.gguf", seed=7, **QUANTIZABLE)

    def make(ftype):
        dst = folder / f"{ftype}.gguf"
        if not dst.exists():
            llamagen.quantize(src, dst, ftype, pure=True)
        return dst
    return make


@pytest.mark.parametrize("which", ["gemma3", "smollm2", "Q4_0", "IQ4_NL"])
def test_many_row_products_equal_the_reference_kernels_bit_for_bit(request, which):
    # patch 0009: with AVX-512 VNNI, llamafile's Q8_0/Q5_0/Q4_0 products go through lg_matmul and
    # Q4_1 through lgQ41, in batches and in exact verification's one-row mode; with
    # LLAMAGEN_TINYBLAS_REF=1, through llamafile's mnpack and ggml's vec_dot (without AVX-512
    # VNNI both runs take those).  tests/test_speculative.py checks exact verification against
    # plain decoding too
    if which in ("gemma3", "smollm2"):
        path = request.getfixturevalue("real_model_path" if which == "gemma3" else "smollm2_path")
    else:
        path = request.getfixturevalue("tiny_quantized")(which)
    ref = _hashes(path, {"LLAMAGEN_TINYBLAS_REF": "1"})
    ours = _hashes(path, {})
    assert len(ref) == 7
    assert ours == ref


# attention over a unified cache of several sequences: prompts of 9-150 tokens join running
# sequences (prefill chunks of 64+ rows take the tiled kernel, decode rows the one-row one), in a
# plain batch, a batch-invariant context (the canonical kernel) and a batch verifying exact drafts
# (one-row mode).  Every row's mask is mostly other sequences' cells.
_ATTENTION = """
import hashlib, struct
model = llamagen.Model(MODEL)
words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
prompts = [" ".join(f"{words[(i * 5 + j) % 12]} {(i * 13 + j) % 37}" for j in range(3 + 12 * i))
           for i in range(12)]
def digest(results):
    h = hashlib.md5()
    for r in results:
        h.update(str(r.tokens).encode())
        for lp in r.logprobs:
            h.update(struct.pack("f", lp.logprob))
            for t in lp.top:
                h.update(struct.pack("if", t.token, t.logprob))
    return h.hexdigest()
for label, kw in (("plain", {}), ("invariant", {"deterministic": True})):
    ctx = llamagen.Context(model, n_ctx=4096, n_seq_max=6, kv_unified=True, n_threads=2, **kw)
    print(label.upper(), digest(llamagen.map_generate(ctx, prompts, batch_size=6, max_new_tokens=12,
                                                      logprobs=3, temp=0)))
    ctx.close()
ctx = llamagen.Context(model, n_ctx=4096, n_seq_max=6, kv_unified=True, n_threads=2)
spec = llamagen.Speculative(type="ngram-simple", ngram_n=2, ngram_m=8, n_max=6, adaptive=False)
stats = {}
print("EXACT", digest(llamagen.map_generate(ctx, [p + " . " + p for p in prompts[2:8]], batch_size=6,
                                            max_new_tokens=24, logprobs=3, temp=0, ignore_eos=True,
                                            speculative=spec, stats=stats)))
print("DRAFTED", stats["accepted_draft_tokens"])
"""


@pytest.mark.parametrize("which", ["gemma3", "smollm2"])
def test_attention_mask_scan_equals_the_reference_bit_for_bit(request, which):
    # patch 0010: flash attention skips the -inf mask entries (other sequences' cells, the causal
    # future) 32 at a time; LLAMAGEN_FA_MASK_REF=1 tests each entry as llama.cpp does.  gemma3's
    # sliding-window layers mask more than causality
    path = request.getfixturevalue("real_model_path" if which == "gemma3" else "smollm2_path")
    runs = []
    for env in ({"LLAMAGEN_FA_MASK_REF": "1"}, {}):
        rc, out = run_script(_ATTENTION, env_extra=env, MODEL=str(path))
        assert rc == 0, out
        lines = out.splitlines()
        assert int(next(x for x in lines if x.startswith("DRAFTED ")).split()[1]) > 0
        runs.append([x for x in lines if x.startswith(("PLAIN ", "INVARIANT ", "EXACT "))])
    assert len(runs[0]) == 3
    assert runs[1] == runs[0]


def test_many_sequences_on_a_unified_cache_decode_as_on_their_own_streams(smollm2_model):
    # patch 0010: on a unified cache a tile of the tiled attention kernel holds one sequence's
    # rows, and a sequence's few rows (a decode row, a short prompt) take the one-row kernel, as
    # on per-sequence KV streams, where each stream's rows are alone.  SmolLM2's products give a
    # row the same bits whatever rows are beside it, so 64 sequences decoding together agree with
    # the streams (here 64 of 64; 44 when the tiles mixed every sequence's rows)
    animals = "cat dog bird fox cow owl bee ant elk yak emu eel".split()
    prompts = [f"Write one sentence about a {animals[i % 12]} named {chr(65 + i % 26)}{i}."
               for i in range(64)]
    texts = {}
    for unified in (True, False):
        ctx = llamagen.Context(smollm2_model, n_ctx=64 * 96, n_seq_max=64, kv_unified=unified,
                               n_threads=2)
        try:
            texts[unified] = [r.tokens for r in llamagen.map_generate(
                ctx, prompts, batch_size=64, max_new_tokens=12, temp=0, ignore_eos=True)]
        finally:
            ctx.close()
    assert all(len(t) == 12 for t in texts[True])
    same = sum(a == b for a, b in zip(texts[True], texts[False]))
    assert same >= 60, f"{same} of 64 texts as on per-sequence streams"


def test_engine_and_stream_agree_on_prompts_the_tiles_split(smollm2_model):
    # patch 0010: a sequence's rows take the tiled kernel when it has Q_TILE_SZ (64) or more in
    # the ubatch, else the one-row kernel, however the threads' chunks cut them, and its KV tiles
    # start at its first cell.  Deciding per chunk sent a prompt's last few rows in a chunk to the
    # one-row kernel (5 of 6 of bench/speculative.py's prompts then gave the engine another text
    # than a stream); cutting KV tiles from cell 0 made the engine, whose idle caches hold the
    # earlier prompts' cells in front of this one's, differ from a stream at 252 tokens
    words = "river stone lamp garden window letter silver morning harbor candle".split()
    prompts = [" ".join(f"{words[(i * 3 + j) % 10]} {j % 17}" for j in range(40 + 17 * i)) + "."
               for i in range(5)]
    ctx = llamagen.Context(smollm2_model, n_ctx=2048, n_threads=2)
    eng = llamagen.AsyncEngine(smollm2_model, n_ctx=4096, n_parallel=4, n_threads=2)
    try:
        for p in prompts:
            st = llamagen.gen_begin(ctx, p, max_new_tokens=24, temp=0, ignore_eos=True)
            "".join(st)
            st.end()
            res = eng.generate_sync(p, max_new_tokens=24, temp=0, ignore_eos=True)
            assert res.choices[0].tokens == st.tokens, len(smollm2_model.tokenize(p))
    finally:
        eng.close()
        ctx.close()
