"""llama-cpp-python side of bench/embeddings.py (run with the benchmark's separate virtualenv).

Reads a JSON job on stdin ({model, n_ctx, n_batch, threads, sets: {name: [texts]}}), embeds each
set with Llama.embed (given the whole list, its fastest use), prints {name: seconds} as JSON.
"""
import json
import sys
import time

import llama_cpp


def main():
    job = json.load(sys.stdin)
    llm = llama_cpp.Llama(model_path=job["model"], embedding=True, n_ctx=job["n_ctx"],
                          n_batch=job["n_batch"], n_ubatch=job["n_batch"], n_threads=job["threads"],
                          n_threads_batch=job["threads"], n_gpu_layers=0, flash_attn=True,
                          pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, verbose=False)
    llm.embed(["warm up"])
    out = {}
    for name, texts in job["sets"].items():
        t0 = time.perf_counter()
        vecs = llm.embed(texts)
        out[name] = time.perf_counter() - t0
        out[name + ":first"] = vecs[0][:8]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
