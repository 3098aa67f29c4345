"""Patch 0009's CPU kernels against the ones they replace, side by side.

  python bench/kernels.py [--rounds 2] [--threads 2] [--no-write]

third_party/llama_cpp-0009-ggml-cpu-sgemm-vnni512.patch computes llamafile's Q8_0/Q5_0/Q4_0
products and Q4_1 products on AVX-512 VNNI in its own scheme, each output bit-identical to the
kernel it replaces (tests/test_kernels.py); ``LLAMAGEN_TINYBLAS_REF=1`` keeps those (llamafile's
mnpack, ggml's vec_dot).  Each round runs both, one after the other, in fresh interpreters of one
build, on gemma3-270m Q4_K_M (Q8_0 output matrix, Q5_0 and Q4_K layers) and SmolLM2-135M Q4_1:
- a plain batch step of N sequences (N rows with logits; median of 24 steps),
- an exact speculative verify of N rows (bench/speculative.py's row_costs: one stream, fixed
  drafts of N - 1 on a counting prompt whose drafts are all accepted, the one-row kernels; best of
  3 streams' decode time per step),
- a prefill of ~750 tokens (tokens/s, median of 3).
Writes bench/out/kernels.json and bench/RESULTS.md section 26 (ranges over the rounds).
"""
from __future__ import annotations

import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import ab  # noqa: E402  (fresh-interpreter probes)
import speculative as S  # noqa: E402  (models, prompts, publish)

OUT_JSON = os.path.join(HERE, "out", "kernels.json")
HEADING = "## 26. Patch 0009: many-row products on AVX-512 VNNI"
BATCH_ROWS = (4, 8, 16, 32)
VERIFY_ROWS = (5, 9, 17)

# one measurement run, in a fresh interpreter (the reference switch is read once per process)
_PROBE = r"""
import json, statistics, sys, time
sys.path.insert(0, ROOT); sys.path.insert(0, HERE)
import llamagen, speculative as S
model = llamagen.Model(PATH)
out = {"batch": {}, "verify": {}}
for n in BATCH_ROWS:
    ctx = llamagen.Context(model, n_ctx=n * 128, n_seq_max=n, kv_unified=True, n_threads=THREADS)
    b = llamagen.BatchGenerator(ctx)
    for i in range(n):
        b.add(f"Count: {i} {i + 1} {i + 2}", max_new_tokens=40, temp=0, ignore_eos=True)
    b.step(); b.step()
    ts = []
    for _ in range(24):
        t0 = time.perf_counter(); b.step(); ts.append(time.perf_counter() - t0)
    out["batch"][n] = statistics.median(ts) * 1000
    while len(b):
        b.step()
    ctx.close()
"""
_PROBE += ab.VERIFY_AND_PREFILL + """print("RESULT " + json.dumps(out))
"""


def probe(path: str, ref: bool, threads: int) -> dict:
    return ab.probe(_PROBE, {"LLAMAGEN_TINYBLAS_REF": "1"} if ref else {}, ("LLAMAGEN_TINYBLAS_REF",),
                    900, PATH=path, THREADS=threads, BATCH_ROWS=BATCH_ROWS, VERIFY_ROWS=VERIFY_ROWS)


def write(res) -> str:
    L = [HEADING, "",
         f"Generated {res['date']} by `python bench/kernels.py --rounds {res['rounds']}`, "
         f"{res['cpu']}, {res['threads']} threads, nothing else running. Each round runs the "
         "reference kernels (`LLAMAGEN_TINYBLAS_REF=1`: llamafile's mnpack, ggml's vec_dot) and "
         "patch 0009's, one after the other, in fresh interpreters of one build; ranges over the "
         "rounds, x = reference median / 0009 median (ms) or 0009 / reference (tokens/s). Every "
         "output is bit-identical between the two (tests/test_kernels.py).", "",
         "| model | measure | reference | patch 0009 | x |", "|---|---|---:|---:|---:|"]
    for name, r in res["models"].items():
        ref, ours = r["ref"], r["ours"]
        for kind, rows_list, label in (("batch", BATCH_ROWS, "plain batch step, {} rows (ms)"),
                                       ("verify", VERIFY_ROWS, "exact verify, {} rows (ms)")):
            for n in rows_list:
                a = [x[kind][str(n)] for x in ref]
                b = [x[kind][str(n)] for x in ours]
                L.append(f"| {name} | {label.format(n)} | {ab.rng(a)} | {ab.rng(b)} | "
                         f"{statistics.median(a) / statistics.median(b):.2f} |")
        a = [x["prefill"] for x in ref]
        b = [x["prefill"] for x in ours]
        L.append(f"| {name} | prefill, {ref[0]['prefill_tokens']} tokens (tokens/s) | {ab.rng(a, 0)} | "
                 f"{ab.rng(b, 0)} | {statistics.median(b) / statistics.median(a):.2f} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    return ab.main(argv, __doc__, "gemma3,smollm2", lambda name, path, ref, threads: probe(path, ref, threads),
                   lambda x: f"batch {x['batch']} verify {x['verify']} prefill {x['prefill']:.0f}", write, OUT_JSON, HEADING)


if __name__ == "__main__":
    sys.exit(main())
