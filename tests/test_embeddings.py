"""Embeddings: the same vectors as llama.cpp's llama-embedding, packing, pooling, normalization."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import llamagen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "A journey of a thousand miles begins with a single step.",
         "Paris is the capital of France.",
         "colourless green ideas sleep furiously",
         "To be, or not to be, that is the question."]


def cos(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def llama_embedding_exe() -> str:
    sys.path.insert(0, os.path.join(ROOT, "bench", "native"))
    from build import llama_tool
    return llama_tool("llama-embedding")


def reference(model_path, texts, pooling, normalize=2):
    """Vectors from llama.cpp's own llama-embedding (the texts one per line).

    Its output goes through common_log's worker thread, which the process may end while that
    thread still writes: the JSON sometimes comes back cut short (measured: about half the runs
    on the tiny model).  Unbuffered stdout and a retry until the JSON is whole."""
    data = llama_embedding_json(model_path, "\n".join(texts), "--pooling", pooling,
                                "--embd-normalize", str(normalize), "-c", "2048")
    assert len(data) == len(texts)
    return np.array(data, np.float32)


def llama_embedding_json(model_path, prompt, *args):
    """The "embedding" arrays llama-embedding prints as JSON for ``prompt``, in input order."""
    unbuffered = ["stdbuf", "-o0"] if shutil.which("stdbuf") else []
    cmd = [*unbuffered, llama_embedding_exe(), "-m", str(model_path), "-p", prompt,
           "--embd-output-format", "json", "-t", "2", *args]
    for _ in range(15):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        try:
            data = json.loads(out.stdout[out.stdout.index("{"):])["data"]
        except ValueError:
            continue
        return [d["embedding"] for d in sorted(data, key=lambda d: d["index"])]
    raise AssertionError("llama-embedding never printed whole JSON: " + out.stdout[-500:])


@pytest.fixture(scope="module")
def tiny_embed_ctx(tiny_model):
    with llamagen.Context(tiny_model, n_ctx=512, n_batch=512, n_seq_max=8, embeddings=True,
                          pooling="mean", n_threads=1) as ctx:
        yield ctx


@pytest.fixture(scope="module")
def real_embed_ctx(real_model):
    with llamagen.Context(real_model, n_ctx=2048, n_batch=2048, n_seq_max=16, embeddings=True,
                          pooling="mean") as ctx:
        yield ctx


# -- the same vectors as llama.cpp -----------------------------------------------------------------

def test_tiny_model_matches_llama_embedding(tiny_model, tiny_model_path, tiny_embed_ctx):
    ours = llamagen.embed(tiny_embed_ctx, TEXTS)
    ref = reference(tiny_model_path, TEXTS, "mean")
    assert ours.shape == ref.shape == (len(TEXTS), tiny_model.n_embd)
    assert ours.dtype == np.float32
    for a, b in zip(ours, ref):
        assert cos(a, b) >= 0.9999


@pytest.mark.real_model
@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
def test_real_model_matches_llama_embedding(real_model, real_model_path, pooling):
    with llamagen.Context(real_model, n_ctx=2048, n_batch=2048, n_seq_max=8, embeddings=True,
                          pooling=pooling) as ctx:
        assert ctx.pooling == pooling
        ours = llamagen.embed(ctx, TEXTS)
    ref = reference(real_model_path, TEXTS, pooling)
    assert ours.shape == (len(TEXTS), real_model.n_embd_out)
    for a, b in zip(ours, ref):
        assert cos(a, b) >= 0.9999


def test_batched_equals_one_by_one_tiny(tiny_embed_ctx):
    together = llamagen.embed(tiny_embed_ctx, TEXTS * 4)           # 20 texts: several per decode
    alone = np.stack([llamagen.embed(tiny_embed_ctx, [t])[0] for t in TEXTS])
    for i, v in enumerate(together):
        assert cos(v, alone[i % len(TEXTS)]) >= 0.9999


def test_texts_longer_than_a_pack_go_alone(tiny_model):
    # a decode packs up to 512 tokens (EMBED_PACK_TOKENS); a longer text takes a decode of its
    # own, up to n_batch, and the texts around it are packed as usual: the same vectors
    long = " ".join(["river stone cloud"] * 60)
    assert 512 < len(tiny_model.tokenize(long)) <= 2048
    texts = TEXTS[:2] + [long] + TEXTS * 30 + [long, long] + TEXTS[2:]
    with llamagen.Context(tiny_model, n_ctx=2048, n_batch=2048, n_seq_max=16, embeddings=True,
                          pooling="mean", n_threads=1) as ctx:
        together = llamagen.embed(ctx, texts)
        alone = {t: llamagen.embed(ctx, [t])[0] for t in set(texts)}
    for t, v in zip(texts, together):
        assert cos(v, alone[t]) >= 0.9999


@pytest.mark.real_model
@pytest.mark.parametrize("pooling", ["mean", "last", "none"])
def test_hidden_state_tap_skips_the_head_and_keeps_the_vectors(real_model, real_model_path,
                                                                 pooling):
    # a context's first decode runs llama.cpp's whole graph and checks that pooling the final
    # hidden states gives its vectors; later decodes stop at the hidden states (no lm_head)
    # (one decode of the five texts, as test_real_model_matches_llama_embedding packs them)
    texts = TEXTS
    with llamagen.Context(real_model, n_ctx=2048, n_batch=2048, n_seq_max=8, embeddings=True,
                          pooling=pooling) as ctx:
        assert ctx._tap_state == 0
        first = llamagen.embed(ctx, texts)
        assert ctx._tap_state == 1
        tapped = llamagen.embed(ctx, texts)           # the graph stops before the lm_head
        ctx._tap_state = -1                           # llama.cpp's whole graph and pooling
        whole = llamagen.embed(ctx, texts)
        assert ctx._tap_state == -1
    if pooling == "none":
        for a, b, c in zip(first, tapped, whole):
            assert a.shape == b.shape == c.shape
            assert np.array_equal(a, b)
            assert all(cos(x, y) >= 0.99999 for x, y in zip(b, c))
        return
    assert np.array_equal(first, tapped)
    assert all(cos(b, c) >= 0.99999 for b, c in zip(tapped, whole))
    ref = reference(real_model_path, TEXTS, pooling)
    assert all(cos(a, b) >= 0.9999 for a, b in zip(tapped, ref))


@pytest.mark.real_model
def test_batched_agrees_with_one_by_one_real(real_embed_ctx, real_model_path):
    # llama.cpp is not batch-invariant: on gemma3 Q4_K_M a batch of ~100+ tokens takes other
    # matmul kernels, and llama-embedding itself gives cosine 0.9985-0.9995 between a text
    # embedded in a 20-text batch and alone (measured).  Agreement, then; identity with
    # llama-embedding for the same packing is the test above.
    together = llamagen.embed(real_embed_ctx, TEXTS * 4)
    alone = np.stack([llamagen.embed(real_embed_ctx, [t])[0] for t in TEXTS])
    for i, v in enumerate(together):
        assert cos(v, alone[i % len(TEXTS)]) >= 0.998
    ref = np.stack([reference(real_model_path, [t], "mean")[0] for t in TEXTS[:2]])
    assert all(cos(a, b) >= 0.9999 for a, b in zip(alone, ref))      # alone: as llama.cpp alone
    # distinct texts give distinct vectors
    assert cos(alone[0], alone[2]) < 0.99


@pytest.mark.real_model
def test_packing_respects_n_batch_and_n_seq_max(real_model):
    # 2 sequences per decode at most, 64 tokens per decode: many decodes, the same vectors
    texts = [f"Sentence number {i} is about {w}." for i, w in enumerate(["cats", "dogs", "rain"] * 4)]
    with llamagen.Context(real_model, n_ctx=256, n_batch=64, n_seq_max=2, embeddings=True,
                          pooling="mean") as small:
        a = llamagen.embed(small, texts)
    with llamagen.Context(real_model, n_ctx=2048, n_batch=2048, n_seq_max=16, embeddings=True,
                          pooling="mean") as big:
        b = llamagen.embed(big, texts)
    # (different batch shapes: agreement, see test_batched_agrees_with_one_by_one_real)
    assert all(cos(x, y) >= 0.998 for x, y in zip(a, b))


# -- normalization and pooling -----------------------------------------------------------------------

def test_normalization_options(tiny_embed_ctx):
    raw = llamagen.embed(tiny_embed_ctx, TEXTS, normalize=False)
    l2 = llamagen.embed(tiny_embed_ctx, TEXTS)
    assert np.allclose(np.linalg.norm(l2, axis=1), 1.0, atol=1e-5)
    assert np.allclose(l2, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    l1 = llamagen.embed(tiny_embed_ctx, TEXTS, normalize="l1")
    assert np.allclose(np.abs(l1).sum(axis=1), 1.0, atol=1e-4)
    mx = llamagen.embed(tiny_embed_ctx, TEXTS, normalize="max")
    assert np.allclose(np.abs(mx).max(axis=1), 32760.0, rtol=1e-5)
    p3 = llamagen.embed(tiny_embed_ctx, TEXTS, normalize=3)
    assert np.allclose((np.abs(p3.astype(np.float64)) ** 3).sum(axis=1), 1.0, atol=1e-4)
    for bad in ("l3", 0, -2, 1.5, "L2"):
        with pytest.raises(ValueError, match="normalize"):
            llamagen.embed(tiny_embed_ctx, TEXTS, normalize=bad)


def test_pooling_none_gives_token_vectors(tiny_model):
    with llamagen.Context(tiny_model, n_ctx=512, n_batch=512, n_seq_max=4, embeddings=True,
                          pooling="none", n_threads=1) as ctx:
        rows = llamagen.embed(ctx, TEXTS[:3], normalize=False)
        assert ctx.pooling == "none"
    with llamagen.Context(tiny_model, n_ctx=512, n_batch=512, n_seq_max=4, embeddings=True,
                          pooling="mean", n_threads=1) as ctx:
        mean = llamagen.embed(ctx, TEXTS[:3], normalize=False)
    with llamagen.Context(tiny_model, n_ctx=512, n_batch=512, n_seq_max=4, embeddings=True,
                          pooling="last", n_threads=1) as ctx:
        last = llamagen.embed(ctx, TEXTS[:3], normalize=False)
    for t, r, m, la in zip(TEXTS, rows, mean, last):
        assert r.shape == (len(tiny_model.tokenize(t)), tiny_model.n_embd)
        assert cos(r.mean(axis=0), m) >= 0.9999          # mean pooling = mean of the token rows
        assert cos(r[-1], la) >= 0.9999                    # last pooling = the last token's row


def test_map_embed_streams_in_order(tiny_embed_ctx):
    texts = [f"text number {i}" for i in range(11)]
    whole = llamagen.embed(tiny_embed_ctx, texts)
    got = list(llamagen.map_embed(tiny_embed_ctx, iter(texts), batch_size=3))
    assert len(got) == 11 and all(cos(a, b) >= 0.9999 for a, b in zip(got, whole))
    with pytest.raises(TypeError, match="item 7"):
        list(llamagen.map_embed(tiny_embed_ctx, texts[:7] + [None], batch_size=3))
    with pytest.raises(ValueError, match="batch_size"):
        list(llamagen.map_embed(tiny_embed_ctx, texts, batch_size=0))


def test_truncation_and_too_long_texts(tiny_embed_ctx):
    long = "word " * 2000
    with pytest.raises(llamagen.PromptTooLongError, match=r"text 1 has \d+ tokens"):
        llamagen.embed(tiny_embed_ctx, ["short", long])
    r = llamagen.embed(tiny_embed_ctx, ["short", long], truncate=True, details=True)
    assert r.truncated == [False, True] and r.n_tokens[1] == 512
    assert r.vectors.shape[0] == 2 and r.total_tokens == sum(r.n_tokens)


def test_bad_input(tiny_model, tiny_embed_ctx):
    with pytest.raises(ValueError, match="empty"):
        llamagen.embed(tiny_embed_ctx, [])
    with pytest.raises(TypeError, match="list of texts"):
        llamagen.embed(tiny_embed_ctx, "one text")
    with pytest.raises(TypeError, match="text 1"):
        llamagen.embed(tiny_embed_ctx, ["ok", 5])
    with pytest.raises(ValueError, match="text 0"):
        llamagen.embed(tiny_embed_ctx, [[]])
    with pytest.raises(ValueError, match="text 0"):
        llamagen.embed(tiny_embed_ctx, [[10**9]])
    with llamagen.Context(tiny_model, n_ctx=256, n_threads=1) as gen_ctx:
        with pytest.raises(llamagen.ContextError, match="embeddings=True"):
            llamagen.embed(gen_ctx, ["x"])
        assert gen_ctx.pooling is None
    with pytest.raises(llamagen.ContextError, match="embeddings"):
        llamagen.generate(tiny_embed_ctx, "x", max_new_tokens=2)
    with pytest.raises(llamagen.ContextError, match="embeddings"):
        llamagen.BatchGenerator(tiny_embed_ctx)
    with pytest.raises(llamagen.ContextError, match="embeddings"):
        llamagen.score(tiny_embed_ctx, ["x y"])
    for pooling in ("rank", "avg", 1):
        with pytest.raises(ValueError, match="pooling"):
            llamagen.Context(tiny_model, embeddings=True, pooling=pooling)
    with pytest.raises(ValueError, match="pooling"):
        llamagen.Context(tiny_model, pooling="mean")
    # llama.cpp would abort the process on these
    with pytest.raises(ValueError, match="multiple of n_seq_max"):
        llamagen.Context(tiny_model, n_ctx=256, n_batch=256, n_seq_max=3, embeddings=True)
    with pytest.raises(ValueError, match="kv_unified"):
        llamagen.Context(tiny_model, n_seq_max=2, embeddings=True, kv_unified=False)


def test_engine_embeds_on_its_thread(tiny_model, tiny_embed_ctx):
    import asyncio
    with llamagen.AsyncEngine(tiny_model, n_ctx=512, n_parallel=2, n_threads=1, embeddings=True,
                              pooling="mean", embed_batch=512) as eng:
        r = eng.embed_sync(TEXTS)
        ref = llamagen.embed(tiny_embed_ctx, TEXTS)
        assert all(cos(a, b) >= 0.9999 for a, b in zip(r.vectors, ref))
        assert r.n_tokens == [len(tiny_model.tokenize(t)) for t in TEXTS]

        async def both():
            gen = asyncio.ensure_future(eng.generate("hello", max_new_tokens=8))
            emb = await eng.embed(["hello", "world"])
            return await gen, emb
        res, emb = asyncio.run(both())
        assert res.choices[0].finish_reason is not None and emb.vectors.shape[0] == 2
        with pytest.raises(llamagen.PromptTooLongError, match="text 0"):
            eng.embed_sync(["word " * 2000])
    with llamagen.AsyncEngine(tiny_model, n_ctx=256, n_parallel=1, n_threads=1) as eng:
        assert not eng.embeddings
        with pytest.raises(llamagen.LlamaError, match="embeddings=True"):
            eng.embed_sync(["x"])
        with pytest.raises(llamagen.LlamaError, match="embeddings=True"):
            eng.rerank_sync("q", ["x"])
    with llamagen.AsyncEngine(tiny_model, n_ctx=256, n_parallel=1, n_threads=1, embeddings=True,
                              pooling="mean", embed_batch=256) as eng:
        assert eng.embeddings and not eng.reranks
        with pytest.raises(ValueError, match="pooling='rank'"):
            eng.rerank_sync("q", ["x"])


# -- rerankers (pooling "rank") -------------------------------------------------------------------

RERANK_TEMPLATE = "Query: {query} Document: {document}"
DOCS = ["the doc is here", "nothing", "a cat sat on the mat", "rivers and hills", "hello world"]


@pytest.fixture(scope="module")
def reranker_path(make_tiny_model):
    # shaped like llama.cpp's conversion of Qwen3-Reranker: a two-label head ("yes", "no") that
    # llama.cpp softmaxes, rank pooling in the GGUF, a "rerank" template, no BOS
    return make_tiny_model(arch="qwen3", cls_labels=["yes", "no"], pooling=4, add_bos=False,
                           rerank_template=RERANK_TEMPLATE)


def rerank_reference(model_path, query, docs, n_labels):
    """Head outputs from llama-embedding --pooling rank (pairs as 'query<TAB>document' lines).
    It prints n_embd values per pair, only the first n_labels of which are the head's."""
    data = llama_embedding_json(model_path, "\n".join(f"{query}\t{d}" for d in docs),
                                "--pooling", "rank", "--embd-normalize", "-1", "-c", "512")
    assert len(data) == len(docs)
    return np.array([row[:n_labels] for row in data], np.float32)


