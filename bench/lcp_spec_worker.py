"""llama-cpp-python side of bench/speculative.py (run with bench/.venv-lcp's python).

Reads a JSON job on stdin ({model, n_ctx, threads, runs: [{prompt, n, temp, top_k, top_p, seed,
lookup}]}), prints JSON results.  ``lookup`` > 0 uses llama-cpp-python's prompt lookup decoding
(``LlamaPromptLookupDecoding(num_pred_tokens=lookup)``).  Times only the token loop: a prefill plus
one token is timed separately and subtracted.  flash_attn=True, as llamagen's contexts use it.
"""
import json
import sys
import time

import llama_cpp
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding


def main():
    job = json.load(sys.stdin)
    models = {}
    out = []
    for run in job["runs"]:
        key = run["lookup"]
        if key not in models:
            draft = LlamaPromptLookupDecoding(num_pred_tokens=key) if key else None
            models[key] = llama_cpp.Llama(
                model_path=job["model"], n_ctx=job["n_ctx"], n_batch=512, n_threads=job["threads"],
                n_threads_batch=job["threads"], n_gpu_layers=0, verbose=False, flash_attn=True,
                draft_model=draft)
        llm = models[key]
        kw = dict(max_tokens=run["n"], temperature=run["temp"], top_k=run["top_k"],
                  top_p=run["top_p"], min_p=0.0, typical_p=1.0, repeat_penalty=1.0,
                  frequency_penalty=0.0, presence_penalty=0.0, seed=run["seed"])
        llm.reset()
        t0 = time.perf_counter()
        llm.create_completion(run["prompt"], **dict(kw, max_tokens=1))
        t_first = time.perf_counter() - t0
        llm.reset()
        t0 = time.perf_counter()
        res = llm.create_completion(run["prompt"], **kw)
        total = time.perf_counter() - t0
        n = res["usage"]["completion_tokens"]
        out.append(dict(run, prompt=None, text=res["choices"][0]["text"], n_tokens=n,
                        seconds=total - t_first,
                        tokens_per_second=(n - 1) / (total - t_first) if n > 1 else None))
    json.dump({"version": llama_cpp.__version__, "results": out}, sys.stdout)


if __name__ == "__main__":
    main()
