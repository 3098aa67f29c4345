"""LoRA adapters and control vectors (issue 30): loading and refusing files, per-request sets in
generate / streams / batches / the engine, batches of mixed sets, the prompt cache keyed by set,
and the same text as llama-server with the same adapter and scale."""
from __future__ import annotations

import asyncio
import gc
import os
import pickle

import pytest

import llamagen
from llamagen import AdapterLoadError, ControlVector, LoraAdapter
from llamagen._gguf import read_gguf
from server_util import post_json, running_llama_server
from tiny_gguf import tiny_lora_shapes, write_control_vector, write_lora

P = "hello world the"
GREEDY = dict(max_new_tokens=16, temp=0)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_path):
    d = tmp_path_factory.mktemp("adapters")
    return {
        "a": write_lora(d / "a.gguf", tiny_lora_shapes(), seed=1, task_name="upper",
                        alora_tokens=[5, 6]),
        "b": write_lora(d / "b.gguf", tiny_lora_shapes(targets=("attn_k", "ffn_up")), seed=2),
        "cv": write_control_vector(d / "cv.gguf", scale=3.0),
        "dir": d,
    }


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def ad(model, files):
    return LoraAdapter(model, files["a"]), LoraAdapter(model, files["b"])


@pytest.fixture
def ctx(model):
    with llamagen.Context(model, n_ctx=1024, n_seq_max=4, kv_unified=True) as c:
        yield c


def _gen(ctx, **kw):
    return llamagen.generate(ctx, P, **GREEDY, **kw)


# -- the adapter objects -------------------------------------------------------------------------

def test_adapter_reads_its_metadata_and_alora_tokens(ad, files):
    a, b = ad
    assert a.path == str(files["a"]) and a.task_name == "upper" and a.prompt_prefix == ""
    assert a.alpha == 8.0 and a.metadata["adapter.type"] == "lora"
    assert a.alora_invocation_tokens == (5, 6) and b.alora_invocation_tokens == ()
    assert "LoraAdapter" in repr(a)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(a)


def test_a_lora_changes_the_text_and_scale_zero_is_the_base_model(ctx, ad):
    a, b = ad
    base = _gen(ctx)
    with_a, with_b = _gen(ctx, lora={a: 1.0}), _gen(ctx, lora=[(b, 1.0)])
    assert len({base, with_a, with_b}) == 3
    assert _gen(ctx, lora={a: 0.0}) == base                  # a zero scale leaves it out
    assert _gen(ctx, lora={a: 0.5}) != with_a                # the scale matters
    assert _gen(ctx, lora=a) == with_a                       # one adapter: scale 1
    assert _gen(ctx, lora={a: 1.0, b: 1.0}) not in (with_a, with_b)
    assert _gen(ctx) == base                                  # nothing stays applied


def test_the_context_default_and_a_requests_own_set(ctx, ad):
    a, b = ad
    base, with_a, with_b = _gen(ctx), _gen(ctx, lora={a: 1.0}), _gen(ctx, lora={b: 1.0})
    ctx.set_adapters({a: 1.0})
    assert ctx.adapters == {a: 1.0}
    assert _gen(ctx) == with_a                               # None: the default
    assert _gen(ctx, lora={}) == base                        # (): the base model
    assert _gen(ctx, lora={b: 1.0}) == with_b                # its own set replaces the default
    ctx.set_adapters({a: 1.0})                               # idempotent
    assert _gen(ctx) == with_a
    ctx.set_adapters(None)
    assert ctx.adapters == {} and _gen(ctx) == base


def test_a_stream_with_a_lora_equals_generate(ctx, ad):
    a, _ = ad
    want = _gen(ctx, lora={a: 1.0})
    st = llamagen.gen_begin(ctx, P, **GREEDY, lora={a: 1.0})
    assert "".join(st) + st.end() == want