def test_rerank_matches_llama_embedding(reranker_path):
    with llamagen.Model(reranker_path) as model, \
            llamagen.Context(model, n_ctx=512, n_batch=512, n_seq_max=8, embeddings=True) as ctx:
        assert ctx.pooling == "rank"                      # the GGUF's own pooling
        scores = llamagen.rerank(ctx, "hello world", DOCS)
        d = llamagen.rerank(ctx, "hello world", DOCS, details=True)
        with pytest.raises(ValueError, match="llamagen.rerank"):
            llamagen.embed(ctx, DOCS)
        with pytest.raises(ValueError, match="llamagen.rerank"):
            list(llamagen.map_embed(ctx, DOCS))
    ref = rerank_reference(reranker_path, "hello world", DOCS, 2)
    assert scores.dtype == np.float32 and scores.shape == (len(DOCS),)
    assert d.vectors.shape == (len(DOCS), 2)
    np.testing.assert_allclose(d.vectors, ref, atol=1e-6)
    np.testing.assert_allclose(d.vectors.sum(axis=1), 1.0, atol=1e-6)     # llama.cpp's softmax
    assert np.array_equal(scores, d.vectors[:, 0])          # the first label, as llama-server
    assert len(set(np.round(scores, 4).tolist())) == len(DOCS)


