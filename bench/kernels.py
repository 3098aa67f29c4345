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

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

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
# (bench/speculative.py's row costs: fixed drafts of rows - 1 on a counting prompt, all accepted)
out["verify"] = S.row_costs("kernels", PATH, THREADS, rows=VERIFY_ROWS)
ctx = llamagen.Context(model, n_ctx=4096, n_threads=THREADS)
long = " ".join(S.PARAS) * 4
pf = []
for _ in range(3):
    st = llamagen.gen_begin(ctx, long, max_new_tokens=1, temp=0)
    list(st); st.end()
    pf.append(st.timings["prefill_tokens_per_second"])
out["prefill"] = statistics.median(pf)
out["prefill_tokens"] = st.timings["n_prompt_tokens"]
print("RESULT " + json.dumps(out))
"""


def probe(path: str, ref: bool, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("LLAMAGEN_TINYBLAS_REF", None)
    if ref:
        env["LLAMAGEN_TINYBLAS_REF"] = "1"
    head = (f"ROOT = {ROOT!r}\nHERE = {HERE!r}\nPATH = {path!r}\nTHREADS = {threads}\n"
            f"BATCH_ROWS = {BATCH_ROWS!r}\nVERIFY_ROWS = {VERIFY_ROWS!r}\n")
    p = subprocess.run([sys.executable, "-"], input=head + _PROBE, capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=900)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"probe failed ({p.returncode}): {p.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def _rng(xs, nd=1):
    lo, hi = min(xs), max(xs)
    return f"{lo:.{nd}f}" if round(lo, nd) == round(hi, nd) else f"{lo:.{nd}f}-{hi:.{nd}f}"


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
                L.append(f"| {name} | {label.format(n)} | {_rng(a)} | {_rng(b)} | "
                         f"{statistics.median(a) / statistics.median(b):.2f} |")
        a = [x["prefill"] for x in ref]
        b = [x["prefill"] for x in ours]
        L.append(f"| {name} | prefill, {ref[0]['prefill_tokens']} tokens (tokens/s) | {_rng(a, 0)} | "
                 f"{_rng(b, 0)} | {statistics.median(b) / statistics.median(a):.2f} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    paths = S.model_paths()
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": S._cpu(),
           "threads": a.threads, "rounds": a.rounds, "models": {}}
    for name in ("gemma3", "smollm2"):
        r = {"ref": [], "ours": []}
        for i in range(a.rounds):
            for key, ref in (("ref", True), ("ours", False)):
                r[key].append(probe(paths[name], ref, a.threads))
                x = r[key][-1]
                S.log(f"{name} round {i} {key:4s} batch {x['batch']} verify {x['verify']} "
                      f"prefill {x['prefill']:.0f}")
        res["models"][name] = r
    S.publish(res, OUT_JSON, write(res), HEADING, not a.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