def test_a_batch_of_mixed_sets_gives_each_sequence_its_own_text(ctx, ad):
    a, b = ad
    sets = [None, {a: 1.0}, {b: 1.0}, {a: 1.0}, {}, {a: 0.5, b: 1.0}]
    alone = [_gen(ctx, lora=s) for s in sets]
    assert len(set(alone)) == 4
    bg = llamagen.BatchGenerator(ctx, **GREEDY)
    ids = [bg.add(P, lora=s) for s in sets]
    out = {i: "" for i in ids}
    for sid, chunk in bg:
        out[sid] += chunk
    assert [out[i] for i in ids] == alone
    # four sets in four slots: every step decodes each set once (the applied one first)
    assert bg.n_lora_switches >= 3


def test_map_generate_takes_a_lora_per_prompt(ctx, ad):
    a, _ = ad
    want = [_gen(ctx), _gen(ctx, lora={a: 1.0})]
    items = [P, {"prompt": P, "lora": {a: 1.0}}]
    assert [r.text for r in llamagen.map_generate(ctx, items, **GREEDY)] == want
    # every item's default: the call's lora
    assert [r.text for r in llamagen.map_generate(ctx, [P, P], **GREEDY, lora={a: 1.0})] == \
        [want[1]] * 2


def test_the_prompt_cache_is_kept_per_adapter_set(ctx, ad):
    """A cached prompt's cells were computed with its set: another set must prefill it again
    (else its answer would depend on the earlier request), the same set reuses them."""
    a, _ = ad
    prompt = P + " and a longer prompt so that its prefix is worth caching in the slot"
    alone = {k: llamagen.generate(ctx, prompt, **GREEDY, lora=s) for k, s in
             (("base", {}), ("a", {a: 1.0}))}
    bg = llamagen.BatchGenerator(ctx, n_parallel=1, prompt_cache=True, **GREEDY)

    def run(lora):
        sid = bg.add(prompt, lora=lora)
        text = "".join(c for i, c in bg if i == sid)
        return text, bg.n_cached(sid)

    assert run({a: 1.0}) == (alone["a"], 0)
    text, cached = run({})
    assert text == alone["base"] and cached == 0            # another set: not from the cache
    text, cached = run({})
    assert text == alone["base"] and cached > 10            # the same set: a hit


def test_engine_loads_adapters_and_takes_ids_per_request(model, files):
    base_ctx = llamagen.Context(model, n_ctx=512)
    a = LoraAdapter(model, files["a"])
    want_base, want_a = _gen(base_ctx), _gen(base_ctx, lora={a: 1.0})
    base_ctx.close()

    async def main():
        with llamagen.AsyncEngine(model, n_ctx=1024, n_parallel=2, lora=[files["a"]],
                                  lora_apply=False) as eng:
            assert eng.lora_scales() == [0.0]
            r0 = await eng.generate(P, **GREEDY)
            r1 = await eng.generate(P, **GREEDY, lora={0: 1.0})
            with pytest.raises(ValueError, match="adapter id 3"):
                eng.stream(P, **GREEDY, lora={3: 1.0})
            eng.set_lora_scales({0: 1.0})
            assert eng.lora_scales() == [1.0]
            r2 = await eng.generate(P, **GREEDY)
            return r0.text, r1.text, r2.text

    assert asyncio.run(main()) == (want_base, want_a, want_a)


# -- bad input -----------------------------------------------------------------------------------

def test_bad_adapter_files_are_clear_errors_and_the_model_stays_usable(ctx, files, make_tiny_model,
                                                                        tiny_model_path):
    model = ctx.model
    d = files["dir"]
    want = _gen(ctx)
    with pytest.raises(FileNotFoundError):
        LoraAdapter(model, d / "missing.gguf")
    with pytest.raises(AdapterLoadError, match="directory"):
        LoraAdapter(model, d)
    with pytest.raises(AdapterLoadError, match="not 'adapter'"):
        LoraAdapter(model, tiny_model_path)                   # a model, not an adapter
    (d / "empty.gguf").write_bytes(b"")
    with pytest.raises(AdapterLoadError, match="not a GGUF"):
        LoraAdapter(model, d / "empty.gguf")
    data = files["a"].read_bytes()
    (d / "cut.gguf").write_bytes(data[: len(data) - 200])
    with pytest.raises(AdapterLoadError, match="corrupted or incomplete|truncated"):
        LoraAdapter(model, d / "cut.gguf")
    (d / "head.gguf").write_bytes(data[:300])
    with pytest.raises(AdapterLoadError):
        LoraAdapter(model, d / "head.gguf")
    write_lora(d / "shape.gguf", tiny_lora_shapes(n_embd=32, n_ff=64))
    with pytest.raises(AdapterLoadError, match="incorrect shape"):
        LoraAdapter(model, d / "shape.gguf")
    write_lora(d / "arch.gguf", tiny_lora_shapes(), arch="qwen3")
    with pytest.raises(AdapterLoadError, match="arch"):
        LoraAdapter(model, d / "arch.gguf")
    write_lora(d / "names.gguf", {"blk.7.attn_q.weight": (64, 64)})
    with pytest.raises(AdapterLoadError, match="does not exist in base model"):
        LoraAdapter(model, d / "names.gguf")
    write_lora(d / "rank0.gguf", tiny_lora_shapes(), rank=0)
    with pytest.raises(AdapterLoadError, match="dimension of 0"):
        LoraAdapter(model, d / "rank0.gguf")
    assert _gen(ctx) == want


