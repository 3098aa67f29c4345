"""AsyncEngine: continuous batching behind asyncio and thread APIs (tiny and real models)."""
from __future__ import annotations

import asyncio
import gc
import sys
import threading
import time

import pytest

import llamagen
from llamagen import AsyncEngine


def run(coro):
    return asyncio.run(coro)


async def wait_until(pred, timeout=10.0):
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            return False
        await asyncio.sleep(0.01)
    return True


@pytest.fixture(scope="module")
def tiny_engine(tiny_model):
    eng = AsyncEngine(tiny_model, n_ctx=2048, n_parallel=4)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def real_engine(real_model):
    eng = AsyncEngine(real_model, n_ctx=4096, n_parallel=4)
    yield eng
    eng.close()


# -- identity with the single-stream API ---------------------------------------------------------

def test_greedy_equals_generate_real(real_model, real_engine):
    prompt = "The capital of France is"
    with llamagen.Context(real_model, n_ctx=1024) as ctx:
        ref = llamagen.generate(ctx, prompt, max_new_tokens=32, temp=0)
        ref_seeded = llamagen.generate(ctx, prompt, max_new_tokens=32, seed=7)
    r = run(real_engine.generate(prompt, max_new_tokens=32, temp=0))
    assert r.text == ref
    assert r.usage.prompt_tokens == len(real_model.tokenize(prompt))
    assert r.usage.completion_tokens == len(r.tokens) == 32
    # default sampling, same seed: same text (the engine's chain is generate()'s)
    r = run(real_engine.generate(prompt, max_new_tokens=32, seed=7))
    assert r.text == ref_seeded


def test_stream_equals_generate_for_a_seed(tiny_engine):
    async def go():
        chunks = [c async for c in tiny_engine.stream("hello world", max_new_tokens=40, seed=3)]
        res = await tiny_engine.generate("hello world", max_new_tokens=40, seed=3)
        return chunks, res
    chunks, res = run(go())
    assert "".join(c.text for c in chunks) == res.text
    assert [t for c in chunks for t in c.token_ids] == res.tokens
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == res.finish_reason in ("stop", "length")


def test_sync_facade_from_threads(tiny_engine):
    ref = tiny_engine.generate_sync("the cat", max_new_tokens=20, seed=1)
    out = [None] * 4

    def worker(i):
        out[i] = tiny_engine.generate_sync("the cat", max_new_tokens=20, seed=1)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert all(o is not None and o.tokens == ref.tokens for o in out)
    chunks = list(tiny_engine.stream_sync("the cat", max_new_tokens=20, seed=1))
    assert "".join(c.text for c in chunks) == ref.text


# -- concurrency -----------------------------------------------------------------------------------

def test_sixteen_concurrent_streams_deliver_every_token(tiny_engine):
    async def one(i):
        n = 0
        async for c in tiny_engine.stream(f"prompt {i}", max_new_tokens=48, ignore_eos=True, seed=i):
            n += len(c.token_ids)
        return n
    async def go():
        return await asyncio.gather(*[one(i) for i in range(16)])
    assert run(go()) == [48] * 16
    assert tiny_engine.stats().n_running == 0


def test_requests_join_a_running_batch(tiny_engine):
    async def go():
        first = tiny_engine.stream("a long one", max_new_tokens=200, ignore_eos=True)
        got = []
        async for c in first:
            got.append(c)
            if len(got) == 3:
                break
        steps_before = tiny_engine.stats().n_steps
        second = await tiny_engine.generate("late", max_new_tokens=10, ignore_eos=True)
        # the second finished while the first still ran: it joined the batch
        running = tiny_engine.stats().n_running
        rest = [c async for c in first]
        return steps_before, second, running, got + rest
    steps_before, second, running, chunks = run(go())
    assert len(second.tokens) == 10
    assert running == 1
    assert sum(len(c.token_ids) for c in chunks) == 200


def test_slow_consumer_does_not_stall_others(tiny_engine):
    async def go():
        slow = tiny_engine.stream("slow reader", max_new_tokens=100, ignore_eos=True)
        fast = await asyncio.wait_for(
            tiny_engine.generate("fast reader", max_new_tokens=100, ignore_eos=True), 60)
        # the slow one was never read, yet generated everything meanwhile
        assert await wait_until(lambda: slow._queue.qsize() > 0 and slow._req.done)
        return fast, await slow.collect()
    fast, slow = run(go())
    assert len(fast.tokens) == len(slow.tokens) == 100