def test_engine_reranks_on_its_thread(reranker_path):
    import asyncio
    with llamagen.Model(reranker_path) as model:
        with llamagen.Context(model, n_ctx=256, n_batch=256, n_seq_max=64, embeddings=True) as ctx:
            ref = llamagen.rerank(ctx, "hello world", DOCS)
        with llamagen.AsyncEngine(model, n_ctx=512, n_parallel=2, n_threads=1, embeddings=True,
                                  pooling="rank", embed_batch=256) as eng:
            assert eng.reranks
            r = asyncio.run(eng.rerank("hello world", DOCS))
            assert np.allclose(r.vectors[:, 0], ref, atol=1e-6)
            assert eng.rerank_sync("hello world", DOCS[:2]).vectors.shape == (2, 2)
            with pytest.raises(ValueError, match="rerank"):
                eng.embed_sync(["x"])
            with pytest.raises(TypeError, match=r"documents\[0\]"):
                eng.rerank_sync("q", [None])


def test_rerank_pair_format_without_template(make_tiny_model):
    # no "rerank" template: [BOS] query [EOS] [SEP] document [EOS] where the vocabulary adds
    # them (this vocabulary adds only BOS), query and document tokenized apart (llama-server)
    path = make_tiny_model(arch="qwen3", cls_labels=["relevant"], pooling=4)
    with llamagen.Model(path) as model:
        toks = llamagen._core._rerank_tokens(model, "hello there", "the world")
        assert toks == ([model.bos] + model.tokenize("hello there", add_special=False)
                        + model.tokenize("the world", add_special=False))
        with llamagen.Context(model, n_ctx=256, n_batch=256, n_seq_max=4, embeddings=True,
                              pooling="rank") as ctx:
            d = llamagen.rerank(ctx, "hello there", ["the world", "x"], details=True)
            alone = llamagen.rerank(ctx, "hello there", ["the world"])
    assert d.n_tokens[0] == len(toks) and d.vectors.shape == (2, 1)
    assert abs(float(alone[0]) - float(d.vectors[0, 0])) < 1e-5


