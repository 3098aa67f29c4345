"""Greedy agreement of speculative decoding with plain decoding, over many prompts.

  python bench/spec_agreement.py [--models smollm2,gemma3] [--tokens 128] [--threads 2] [--no-write]

A verify decode computes the pending token and its draft as one many-row batch; plain decoding
computes one row per token, and llama.cpp's CPU kernels are not batch-invariant, so a near-tie can
go the other way.  For each prompt (bench/speculative.py's 18 and 34 more of the same kinds) this
runs plain greedy decoding (with logprobs: the top-2 margin where a text first differs) and
speculative decoding twice, alternating, on one default context.  Reports identical texts, whether
the two speculative runs agreed with each other, where each text first differs, and decode
tokens/s (ratios within a prompt).  Writes bench/out/spec_agreement.json and bench/RESULTS.md
section 24.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import speculative as S  # noqa: E402  (bench/speculative.py: prompts, models, one stream)

import llamagen  # noqa: E402
from llamagen import Speculative  # noqa: E402

OUT_JSON = os.path.join(HERE, "out", "spec_agreement.json")
HEADING = "## 24. Speculative decoding: greedy agreement over 104 prompts"
SPEC = S.SPEC
AGREEMENT_WHY = (
    "Two runs of the same prompt can differ from each other: the adaptive draft lengths follow "
    "measured times, so the verify batches, and their rounding, change. The rounding that moves "
    "these tokens is in the KV cells that verify batches write for accepted tokens (many-row "
    "kernels), not only in the verified row itself: a run on 2026-12-07 09:28 UTC with a guard that "
    "decoded every verified row whose top two logits were closer than 0.5 nats alone, beside the "
    "same run without it, gave the same five gemma3 divergences at the same tokens in both, so the "
    "guard was dropped (git 82a5c26, 9dd90e3). Longer accepted drafts write more cells in many-row "
    "batches. With `Context(deterministic=True)` speculative output is identical to plain output "
    "(tests/test_speculative.py).")


def prompts():
    """(kind, instruction): bench/speculative.py's set, then more of each kind."""
    out = list(S.instructions())
    for p in S.PARAS:
        out.append(("rewrite", f"Rewrite the paragraph below in the past tense:\n\n{p}"))
        out.append(("quotes", f"Number the sentences of the paragraph below, one per line:\n\n{p}"))
        out.append(("translate", f"Translate the paragraph below into French:\n\n{p}"))
    for r in S.RECORDS:
        out.append(("extract", "Write the record below as YAML with the keys number, name, date, "
                    f"amount and city:\n\n{r}"))
        out.append(("extract", f"Copy the record below, then give its date in ISO format:\n\n{r}"))
    for li in S.LISTS:
        out.append(("translate", f"Sort this list alphabetically, keeping the numbers:\n\n{li}"))
        out.append(("translate", f"Translate this list into Spanish, keeping the numbers:\n\n{li}"))
    for c in S.CODE:
        out.append(("code", "Add type hints to every function in this file and output the whole "
                    f"file:\n\n{c}"))
        out.append(("code", f"Rename every function in this file with a 'do_' prefix:\n\n{c}"))
    for topic in ("a city built on a lake", "the first day at a new school", "a robot that learns to "
                  "paint", "why bridges are built the way they are", "a storm at sea",
                  "the history of the bicycle"):
        out.append(("open", f"Write a short text about {topic}."))
    return out


