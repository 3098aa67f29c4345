"""llama-cpp-python side of the comparison (run with the benchmark's separate virtualenv).

Reads a JSON job on stdin, prints JSON results.  Same model, prompt, threads, context and sampler
chain as the llamagen runs; times only the token loop (prompt prefill subtracted).
"""
import json
import sys
import time

import llama_cpp


def main():
    job = json.load(sys.stdin)
    llm = llama_cpp.Llama(model_path=job["model"], n_ctx=job["n_ctx"], n_batch=512, n_threads=job["threads"],
                          n_threads_batch=job["threads"], n_gpu_layers=0, verbose=False, seed=job["seed"])
    eos_ban = {t: -float("inf") for t in job.get("ban_tokens", [])}
    out = []
    for run in job["runs"]:
        kw = dict(max_tokens=run["n"], temperature=run["temp"], top_k=run["top_k"], top_p=run["top_p"],
                  min_p=0.0, typical_p=1.0, repeat_penalty=1.0, frequency_penalty=0.0,
                  presence_penalty=0.0, seed=job["seed"])
        if eos_ban:
            kw["logit_bias"] = eos_ban
        # prefill + first token, to subtract
        llm.reset()
        t0 = time.perf_counter()
        llm.create_completion(job["prompt"], **dict(kw, max_tokens=1))
        t_first = time.perf_counter() - t0
        llm.reset()
        if run["stream"]:
            t0 = time.perf_counter()
            n = 0
            for chunk in llm.create_completion(job["prompt"], stream=True, **kw):
                if chunk["choices"][0]["finish_reason"] is None:
                    n += 1          # the last chunk only carries the finish reason
            total = time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            res = llm.create_completion(job["prompt"], **kw)
            total = time.perf_counter() - t0
            n = res["usage"]["completion_tokens"]
        out.append(dict(run, n_tokens=n, seconds=total - t_first,
                        tokens_per_second=(n - 1) / (total - t_first) if n > 1 else None))
    json.dump({"version": llama_cpp.__version__, "results": out}, sys.stdout)


if __name__ == "__main__":
    main()
