"""Batch generation over a Ray cluster with llamagen: Parquet prompts in, Parquet replies out.

Run it on a machine of a running Ray cluster (``ray start --head`` there, ``ray start
--address=HEAD:6379`` on the others), with llamagen and ``ray[data]`` installed on every node
(``pip install "llamagen[ray]"``) and the model at the same path on every node (shared storage,
or copied to each):

    python examples/ray_cluster.py --model /models/gemma3-270m.gguf \\
        --input s3://bucket/prompts/ --output s3://bucket/replies/ \\
        --actors 16 --cpus-per-actor 4 --max-new-tokens 256

The input is any Parquet dataset with a ``prompt`` column (or ``messages`` with ``--chat``: a
list of {"role", "content"} structs); every other column (an id, a ``seed``, a
``max_new_tokens`` per row) is kept, and the replies add ``text``, ``finish_reason``,
``n_prompt_tokens``, ``n_tokens`` and ``error``.  ``--demo N`` makes N prompts instead of
reading ``--input`` (try it on one machine: ``ray.init`` then starts a local cluster).
"""
from __future__ import annotations

import argparse
import time

import ray

import llamagen.ray


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="GGUF path, the same on every node")
    ap.add_argument("--input", help="Parquet prompts (a local path, s3://, gs://, ...)")
    ap.add_argument("--output", required=True, help="where to write the Parquet replies")
    ap.add_argument("--chat", action="store_true", help="rows hold 'messages', not 'prompt'")
    ap.add_argument("--demo", type=int, metavar="N", help="N made-up prompts instead of --input")
    ap.add_argument("--actors", type=int, default=4, help="actors (one model each)")
    ap.add_argument("--cpus-per-actor", type=int, default=4, help="CPUs = llama.cpp threads each")
    ap.add_argument("--batch-size", type=int, default=128, help="rows per call")
    ap.add_argument("--slots", type=int, default=32, help="sequences decoded together per actor")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temp", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--max-errored-blocks", type=int, default=0,
                    help="blocks Ray may skip after a failure (their rows are then missing)")
    a = ap.parse_args(argv)
    if (a.input is None) == (a.demo is None):
        ap.error("give --input or --demo N")

    ray.init(address="auto" if a.demo is None else None)
    ray.data.DataContext.get_current().max_errored_blocks = a.max_errored_blocks

    if a.demo is not None:
        topics = ["the sea", "a city", "winter", "robots", "the moon", "tea", "maps", "trains"]
        ds = ray.data.from_items([{"id": i, "prompt": f"Write two sentences about "
                                   f"{topics[i % len(topics)]}.", "seed": i}
                                  for i in range(a.demo)])
    else:
        ds = ray.data.read_parquet(a.input)

    common = dict(model=a.model, actors=a.actors, cpus_per_actor=a.cpus_per_actor,
                  batch_size=a.batch_size, n_seq_max=a.slots, max_new_tokens=a.max_new_tokens,
                  temp=a.temp, seed=a.seed)
    # a dead actor is restarted and its batches retried without limit (Ray Data's default);
    # docs/ray.md tells how to bound that
    if a.chat:
        out = llamagen.ray.chat(ds, messages_column="messages", **common)
    else:
        out = llamagen.ray.generate(ds, prompt_column="prompt", **common)

    t = time.perf_counter()
    out.write_parquet(a.output)
    wall = time.perf_counter() - t
    done = ray.data.read_parquet(a.output)
    n = done.count()
    tokens = done.sum("n_tokens") or 0
    failed = done.filter(lambda r: r["error"] is not None).count()
    print(f"{n} rows ({failed} with an error), {tokens} tokens in {wall:.1f} s: "
          f"{tokens / wall:.1f} tokens/s, {n / wall:.2f} rows/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