def bench_model(name, path, tokens, threads):
    model = llamagen.Model(path)
    ctx = llamagen.Context(model, n_ctx=4096, n_threads=threads)
    rows = []
    for kind, instr in prompts():
        prompt = S.prompt_for(name, model, instr)
        plain = S.one_stream(ctx, prompt, tokens, S.GREEDY, None, logprobs=True)
        plain_tps, runs = [plain["tokens_per_second"]], []
        for rep in range(2):            # alternating, medians of two
            runs.append(S.one_stream(ctx, prompt, tokens, S.GREEDY, SPEC))
            plain_tps.append(S.one_stream(ctx, prompt, tokens, S.GREEDY, None)["tokens_per_second"])
        r = runs[0]
        row = {"model": name, "kind": kind, "plain_tps": statistics.median(plain_tps),
               "spec_tps": statistics.median(x["tokens_per_second"] for x in runs),
               "same": [x["tokens"] == plain["tokens"] for x in runs],
               "stable": runs[1]["tokens"] == r["tokens"],
               "divergence": [S.divergence(plain, x) for x in runs],
               "accepted": r["stats"]["accepted"], "drafted": r["stats"]["drafted"]}
        rows.append(row)
        S.log(f"{name:8s} {kind:9s} plain {row['plain_tps']:6.1f}  spec {row['spec_tps']:6.1f} "
              f"same={row['same']} acc={row['accepted']}/{row['drafted']}")
    ctx.close()
    model.close()
    return rows


def write(res) -> str:
    L = [HEADING, "",
         f"Generated by `python bench/spec_agreement.py --tokens {res['tokens']}` on {res['date']}, "
         f"{res['cpu']}, {res['threads']} threads, nothing else running. Greedy, {res['tokens']} new "
         "tokens, one default context per model; drafting as in section 18 (`ngram-simple`, n-gram "
         f"{S.NGRAM_N}, drafts up to {S.NGRAM_M}, adaptive), two speculative runs per prompt beside "
         "plain ones. Tokens/s: the x column is the median of the per-prompt ratios.", "",
         "| model | prompts | same texts (run 1, run 2) | the two runs the same | accepted / drafted "
         "(run 1) | spec x plain |",
         "|---|---:|---:|---:|---:|---:|"]
    for name in res["models"]:
        rows = [r for r in res["rows"] if r["model"] == name]
        n = len(rows)
        same = [sum(r["same"][i] for r in rows) for i in (0, 1)]
        stable = sum(r["stable"] for r in rows)
        acc = sum(r["accepted"] for r in rows)
        dr = sum(r["drafted"] for r in rows)
        x = statistics.median(r["spec_tps"] / r["plain_tps"] for r in rows)
        L.append(f"| {name} | {n} | {same[0]}/{n}, {same[1]}/{n} | {stable}/{n} | {acc} / {dr} | "
                 f"{x:.2f} |")
    L.append("")
    diffs = []
    for r in res["rows"]:
        for i, d in enumerate(r["divergence"]):
            if not r["same"][i] and d:
                m = "unknown" if d["margin"] is None else f"{d['margin']:.4f} nats"
                diffs.append(f"{r['model']} {r['kind']} (run {i + 1}): token {d['index']}, plain's "
                             f"top-2 margin {m}")
    L.append("Divergences: " + ("; ".join(diffs) + "." if diffs else "none."))
    L.append("")
    texts = [s for r in res["rows"] for s in r["same"]]
    margins = [d["margin"] for r in res["rows"] for i, d in enumerate(r["divergence"])
               if not r["same"][i] and d and d["margin"] is not None]
    span = f", each at a token plain decoding saw within {min(margins):.3f}-{max(margins):.3f} " \
           "nats of another" if margins else ""
    L.append(f"Agreement: {sum(texts)} of {len(texts)} speculative texts are plain decoding's "
             f"({100 * sum(texts) / len(texts):.1f} %; target 99 %){span}. {AGREEMENT_WHY}")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--rewrite", action="store_true",
                    help="only write the section again from bench/out/spec_agreement.json")
    a = ap.parse_args(argv)
    if a.rewrite:
        with open(OUT_JSON) as fh:
            S._replace_section(write(json.load(fh)), HEADING)
        return 0
    paths = S.model_paths()
    models = a.models.split(",")
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": S._cpu(),
           "threads": a.threads, "tokens": a.tokens, "models": models, "rows": []}
    for name in models:
        res["rows"] += bench_model(name, paths[name], a.tokens, a.threads)
    S.publish(res, OUT_JSON, write(res), HEADING, not a.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