def test_rerank_bad_input(tiny_model, tiny_embed_ctx, reranker_path):
    with pytest.raises(ValueError, match="needs a reranker"):
        llamagen.Context(tiny_model, n_ctx=256, n_batch=256, n_seq_max=2, embeddings=True,
                         pooling="rank")
    with pytest.raises(ValueError, match="pooling='rank'"):
        llamagen.rerank(tiny_embed_ctx, "q", ["d"])
    with llamagen.Model(reranker_path) as model, \
            llamagen.Context(model, n_ctx=64, n_batch=64, n_seq_max=2, embeddings=True) as ctx:
        with pytest.raises(ValueError, match="empty"):
            llamagen.rerank(ctx, "q", [])
        with pytest.raises(TypeError, match="list of texts"):
            llamagen.rerank(ctx, "q", "one document")
        with pytest.raises(TypeError, match=r"documents\[1\]"):
            llamagen.rerank(ctx, "q", ["fine", 3])
        with pytest.raises(TypeError, match="query"):
            llamagen.rerank(ctx, b"q", ["d"])
        long = " ".join(["word"] * 100)
        with pytest.raises(llamagen.PromptTooLongError, match="text 1"):
            llamagen.rerank(ctx, "q", ["short", long])
        r = llamagen.rerank(ctx, "q", ["short", long], truncate=True, details=True)
        assert r.truncated == [False, True] and r.n_tokens[1] == 64
