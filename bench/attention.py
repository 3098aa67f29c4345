"""Patch 0010's flash attention over a unified KV cache against llama.cpp's, side by side.

  python bench/attention.py [--rounds 2] [--threads 2] [--no-write]

third_party/llama_cpp-0010-ggml-cpu-fa-unified-cache.patch makes the CPU attention pay for a
row's own cells: it skips -inf mask entries 32 at a time and keeps each tile of the tiled kernel
to one sequence's rows (a sequence with fewer than 64 rows in the ubatch takes the one-row
kernel), its KV tiles starting at the sequence's first cell.
``LLAMAGEN_FA_MASK_REF=1`` with ``LLAMAGEN_FA_MIXED_TILES=1`` runs the attention as llama.cpp has
it.  Each round runs both, one after the other, in fresh interpreters of one build, on
gemma3-270m Q4_K_M and SmolLM2-135M Q4_1:
- a decode step of N sequences holding C cells each, every sequence past its prompt (median of 24
  steps), on a unified cache and on per-sequence KV streams (``kv_unified=False``),
- an exact speculative verify of N rows (bench/speculative.py's row_costs),
- a prefill of ~750 tokens alone (tokens/s, median of 3),
- map_generate: 32 prompts of bench/speculative.py's repetitive kinds, 8 at a time, 128 tokens
  each (greedy, ``ignore_eos``), unified and per-sequence streams (tokens/s).
Writes bench/out/attention.json and bench/RESULTS.md section 27 (ranges over the rounds).
"""
from __future__ import annotations

import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import ab  # noqa: E402  (fresh-interpreter probes)
import speculative as S  # noqa: E402  (models, prompts, row costs, publish)

OUT_JSON = os.path.join(HERE, "out", "attention.json")
HEADING = "## 27. Patch 0010: flash attention over a unified KV cache"
SHAPES = ((8, 700), (32, 200), (64, 200))        # sequences x cells each
VERIFY_ROWS = (9, 17)

_PROBE = r"""
import json, statistics, sys, time
sys.path.insert(0, ROOT); sys.path.insert(0, HERE)
import llamagen, speculative as S
model = llamagen.Model(PATH)
words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
out = {"step": {}, "verify": {}, "map": {}}
for n, cells in SHAPES:
    for unified in (True, False):
        ctx = llamagen.Context(model, n_ctx=n * (cells + 128), n_seq_max=n, kv_unified=unified,
                               n_threads=THREADS)
        b = llamagen.BatchGenerator(ctx)
        ids = []
        for i in range(n):
            text = " ".join(f"{words[(i * 7 + j) % 12]}{(i * 31 + j) % 97}" for j in range(cells // 3))
            toks = model.tokenize(text)[:cells - 40]
            ids.append(b.add(toks, max_new_tokens=120, temp=0, ignore_eos=True))
        while not all(b.n_tokens(s) > 0 for s in ids):   # every sequence past its prompt
            b.step()
        b.step()
        ts = []
        for _ in range(24):
            t0 = time.perf_counter(); b.step(); ts.append(time.perf_counter() - t0)
        out["step"][f"{n}x{cells}/{'unified' if unified else 'streams'}"] = statistics.median(ts) * 1000
        ctx.close()
"""
_PROBE += ab.VERIFY_AND_PREFILL + r"""
texts = [S.prompt_for(NAME, model, i) for k, i in S.instructions() if k not in S.OPEN_KINDS]
items = [texts[i % len(texts)] for i in range(32)]
for unified in (True, False):
    ctx = llamagen.Context(model, n_ctx=8192, n_seq_max=8, kv_unified=unified, n_threads=THREADS)
    t0 = time.perf_counter()
    got = list(llamagen.map_generate(ctx, items, batch_size=8, max_new_tokens=128, temp=0,
                                     ignore_eos=True))
    out["map"]["unified" if unified else "streams"] = sum(len(g.tokens) for g in got) / (time.perf_counter() - t0)
    ctx.close()
print("RESULT " + json.dumps(out))
"""


def probe(name: str, path: str, ref: bool, threads: int) -> dict:
    switches = ("LLAMAGEN_FA_MASK_REF", "LLAMAGEN_FA_MIXED_TILES")
    return ab.probe(_PROBE, {k: "1" for k in switches} if ref else {}, switches, PATH=path,
                    NAME=name, THREADS=threads, SHAPES=SHAPES, VERIFY_ROWS=VERIFY_ROWS)


def write(res) -> str:
    L = [HEADING, "",
         f"Generated {res['date']} by `python bench/attention.py --rounds {res['rounds']}`, "
         f"{res['cpu']}, {res['threads']} threads, nothing else running. Each round runs "
         "llama.cpp's attention (`LLAMAGEN_FA_MASK_REF=1 LLAMAGEN_FA_MIXED_TILES=1`) and patch "
         "0010's, one after the other, in fresh interpreters of one build; ranges over the rounds, "
         "x = llama.cpp median / 0010 median (ms) or 0010 / llama.cpp (tokens/s). The mask scan "
         "gives the same bits as llama.cpp's kernels (tests/test_kernels.py); "
         "the one-sequence tiles move a sequence's few rows from the tiled kernel to the one-row "
         "kernel (different rounding, the rounding they get alone).", "",
         "| model | measure | llama.cpp | patch 0010 | x |", "|---|---|---:|---:|---:|"]

    def row(name, label, a, b, nd=1, higher=False):
        x = statistics.median(b) / statistics.median(a) if higher else statistics.median(a) / statistics.median(b)
        L.append(f"| {name} | {label} | {ab.rng(a, nd)} | {ab.rng(b, nd)} | {x:.2f} |")

    for name, r in res["models"].items():
        ref, ours = r["ref"], r["ours"]
        for n, cells in SHAPES:
            for kind in ("unified", "streams"):
                key = f"{n}x{cells}/{kind}"
                row(name, f"decode step, {n} sequences x {cells} cells, "
                          f"{'unified' if kind == 'unified' else 'per-sequence streams'} (ms)",
                    [x["step"][key] for x in ref], [x["step"][key] for x in ours])
        for n in VERIFY_ROWS:
            row(name, f"exact verify, {n} rows (ms)", [x["verify"][str(n)] for x in ref],
                [x["verify"][str(n)] for x in ours])
        row(name, f"prefill, {ref[0]['prefill_tokens']} tokens alone (tokens/s)",
            [x["prefill"] for x in ref], [x["prefill"] for x in ours], 0, True)
        for kind in ("unified", "streams"):
            row(name, f"map_generate, 32 prompts 8 at a time, {kind} (tokens/s)",
                [x["map"][kind] for x in ref], [x["map"][kind] for x in ours], 0, True)
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    return ab.main(argv, __doc__, "gemma3,smollm2", probe,
                   lambda x: f"step {x['step']} verify {x['verify']} prefill {x['prefill']:.0f} map {x['map']}", write, OUT_JSON, HEADING)


if __name__ == "__main__":
    sys.exit(main())