def test_burst_of_prompts_is_prefilled_together(tiny_model):
    prompts = [f"burst prompt number {i} with some words" for i in range(4)]
    with AsyncEngine(tiny_model, n_ctx=2048, n_parallel=4, prompt_cache=False) as eng:
        singles = [eng.generate_sync(p, max_new_tokens=8, temp=0).tokens for p in prompts]
        s0 = eng.stats().n_steps

        prepared = [eng.prepare(p, max_new_tokens=8, temp=0) for p in prompts]

        async def go():
            # all four submitted before the engine thread can take the GIL and start the first
            # alone (a tiny model's step is shorter than one submission)
            old = sys.getswitchinterval()
            sys.setswitchinterval(1.0)
            try:
                streams = [eng.stream_prepared(x) for x in prepared]
            finally:
                sys.setswitchinterval(old)
            return [await s.collect() for s in streams]
        rs = run(go())
        steps = eng.stats().n_steps - s0
    # one step prefills all four prompts, the next decodes their last prompt tokens alone (as a
    # cached prompt's: docs/engine.md) and samples their first tokens; 7 more generate.  One
    # prompt per step would take 4 + 1 + 7.
    assert steps <= 10, steps
    assert [r.tokens for r in rs] == singles


# -- cancellation ------------------------------------------------------------------------------------

def test_aclose_cancels_and_frees_the_sequence(tiny_engine):
    async def go():
        s = tiny_engine.stream("cancel me", max_new_tokens=10_000, ignore_eos=True)
        async for _ in s:
            break
        assert tiny_engine.stats().n_running == 1
        await s.aclose()
        return await wait_until(lambda: tiny_engine.stats().n_running == 0, 5)
    assert run(go())


def test_task_cancel_and_dropped_iterator_cancel(tiny_engine):
    async def reader(s):
        async for _ in s:
            pass

    async def go():
        s = tiny_engine.stream("task cancel", max_new_tokens=10_000, ignore_eos=True)
        t = asyncio.ensure_future(reader(s))
        assert await wait_until(lambda: tiny_engine.stats().n_running == 1, 5)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        ok1 = await wait_until(lambda: tiny_engine.stats().n_running == 0, 5)
        # breaking out of an async for and dropping the iterator cancels too
        async for _ in tiny_engine.stream("dropped", max_new_tokens=10_000, ignore_eos=True):
            break
        gc.collect()
        ok2 = await wait_until(lambda: tiny_engine.stats().n_running == 0, 5)
        return ok1, ok2
    assert run(go()) == (True, True)


# -- prompt cache --------------------------------------------------------------------------------------

def test_second_turn_reuses_the_first_turns_cache(real_model):
    turn1 = "Question: what is the tallest mountain on Earth?\nAnswer:"
    with AsyncEngine(real_model, n_ctx=4096, n_parallel=2) as eng, \
            AsyncEngine(real_model, n_ctx=4096, n_parallel=2, prompt_cache=False) as cold:
        r1 = eng.generate_sync(turn1, max_new_tokens=24, temp=0)
        turn2 = turn1 + r1.text + "\nQuestion: and the deepest ocean?\nAnswer:"
        r2 = eng.generate_sync(turn2, max_new_tokens=24, temp=0)
        c2 = cold.generate_sync(turn2, max_new_tokens=24, temp=0)
        assert r1.usage.cached_tokens == 0
        n1 = len(real_model.tokenize(turn1))
        assert r2.usage.cached_tokens >= n1
        assert c2.usage.cached_tokens == 0
        assert r2.text == c2.text
        st = eng.stats()
        assert st.prefix_cache_hits >= r2.usage.cached_tokens


def test_prompt_cache_picks_the_slot_with_the_longest_prefix(tiny_model):
    with AsyncEngine(tiny_model, n_ctx=2048, n_parallel=3) as eng:
        a = "alpha alpha alpha alpha alpha alpha"
        b = "beta beta beta beta beta beta beta"
        eng.generate_sync(a, max_new_tokens=4, temp=0)
        eng.generate_sync(b, max_new_tokens=4, temp=0)
        ra = eng.generate_sync(a + " more", max_new_tokens=4, temp=0)
        rb = eng.generate_sync(b + " more", max_new_tokens=4, temp=0)
        assert ra.usage.cached_tokens >= len(tiny_model.tokenize(a)) - 1
        assert rb.usage.cached_tokens >= len(tiny_model.tokenize(b)) - 1