def test_bad_lora_arguments_name_the_field(ctx, ad, files, make_tiny_model):
    a, _ = ad
    for bad in ("x", {"a": 1.0}, [(a, 1.0, 2)], {a: float("nan")}, {a: 1e39}, 3):
        with pytest.raises(llamagen.InvalidParamError) as e:
            llamagen.SamplingParams(lora=bad)
        assert e.value.field == "lora"
    with pytest.raises(ValueError, match="twice"):
        llamagen.SamplingParams(lora=[(a, 1.0), (a, 2.0)])
    other = llamagen.Model(make_tiny_model(seed=3))
    try:
        foreign = LoraAdapter(other, files["a"])
        with pytest.raises(ValueError, match="another model"):
            _gen(ctx, lora={foreign: 1.0})
        with pytest.raises(ValueError, match="another model"):
            ctx.set_adapters({foreign: 1.0})
        bg = llamagen.BatchGenerator(ctx, **GREEDY)
        with pytest.raises(ValueError, match="another model"):
            bg.add(P, lora={foreign: 1.0})
    finally:
        other.close()
    closed = LoraAdapter(ctx.model, files["a"])
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        _gen(ctx, lora={closed: 1.0})


def test_an_adapter_outliving_its_model_is_refused_and_frees_nothing_twice(files, make_tiny_model):
    m = llamagen.Model(make_tiny_model())
    a = LoraAdapter(m, files["a"])
    c = llamagen.Context(m, n_ctx=256)
    base = llamagen.generate(c, [1, 20, 30], **GREEDY)
    c.set_adapters({a: 1.0})
    adapted = llamagen.generate(c, [1, 20, 30], **GREEDY)
    assert adapted != base
    m.close()                       # deferred: the context still uses the model
    assert llamagen.generate(c, [1, 20, 30], **GREEDY) == adapted      # the adapter still applies
    c.close()                       # now the model (and its adapters) are freed
    with pytest.raises(llamagen.LlamaError, match="model is closed"):
        LoraAdapter(m, files["a"])
    del a, c
    gc.collect()                    # (no double free: the model freed the adapter)


# -- control vectors -----------------------------------------------------------------------------

def test_a_control_vector_steers_and_removing_it_restores_the_base(ctx, files):
    base = _gen(ctx)
    cv = ControlVector(files["cv"])
    assert cv.n_embd == 64 and cv.n_layers == 1
    ctx.set_control_vector(cv)
    steered = _gen(ctx)
    assert steered != base and ctx.control_vector == (cv, 1, 2)
    assert _gen(ctx) == steered
    # two files summed == one file at strength 2
    ctx.set_control_vector(ControlVector([files["cv"], (files["cv"], 1.0)]))
    twice = _gen(ctx)
    ctx.set_control_vector(ControlVector([(files["cv"], 2.0)]))
    assert _gen(ctx) == twice
    ctx.set_control_vector(None)
    assert _gen(ctx) == base and ctx.control_vector is None
    rows = [[0.0] * 64, [0.0] * 64]
    ctx.set_control_vector(ControlVector.from_array(rows), layer_start=1, layer_end=1)
    assert _gen(ctx) == base                                  # a zero vector changes nothing
    ctx.set_control_vector(None)


