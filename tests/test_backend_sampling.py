"""sampler_impl="backend": llama.cpp's backend sampling, the chain run inside the decode graph.

On a CPU build the "device" is the CPU backend, so these run everywhere; on a CUDA build with
n_gpu_layers=-1 the same chain runs on the GPU (bench/gpu measures that).
"""
from __future__ import annotations

import gc

import pytest

import llamagen

PROMPT = "The three most important inventions in history are"
TINY_PROMPT = "the cat"


def _run(ctx, prompt, impl, **kw):
    kw.setdefault("ignore_eos", True)
    st = llamagen.gen_begin(ctx, prompt, sampler_impl=impl, **kw)
    text = "".join(st)
    text += st.end()
    return st, text


def test_params_accept_backend_and_refuse_a_grammar():
    assert "backend" in llamagen.sampling.SAMPLER_IMPLS
    p = llamagen.SamplingParams(sampler_impl="backend")
    assert p.sampler_impl == "backend"
    with pytest.raises(ValueError, match="grammar.*backend"):
        llamagen.SamplingParams(sampler_impl="backend", grammar='root ::= "a"')
    with pytest.raises(ValueError, match="sampler_impl"):
        llamagen.SamplingParams(sampler_impl="gpu")


def test_greedy_on_the_backend_picks_the_host_engines_tokens_tiny(tiny_ctx):
    fast, _ = _run(tiny_ctx, TINY_PROMPT, "fast", temp=0.0, max_new_tokens=40)
    back, _ = _run(tiny_ctx, TINY_PROMPT, "backend", temp=0.0, max_new_tokens=40)
    assert fast.sampler_engine == "fast"
    assert back.sampler_engine == "backend"
    assert back.tokens == fast.tokens
    assert len(back.tokens) == 40


@pytest.mark.parametrize("kw", [dict(), dict(typical_p=0.9), dict(mirostat=2),
                                dict(repeat_penalty=1.3, top_k=0, top_p=0.95)],
                         ids=["default", "typical-host-tail", "mirostat-host-tail", "penalties"])
def test_backend_chain_is_reproducible_and_stream_equals_generate_tiny(tiny_ctx, kw):
    a, ta = _run(tiny_ctx, TINY_PROMPT, "backend", max_new_tokens=40, seed=7, **kw)
    b, tb = _run(tiny_ctx, TINY_PROMPT, "backend", max_new_tokens=40, seed=7, **kw)
    assert a.sampler_engine == "backend"
    assert a.tokens == b.tokens and ta == tb
    text = llamagen.generate(tiny_ctx, TINY_PROMPT, max_new_tokens=40, seed=7, ignore_eos=True,
                             sampler_impl="backend", **kw)
    assert text == ta
    assert a.timings["n_tokens"] == 40


def test_a_later_host_generation_is_not_sampled_by_the_old_chain(tiny_model, tiny_ctx):
    # the backend chain is detached when the next generation takes the context over: a fast
    # generation afterwards gives what it gives on a fresh context
    with llamagen.Context(tiny_model, n_ctx=256) as fresh:
        ref, _ = _run(fresh, TINY_PROMPT, "fast", max_new_tokens=30, seed=3)
    st = llamagen.gen_begin(tiny_ctx, TINY_PROMPT, sampler_impl="backend", temp=0.0,
                            max_new_tokens=30, ignore_eos=True)
    next(st)                      # left running, never ended
    after, _ = _run(tiny_ctx, TINY_PROMPT, "fast", max_new_tokens=30, seed=3)
    assert after.tokens == ref.tokens
    with pytest.raises(llamagen.StaleStateError):
        next(st)
    assert st.end() == ""


def test_dropped_state_and_closed_context_do_not_crash(tiny_model):
    ctx = llamagen.Context(tiny_model, n_ctx=256)
    st = llamagen.gen_begin(ctx, TINY_PROMPT, sampler_impl="backend", max_new_tokens=5)
    next(st)
    ctx.close()                   # frees the chain the context still had attached
    with pytest.raises(llamagen.LlamaError):
        next(st)
    assert isinstance(st.end(), str)
    del st
    gc.collect()
    ctx = llamagen.Context(tiny_model, n_ctx=256)
    st = llamagen.gen_begin(ctx, TINY_PROMPT, sampler_impl="backend", max_new_tokens=5)
    next(st)
    del st                        # dropped while attached: the context frees the chain later
    gc.collect()
    again, _ = _run(ctx, TINY_PROMPT, "backend", max_new_tokens=5)
    assert again.sampler_engine == "backend" and len(again.tokens) == 5
    ctx.close()


