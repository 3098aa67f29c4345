"""A/B runs in fresh interpreters of one build: what bench/kernels.py and bench/attention.py share.

Each measurement is a script run by a new Python process (our kernels read their environment
switches once per process), with a few names defined at its top; it prints one ``RESULT <json>``
line.  ``rng`` formats the spread of a figure over rounds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def probe(script: str, env_set: dict, env_clear=(), timeout: int = 1800, **names) -> dict:
    """Run ``script`` in a fresh interpreter with ``names`` (and ROOT, HERE) defined at its top,
    ``env_clear`` removed from the environment and ``env_set`` added; its RESULT line, parsed."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in env_clear:
        env.pop(k, None)
    env.update(env_set)
    head = "".join(f"{k} = {v!r}\n" for k, v in dict(ROOT=ROOT, HERE=HERE, **names).items())
    p = subprocess.run([sys.executable, "-"], input=head + script, capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=timeout)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"probe failed ({p.returncode}): {p.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def rng(xs, nd=1) -> str:
    lo, hi = min(xs), max(xs)
    return f"{lo:.{nd}f}" if round(lo, nd) == round(hi, nd) else f"{lo:.{nd}f}-{hi:.{nd}f}"


def alternate(names, n_rounds: int, measure, describe, log) -> dict:
    """{name: {"ref": [...], "ours": [...]}}: each round measures the reference, then ours, for
    each name in turn (``measure(name, ref)``), logging ``describe(result)``."""
    models = {}
    for name in names:
        r = {"ref": [], "ours": []}
        for i in range(n_rounds):
            for key, ref in (("ref", True), ("ours", False)):
                r[key].append(measure(name, ref))
                log(f"{name} round {i} {key:4s} {describe(r[key][-1])}")
        models[name] = r
    return models


def main(argv, doc: str, models: str, measure, describe, write, out_json: str, heading: str) -> int:
    """The command line both scripts share: ``--rounds``, ``--threads``, ``--models``,
    ``--no-write``; ``measure(name, path, ref, threads)`` per model and round, then ``write(res)``
    published as section ``heading`` of bench/RESULTS.md (and ``out_json``)."""
    import argparse
    import time
    import speculative as S      # (models, CPU name, log, publish)
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default=models)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    paths = S.model_paths()
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": S._cpu(),
           "threads": a.threads, "rounds": a.rounds}
    res["models"] = alternate(a.models.split(","), a.rounds,
                              lambda name, ref: measure(name, paths[name], ref, a.threads),
                              describe, S.log)
    S.publish(res, out_json, write(res), heading, not a.no_write)
    return 0


# the part of a probe script both share (it has ``model``, ``out``, ``S`` = bench/speculative.py):
# an exact verify of each of VERIFY_ROWS rows (bench/speculative.py's row costs: fixed drafts of
# rows - 1 on a counting prompt, all accepted) and the prefill of ~750 tokens alone
VERIFY_AND_PREFILL = r"""
out["verify"] = S.row_costs("probe", PATH, THREADS, rows=VERIFY_ROWS)
ctx = llamagen.Context(model, n_ctx=4096, n_threads=THREADS)
long = " ".join(S.PARAS) * 4
pf = []
for _ in range(3):
    st = llamagen.gen_begin(ctx, long, max_new_tokens=1, temp=0)
    list(st); st.end()
    pf.append(st.timings["prefill_tokens_per_second"])
ctx.close()
out["prefill"] = statistics.median(pf)
out["prefill_tokens"] = st.timings["n_prompt_tokens"]
"""