def test_bad_control_vectors_are_clear_errors(ctx, files, tiny_model_path):
    import gguf
    import numpy as np
    d = files["dir"]
    with pytest.raises(AdapterLoadError, match="no direction"):
        ControlVector(tiny_model_path)

    def write(name, tensors):
        w = gguf.GGUFWriter(str(d / name), "llama")
        for k, v in tensors.items():
            w.add_tensor(k, v)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return d / name

    with pytest.raises(AdapterLoadError, match="layer index"):
        ControlVector(write("l0.gguf", {"direction.0": np.ones(64, np.float32)}))
    with pytest.raises(AdapterLoadError, match="layer index"):
        ControlVector(write("lbig.gguf", {"direction.99999999": np.ones(64, np.float32)}))
    with pytest.raises(AdapterLoadError, match="1-D F32"):
        ControlVector(write("2d.gguf", {"direction.1": np.ones((2, 64), np.float32)}))
    with pytest.raises(AdapterLoadError, match="disagree|no valid"):
        ControlVector(write("mixed.gguf", {"direction.1": np.ones(64, np.float32),
                                           "direction.2": np.ones(32, np.float32)}))
    with pytest.raises(ValueError, match="n_embd 32"):
        ctx.set_control_vector(ControlVector.from_array([[1.0] * 32]))
    cv = ControlVector(files["cv"])
    with pytest.raises(ValueError, match="layer_start"):
        ctx.set_control_vector(cv, layer_start=0)
    with pytest.raises(ValueError, match="layer_end"):
        ctx.set_control_vector(cv, layer_start=2, layer_end=1)
    with pytest.raises(FileNotFoundError):
        ControlVector(d / "nope.gguf")
    assert ctx.control_vector is None


# -- the server, and llama-server's text with the same adapter ----------------------------------

def test_server_lora_routes_and_per_request_sets(tmp_path_factory, model, files, tiny_model_path):
    from server_util import Server
    import httpx
    ctx = llamagen.Context(model, n_ctx=512)
    a = LoraAdapter(model, files["a"])
    b = LoraAdapter(model, files["b"])
    want = {"base": _gen(ctx), "a": _gen(ctx, lora={a: 1.0}), "b.5": _gen(ctx, lora={b: 0.5})}
    ctx.close()
    srv = Server(["--model", tiny_model_path, "--lora", files["a"], "--lora-scaled",
                  f"{files['b']}:0.5", "--lora-init-without-apply", "-c", "1024", "-np", "2"],
                 tmp_path_factory.mktemp("srv") / "lora.log")
    try:
        def complete(**kw):
            r = httpx.post(srv.url + "/v1/completions", json=dict(
                prompt=P, max_tokens=16, temperature=0, **kw), timeout=60)
            return r.status_code, r.json()

        listed = httpx.get(srv.url + "/lora-adapters").json()
        assert [(e["id"], e["scale"], e["task_name"]) for e in listed] == [(0, 0.0, "upper"),
                                                                           (1, 0.0, "")]
        assert listed[0]["alora_invocation_tokens"] == [5, 6]
        assert complete()[1]["choices"][0]["text"] == want["base"]
        assert complete(lora=[{"id": 0, "scale": 1.0}])[1]["choices"][0]["text"] == want["a"]
        assert complete(lora=[{"id": 1, "scale": 0.5}])[1]["choices"][0]["text"] == want["b.5"]
        code, body = complete(lora=[{"id": 7, "scale": 1.0}])
        assert code == 400 and body["error"]["param"] == "lora"
        code, body = complete(lora="zero")
        assert code == 400
        r = httpx.post(srv.url + "/lora-adapters", json=[{"id": 0, "scale": 1.0}])
        assert r.json() == {"success": True}
        assert [e["scale"] for e in httpx.get(srv.url + "/lora-adapters").json()] == [1.0, 0.0]
        assert complete()[1]["choices"][0]["text"] == want["a"]
        # an empty list is no list, as in llama-server: the server's default set
        assert complete(lora=[])[1]["choices"][0]["text"] == want["a"]
        r = httpx.post(srv.url + "/lora-adapters", json={"id": 0})
        assert r.status_code == 400
        r = httpx.post(srv.url + "/lora-adapters", json=[{"id": 9, "scale": 1.0}])
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora"
        # the openai client sends it through extra_body
        import openai
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
        got = client.completions.create(model="m", prompt=P, max_tokens=16, temperature=0,
                                        extra_body={"lora": [{"id": 1, "scale": 0.5}]})
        assert got.choices[0].text == want["b.5"]
    finally:
        assert srv.stop() == 0, srv.log()