def test_end_detaches_and_a_new_backend_generation_repeats(tiny_ctx):
    a, _ = _run(tiny_ctx, TINY_PROMPT, "backend", max_new_tokens=20, seed=11)
    fast, _ = _run(tiny_ctx, TINY_PROMPT, "fast", max_new_tokens=20, seed=11)
    b, _ = _run(tiny_ctx, TINY_PROMPT, "backend", max_new_tokens=20, seed=11)
    assert a.tokens == b.tokens
    assert fast.sampler_engine == "fast"


def test_batch_with_backend_sampling_matches_the_host_engine_greedy(tiny_model):
    prompts = ["the cat", "a dog", "hello", "mom", "the"]
    kw = dict(temp=0.0, max_new_tokens=24, ignore_eos=True)
    with llamagen.Context(tiny_model, n_ctx=1024, n_seq_max=3) as ctx:
        host = llamagen.generate_batch(ctx, prompts, **kw)
        back = llamagen.generate_batch(ctx, prompts, sampler_impl="backend", **kw)
        assert back == host
        # sequences with and without backend sampling in one batch (3 slots, 5 prompts: slots
        # are reused, each new sequence attaches its chain to the slot it takes)
        batch = llamagen.BatchGenerator(ctx, **kw)
        ids = [batch.add(p, sampler_impl=("backend" if i % 2 else "fast"))
               for i, p in enumerate(prompts)]
        out = {i: "" for i in ids}
        for sid, chunk in batch:
            out[sid] += chunk
        assert [out[i] for i in ids] == host


def test_batch_backend_sampled_sequences_are_reproducible(tiny_model):
    prompts = ["the cat", "a dog", "hello"]
    with llamagen.Context(tiny_model, n_ctx=1024, n_seq_max=3) as ctx:
        a = llamagen.generate_batch(ctx, prompts, sampler_impl="backend", max_new_tokens=20,
                                    seed=5, ignore_eos=True)
        b = llamagen.generate_batch(ctx, prompts, sampler_impl="backend", max_new_tokens=20,
                                    seed=5, ignore_eos=True)
        assert a == b


@pytest.mark.real_model
@pytest.mark.parametrize("kw", [dict(temp=0.0), dict(), dict(typical_p=0.9)],
                         ids=["greedy", "default", "typical"])
def test_real_model_backend_sampling(real_ctx, kw):
    fast, tf = _run(real_ctx, PROMPT, "fast", max_new_tokens=48, **kw)
    back, tb = _run(real_ctx, PROMPT, "backend", max_new_tokens=48, **kw)
    assert back.sampler_engine == "backend"
    assert len(back.tokens) == 48
    if kw.get("temp") == 0.0:
        # greedy is an argmax on either side: the same tokens
        assert back.tokens == fast.tokens and tb == tf
    again, ta = _run(real_ctx, PROMPT, "backend", max_new_tokens=48, **kw)
    assert again.tokens == back.tokens and ta == tb


def test_cancelling_in_a_stale_batch_leaves_the_new_owner_alone(tiny_model):
    # a batch replaced by a newer generation must not free that generation's chain or KV cells
    with llamagen.Context(tiny_model, n_ctx=512, n_seq_max=2) as ctx:
        ref, _ = _run(ctx, TINY_PROMPT, "backend", max_new_tokens=20, seed=9)
        batch = llamagen.BatchGenerator(ctx, sampler_impl="backend", max_new_tokens=20)
        sid = batch.add("a dog")
        batch.step()                               # sid holds slot 0 with its chain attached
        st = llamagen.gen_begin(ctx, TINY_PROMPT, sampler_impl="backend", max_new_tokens=20,
                                seed=9, ignore_eos=True)
        next(st)
        batch.cancel(sid)                          # stale: must not touch slot 0 any more
        "".join(st)
        st.end()
        assert st.tokens == ref.tokens
        with pytest.raises(llamagen.StaleStateError):
            batch.step()


@pytest.mark.skipif(not llamagen.build_info()["gpu_offload"],
                    reason="needs a GPU build (bench/gpu/run.sh runs the suite with one)")
def test_fully_offloaded_model_samples_on_the_gpu(tiny_model_path):
    # every layer and the output on the GPU: the chain runs there and greedy still picks the
    # host engine's tokens
    with llamagen.Model(tiny_model_path, n_gpu_layers=-1) as model, \
            llamagen.Context(model, n_ctx=256) as ctx:
        fast, _ = _run(ctx, TINY_PROMPT, "fast", temp=0.0, max_new_tokens=32)
        back, _ = _run(ctx, TINY_PROMPT, "backend", temp=0.0, max_new_tokens=32)
        assert back.sampler_engine == "backend"
        assert back.tokens == fast.tokens
        a, _ = _run(ctx, TINY_PROMPT, "backend", max_new_tokens=32, seed=1)
        b, _ = _run(ctx, TINY_PROMPT, "backend", max_new_tokens=32, seed=1)
        assert a.tokens == b.tokens