def test_idle_caches_give_way_when_the_kv_cache_is_full(tiny_model):
    # 4 slots share 256 cells: idle caches of earlier requests must be dropped for new ones
    with AsyncEngine(tiny_model, n_ctx=256, n_parallel=4) as eng:
        for i in range(6):
            r = eng.generate_sync(f"fill {i} " * 10, max_new_tokens=80, ignore_eos=True)
            assert len(r.tokens) == 80 and r.finish_reason == "length"


def test_idle_caches_stay_within_their_budget(tiny_model):
    with AsyncEngine(tiny_model, n_ctx=2048, n_parallel=4, prompt_cache=100) as eng:
        sizes = []
        for i in range(4):
            r = eng.generate_sync(f"budget {i} " * 8, max_new_tokens=20, ignore_eos=True)
            sizes.append(r.usage.prompt_tokens + 19)      # the last token is never decoded
            assert eng.stats().kv_used == sizes[-1]       # the newest cache only: 2 would pass 100
        again = eng.generate_sync("budget 3 " * 8 + "more", max_new_tokens=2)
        assert again.usage.cached_tokens > 0              # the newest cache was kept
        first = eng.generate_sync("budget 0 " * 8 + "more", max_new_tokens=2)
        assert first.usage.cached_tokens == 0              # an old one was dropped


# -- n completions ---------------------------------------------------------------------------------------

def test_n_choices_use_consecutive_seeds_and_one_prefill(tiny_model):
    prompt = "one shared prompt for several choices"
    with AsyncEngine(tiny_model, n_ctx=2048, n_parallel=4, prompt_cache=False) as eng:
        singles = [eng.generate_sync(prompt, max_new_tokens=12, seed=10 + i) for i in range(3)]
        shared0 = eng._batch.n_shared_tokens
        r = eng.generate_sync(prompt, max_new_tokens=12, seed=10, n=3)
        shared = eng._batch.n_shared_tokens - shared0
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.tokens for c in r.choices] == [s.tokens for s in singles]
    n_prompt = len(tiny_model.tokenize(prompt))
    assert shared == 2 * (n_prompt - 1)        # copies 1 and 2 copied the prompt's cells
    assert r.usage.completion_tokens == sum(len(c.tokens) for c in r.choices)


# -- bad input ------------------------------------------------------------------------------------------

def test_bad_requests_raise_before_anything_runs(tiny_model):
    with AsyncEngine(tiny_model, n_ctx=64, n_parallel=1, max_queue=0) as eng:
        with pytest.raises(llamagen.PromptTooLongError) as e:
            eng.generate_sync("word " * 400)
        assert e.value.n_ctx == eng.n_ctx and e.value.n_prompt > eng.n_ctx >= 64
        assert isinstance(e.value, ValueError)
        with pytest.raises(ValueError, match="temp"):
            eng.generate_sync("x", temp=float("nan"))
        with pytest.raises(TypeError):
            eng.generate_sync("x", top_k="many")
        with pytest.raises(ValueError, match="n must be"):
            eng.generate_sync("x", n=0)
        with pytest.raises(ValueError, match="token id"):
            eng.generate_sync([1, 10 ** 9])
        with pytest.raises(ValueError, match="empty"):
            eng.generate_sync([])
        with pytest.raises(ValueError, match="logit_bias"):
            eng.generate_sync("x", logit_bias={10 ** 6: 1.0})
        with pytest.raises(llamagen.GrammarError, match="does not parse"):
            eng.generate_sync("x", grammar="root ::= (")

        async def queue_full():
            s = eng.stream("first", max_new_tokens=10_000, ignore_eos=True)
            with pytest.raises(llamagen.QueueFullError):
                eng.stream("second", max_new_tokens=4)
            await s.aclose()
            assert await wait_until(lambda: s._req.done)
            return (await eng.generate("third", max_new_tokens=4, ignore_eos=True)).tokens
        assert len(run(queue_full())) == 4
    with pytest.raises(llamagen.EngineClosedError):
        eng.generate_sync("after close")


def test_close_ends_running_streams(tiny_model):
    eng = AsyncEngine(tiny_model, n_ctx=512, n_parallel=2)

    async def go():
        s = eng.stream("endless", max_new_tokens=100_000, ignore_eos=True)
        await s.__anext__()
        await eng.aclose()
        with pytest.raises(llamagen.EngineClosedError):
            async for _ in s:
                pass
    run(go())
    assert eng.closed
    eng.close()      # idempotent
