"""The prompt cache's host-RAM tier (issue 30): an idle cache evicted from the KV cache is kept
in RAM as llama.cpp's sequence state and restored on a later hit instead of prefilled; the
continuation is the one never evicting gives; the byte cap holds."""
from __future__ import annotations

import asyncio

import pytest

import llamagen
from tiny_gguf import tiny_lora_shapes, write_lora

DOC = " ".join(f"Item {i} is a {['red', 'blue', 'green'][i % 3]} box with {i * 7 % 13} apples."
               for i in range(34))
P1 = DOC + "\nQuestion: what colour is item 7?\nAnswer:"
P2 = "Once upon a time there was a cat. " * 30
P3 = "The quick brown fox jumps over the lazy dog. " * 30


def _runner(bg):
    def run(prompt, **kw):
        sid = bg.add(prompt, **kw)
        text = "".join(c for i, c in bg if i == sid)
        lps = [x.logprob for x in bg.logprobs(sid)] if bg.logprobs(sid) is not None else None
        return text, bg.n_cached(sid), lps
    return run


def _evict_and_restore(model, n_ctx=4096):
    """P1, then P2 in the only slot (P1's cells go to RAM), then P1 again (restored)."""
    with llamagen.Context(model, n_ctx=n_ctx, n_seq_max=1) as ctx:
        cold = llamagen.generate(ctx, P1, max_new_tokens=8, temp=0, logprobs=1, return_logprobs=True)
        bg = llamagen.BatchGenerator(ctx, prompt_cache=True, cache_ram=1 << 30, max_new_tokens=8,
                                     temp=0, logprobs=1)
        run = _runner(bg)
        first, again = run(P1), None
        run(P2)
        again = run(P1)
        return cold, first, again, bg.ram_cache, len(model.tokenize(P1))


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_a_restored_prefix_continues_bit_for_bit(which, tiny_model, smollm2_model):
    cold, first, again, ram, n = _evict_and_restore(tiny_model if which == "tiny" else smollm2_model)
    assert first[1] == 0 and again[1] == n - 1           # all but the last token from RAM
    assert again[0] == first[0] == cold.text
    assert again[2] == first[2] == [x.logprob for x in cold.logprobs]     # bit for bit
    assert ram["saved"] >= 1 and ram["restored"] == 1 and ram["restored_tokens"] == n - 1


def test_gemma3_within_its_sliding_window_continues_bit_for_bit(real_model):
    """gemma3 attends over a 512-token window in most layers; a prompt inside it restores
    exactly (docs/state.md: past the window llama.cpp lays the restored cells out otherwise)."""
    cold, first, again, ram, n = _evict_and_restore(real_model)
    assert n < 512 and again[1] == n - 1
    assert again[2] == first[2] == [x.logprob for x in cold.logprobs]


def test_the_byte_cap_holds_and_the_least_recently_used_goes(tiny_model):
    with llamagen.Context(tiny_model, n_ctx=4096, n_seq_max=1) as ctx:
        size = None
        bg = llamagen.BatchGenerator(ctx, prompt_cache=True, cache_ram=-1, max_new_tokens=4, temp=0)
        run = _runner(bg)
        run(P1)
        run(P2)                          # P1 to RAM: its size sets the cap below
        size = bg.ram_cache["bytes"]
        assert size > 0
        cap = int(size * 1.5)            # room for one entry of this size, not two
        bg = llamagen.BatchGenerator(ctx, prompt_cache=True, cache_ram=cap, max_new_tokens=4, temp=0)
        run = _runner(bg)
        for p in (P1, P2, P3):
            run(p)
            assert bg.ram_cache["bytes"] <= cap
        assert bg.ram_cache["entries"] == 1 and bg.ram_cache["saved"] == 2
        assert run(P1)[1] == 0           # P1 went first (least recently used)
        assert run(P2)[1] == 0           # P2 too: P1 took its place
        assert run(P1)[1] > 100          # ... and P1 came back from RAM
        bg.drop_prompt_cache(ram=True)
        assert bg.ram_cache["bytes"] == 0 and bg.ram_cache["entries"] == 0


def test_an_entry_is_restored_only_under_its_own_lora_set(tiny_model, tmp_path):
    a = llamagen.LoraAdapter(tiny_model, write_lora(tmp_path / "a.gguf", tiny_lora_shapes(), seed=1))
    with llamagen.Context(tiny_model, n_ctx=4096, n_seq_max=1) as ctx:
        want = llamagen.generate(ctx, P1, max_new_tokens=8, temp=0)
        bg = llamagen.BatchGenerator(ctx, prompt_cache=True, cache_ram=1 << 30, max_new_tokens=8, temp=0)
        run = _runner(bg)
        run(P1, lora={a: 1.0})
        run(P2)
        text, cached, _ = run(P1)
        assert text == want and cached == 0
        run(P2)
        assert run(P1)[1] > 100          # this time its own (base) entry


def test_bad_cache_ram_arguments(tiny_model):
    with llamagen.Context(tiny_model, n_ctx=512) as ctx:
        with pytest.raises(ValueError, match="prompt_cache"):
            llamagen.BatchGenerator(ctx, cache_ram=1 << 20)
        with pytest.raises(ValueError, match="cache_ram"):
            llamagen.BatchGenerator(ctx, prompt_cache=True, cache_ram=-2)
        with pytest.raises(TypeError):
            llamagen.BatchGenerator(ctx, prompt_cache=True, cache_ram="1G")
    with pytest.raises(ValueError, match="cache_ram_mib"):
        llamagen.AsyncEngine(tiny_model, n_ctx=512, n_parallel=1, cache_ram_mib=-5)


def test_engine_multi_turn_chats_beyond_the_kv_cache_restore_from_ram(tiny_model):
    """More conversations than the KV cache holds: a returning conversation's prefix comes from
    RAM (the engine's stats say so) and its answer is the one a cold engine gives."""
    convs = [f"Conversation {k}: " + DOC[k * 40:] + f" Tell me about box {k}." for k in range(4)]

    async def main(ram_mib):
        with llamagen.AsyncEngine(tiny_model, n_ctx=1024, n_parallel=1, prompt_cache=True,
                                  cache_ram_mib=ram_mib) as eng:
            out = []
            for rnd in range(2):
                for c in convs:
                    r = await eng.generate(c, max_new_tokens=6, temp=0)
                    out.append(r.text)
            return out, eng.stats()

    with_ram, st = asyncio.run(main(64))
    without, st0 = asyncio.run(main(0))
    assert with_ram == without
    assert st.ram_cache_restored_tokens > 4 * 300 and st0.ram_cache_restored_tokens == 0
    assert 0 < st.ram_cache_bytes <= 64 << 20
