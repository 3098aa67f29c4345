"""Speculative decoding with a draft model (`draft-simple`), beside n-gram drafting.

  python bench/spec_draft.py [--tokens 128] [--threads 2] [--layers 4,8] [--no-write]

A draft model must share the target's vocabulary, and this project's registry has no two models
that do.  So the drafts here are made from the target itself, which is the only way to get a
same-vocabulary pair offline: SmolLM2-135M-Instruct Q4_1 (30 layers) drafting for itself (every
draft accepted under greedy decoding: the upper bound on acceptance, at a draft cost of a whole
target step per token) and copies of it keeping only its first L layers (early exit, as
LayerSkip drafts: cheaper per token, untrained for it, so fewer drafts are accepted), written
with the `gguf` package into bench/out/drafts/.  Greedy, bench/speculative.py's repetitive
prompts as chat turns, one stream: decode tokens/s against plain decoding and against
`ngram-simple`.  Writes bench/out/spec_draft.json and bench/RESULTS.md section 25.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import speculative as S  # noqa: E402  (bench/speculative.py: prompts, models, one stream)

import llamagen  # noqa: E402
from llamagen import Speculative  # noqa: E402

OUT_JSON = os.path.join(HERE, "out", "spec_draft.json")
DRAFTS = os.path.join(HERE, "out", "drafts")
HEADING = "## 25. Speculative decoding with a draft model"


def truncated(src: str, layers: int) -> str:
    """A copy of the GGUF model ``src`` keeping its first ``layers`` blocks (same vocabulary,
    embeddings, final norm and output): an early-exit draft model."""
    import gguf
    dst = os.path.join(DRAFTS, f"{os.path.splitext(os.path.basename(src))[0]}.L{layers}.gguf")
    if os.path.exists(dst):
        return dst
    os.makedirs(DRAFTS, exist_ok=True)
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst + ".tmp", arch)
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        if name == f"{arch}.block_count":
            value = layers
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, value, vtype, sub_type=sub)
    kept = [t for t in r.tensors
            if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < layers]
    for t in kept:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in kept:
        w.write_tensor_data(t.data)
    w.close()
    os.replace(dst + ".tmp", dst)
    return dst


def one(ctx, prompt, tokens, spec):
    st = llamagen.gen_begin(ctx, prompt, max_new_tokens=tokens, speculative=spec, **S.GREEDY)
    text = "".join(st) + st.end()
    return {"text": text, "tokens_per_second": st.timings["tokens_per_second"],
            "stats": st.speculative_stats}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", default="4,8", help="early-exit drafts: layers kept")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    path = S.model_paths()["smollm2"]
    model = llamagen.Model(path)
    ctx = llamagen.Context(model, n_ctx=4096, n_threads=a.threads)
    drafts = {"itself (30 layers)": model}
    for n in (int(x) for x in a.layers.split(",")):
        drafts[f"first {n} layers"] = llamagen.Model(truncated(path, n))
    configs = {"ngram-simple": S.SPEC}
    for label, dm in drafts.items():
        configs[f"draft: {label}"] = Speculative(type="draft-simple", draft_model=dm,
                                                 n_max=S.NGRAM_M)
    rows = []
    for kind, instr in S.instructions():
        if kind in S.OPEN_KINDS:
            continue
        prompt = S.prompt_for("smollm2", model, instr)
        plain = [one(ctx, prompt, a.tokens, None) for _ in range(2)]
        row = {"kind": kind, "plain": statistics.median(x["tokens_per_second"] for x in plain)}
        for label, spec in configs.items():
            got = [one(ctx, prompt, a.tokens, spec) for _ in range(2)]
            row[label] = {"tokens_per_second": statistics.median(x["tokens_per_second"] for x in got),
                          "accepted": got[0]["stats"]["accepted"],
                          "drafted": got[0]["stats"]["drafted"],
                          "same": got[0]["text"] == plain[0]["text"]}
            S.log(f"{kind:9s} {label:24s} plain {row['plain']:6.1f} spec "
                  f"{row[label]['tokens_per_second']:6.1f} acc {row[label]['accepted']}/"
                  f"{row[label]['drafted']} same={row[label]['same']}")
        rows.append(row)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": S._cpu(),
           "threads": a.threads, "tokens": a.tokens, "configs": list(configs), "rows": rows}
    S.publish(res, OUT_JSON, write(res), HEADING, not a.no_write)
    return 0


def write(res) -> str:
    L = [HEADING, "",
         f"Generated by `python bench/spec_draft.py --tokens {res['tokens']}` on {res['date']}, "
         f"{res['cpu']}, {res['threads']} threads, nothing else running. Target SmolLM2-135M-Instruct "
         f"Q4_1, greedy, {res['tokens']} new tokens, bench/speculative.py's {len(res['rows'])} "
         "repetitive prompts as chat turns, one stream; drafts of up to 16 tokens, adaptive. No two "
         "models in the registry share a vocabulary, so the draft models are made from the target: "
         "itself (every draft accepted, each drafted token costing a target step) and its first "
         "layers (early exit, untrained for it). x: median over the prompts of spec / plain "
         "tokens/s.", "",
         "| drafting | accepted / drafted | same text as plain | x plain |",
         "|---|---:|---:|---:|"]
    for label in res["configs"]:
        acc = sum(r[label]["accepted"] for r in res["rows"])
        dr = sum(r[label]["drafted"] for r in res["rows"])
        same = sum(r[label]["same"] for r in res["rows"])
        x = statistics.median(r[label]["tokens_per_second"] / r["plain"] for r in res["rows"])
        L.append(f"| {label} | {acc} / {dr} | {same}/{len(res['rows'])} | {x:.2f} |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