def test_serve_refuses_a_bad_adapter_file_at_start(tmp_path, tiny_model_path):
    import subprocess
    import sys
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF nonsense")
    r = subprocess.run([sys.executable, "-m", "llamagen.cli", "serve", "--model", str(tiny_model_path),
                        "--lora", str(bad)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(llamagen.__file__))))
    assert r.returncode == 2 and "could not load adapter" in r.stderr


def _gemma_lora(real_model_path, path, rank=8, scale=0.03):
    """A random low-rank adapter on every attention q/v weight of gemma3 (the real model)."""
    _, _, tensors = read_gguf(real_model_path)
    shapes = {t.name: (t.dims[0], t.dims[1]) for t in tensors
              if t.name.endswith((".attn_q.weight", ".attn_v.weight"))}
    assert len(shapes) == 36
    return write_lora(path, shapes, arch="gemma3", rank=rank, scale=scale, seed=7)


def _near_argmax(res, slack=0.05):
    """Per scored position: the token taken is within ``slack`` nats of the most likely one."""
    return [lp >= top[0].logprob - slack for lp, top in zip(res.logprobs, res.top) if lp is not None]


def test_real_model_lora_text_equals_llama_server(real_model_path, tmp_path):
    """llama-server's greedy text with the same adapter and scale: where llama.cpp's rounding
    does not flip a near-tie (its prompt is one many-row decode, ours ends with a one-row
    decode), the same text; and every token it chose is our argmax under the adapter (within
    0.05 nats), which the base model's logits do not give."""
    lora = _gemma_lora(real_model_path, tmp_path / "gemma-lora.gguf")
    prompt = "The capital of France is"
    scales = (1.0, 0.5)
    with running_llama_server(real_model_path, ["--lora", str(lora), "-t", "2"], tmp_path) as url:
        theirs = {s: post_json(url + "/completion", {
            "prompt": prompt, "n_predict": 24, "temperature": 0, "cache_prompt": False,
            "return_tokens": True, "lora": [{"id": 0, "scale": s}]}, timeout=120) for s in scales}
    model = llamagen.Model(real_model_path)
    try:
        ad = LoraAdapter(model, lora)
        with llamagen.Context(model, n_ctx=512) as ctx:
            ptoks = model.tokenize(prompt)
            for s in scales:
                ours = llamagen.generate(ctx, prompt, max_new_tokens=24, temp=0, lora={ad: s},
                                         logprobs=2, return_logprobs=True)
                toks = theirs[s]["tokens"]
                same = 0
                while same < len(toks) and ours.tokens[same] == toks[same]:
                    same += 1
                assert same >= 4, (s, ours.text, theirs[s]["content"])
                if same < len(toks):        # a divergence is a near-tie of our own logits
                    top = ours.logprobs[same].top
                    assert top[0].logprob - top[1].logprob < 0.05, (s, same, top[:2])
                ctx.set_adapters({ad: s})
                adapted = llamagen.score(ctx, [(ptoks + toks[:-1])], top_logprobs=1)[0]
                ctx.set_adapters(None)
                base = llamagen.score(ctx, [(ptoks + toks[:-1])], top_logprobs=1)[0]
                assert all(_near_argmax(adapted)[len(ptoks) - 1:]), s
                # (the adapter moves the logits: the check above is not the base model's)
                n = len(ptoks)
                assert max(abs(x - y) for x, y in zip(adapted.logprobs[n:], base.logprobs[n:])) > 0.1
                if s == 1.0:
                    assert not all(_near_argmax(base)[len(ptoks) - 1:])
    finally:
        model.close()
