"""Sampler-configuration benchmark: how much each sampler chain costs per generated token.

``sweep_samplers(model, configs)`` runs every configuration on one context (``warmup`` untimed
runs, then ``repeats`` timed ones) and reports, per configuration, the median and spread of

* ``sample_ms_per_token``: time spent in the sampler chain (and grammar) per token, decode excluded;
* ``decode_ms_per_token``: the rest of each step (llama_decode, detokenizing) per token;
* ``tokens_per_second``: generated tokens over the whole generation loop (decode + sampling);

plus ``n_tokens`` and ``finish_reason``.  A configuration that fails (an invalid grammar, a bad
value) records ``error`` and the sweep goes on.  Render the rows with ``format_table``,
``to_json``, ``to_csv`` or ``plot`` (needs the optional ``plot`` extra: matplotlib).

From the command line: ``llamagen bench samplers [--model PATH] [--configs FILE] ...``.

Configurations are ``{name: {SamplingParams field: value}}`` (or ``{name: SamplingParams}``), or a
list of ``{"name": ..., field: value, ...}``.  The sweep's ``max_new_tokens`` and ``ignore_eos``
apply to every configuration unless a field dict sets them itself (a ``SamplingParams`` always gets
the sweep's values).  ``load_configs(path)`` reads and validates such a JSON file.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from llamagen._configs import (  # noqa: F401  (_require_matplotlib: the CLI checks it first)
    Configs, ConfigSpec, _check_fields, _make_params, _normalize_configs, _require_matplotlib,
)
from llamagen.quality import (  # noqa: F401  (re-exported: llamagen.bench.sweep_quality)
    DEFAULT_QUALITY_CONFIGS, format_quality_table, plot_frontier, sweep_quality, to_html,
)
from llamagen.sampling import FIELDS, SAMPLER_IMPLS, SamplingParams

__all__ = [
    "DEFAULT_PROMPT", "JSON_OBJECT_GRAMMAR", "DEFAULT_CONFIGS", "METRICS", "sweep_samplers",
    "load_configs", "format_table", "format_engine_table", "to_json", "to_csv", "plot",
    "sweep_quality", "DEFAULT_QUALITY_CONFIGS", "format_quality_table", "to_html", "plot_frontier",
]

DEFAULT_PROMPT = "The three most important inventions in history are"

# a small JSON object: {"name": "...", "age": N}
JSON_OBJECT_GRAMMAR = r'''root   ::= "{" ws "\"name\"" ws ":" ws string "," ws "\"age\"" ws ":" ws number ws "}"
string ::= "\"" [a-zA-Z ]{1,20} "\""
number ::= [0-9]{1,3}
ws     ::= [ ]?
'''

# Each entry changes these fields from the SamplingParams defaults (temp 0.8, top_k 50, top_p 0.9).
# The single-filter entries switch the other filters off so that they measure that filter alone;
# penalties, mirostat, DRY, XTC and top-n-sigma are added to the default chain.
DEFAULT_CONFIGS: Dict[str, Dict[str, Any]] = {
    "greedy": {"temp": 0.0},
    "default": {},
    "temp_only": {"top_k": 0, "top_p": 1.0},
    "top_k_40": {"top_k": 40, "top_p": 1.0},
    "top_p_0.9": {"top_k": 0, "top_p": 0.9},
    "min_p_0.05": {"top_k": 0, "top_p": 1.0, "min_p": 0.05},
    "typical_p_0.9": {"top_k": 0, "top_p": 1.0, "typical_p": 0.9},
    "penalties": {"repeat_penalty": 1.1, "frequency_penalty": 0.1, "presence_penalty": 0.1,
                  "repeat_last_n": 64},
    "penalties_ctx": {"repeat_penalty": 1.1, "frequency_penalty": 0.1, "presence_penalty": 0.1,
                      "repeat_last_n": -1},
    "mirostat_1": {"mirostat": 1},
    "mirostat_2": {"mirostat": 2},
    # the grammar may end the generation once the object is complete: with EOS ignored, every
    # later token would be a forced EOS through the reject-and-resample path, not a grammar workload
    "grammar_json": {"grammar": JSON_OBJECT_GRAMMAR, "ignore_eos": False},
    "dry": {"dry_multiplier": 0.8},
    "xtc": {"xtc_probability": 0.5, "xtc_threshold": 0.1},
    "top_n_sigma_1.5": {"top_n_sigma": 1.5},
}

# per-run measurements, each reported as <name>_median, _min, _max, _stdev
METRICS = ("sample_ms_per_token", "decode_ms_per_token", "tokens_per_second")




# -- configurations ------------------------------------------------------------------------------

def load_configs(path: Union[str, os.PathLike]) -> Dict[str, Dict[str, Any]]:
    """Read sampler configurations from a JSON file and validate them against SamplingParams.

    The file holds ``{"name": {field: value, ...}, ...}`` or ``[{"name": ..., field: value}, ...]``.
    Returns ``{name: fields}`` in file order.  Unknown fields, bad values and a malformed file
    raise ``ValueError`` naming the file and the configuration.  (``logit_bias`` may be written as
    ``{"token id": bias}``: JSON keys are strings.)
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, (dict, list)):
        raise ValueError(f"{path}: expected a JSON object {{name: {{fields}}}} or a list of "
                         f"{{\"name\": ..., fields}}, got {type(data).__name__}")
    try:
        items = _normalize_configs(data, DEFAULT_CONFIGS)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    if not items:
        raise ValueError(f"{path}: no configurations")
    out: Dict[str, Dict[str, Any]] = {}
    for name, fields in items:
        assert isinstance(fields, dict)
        if name in out:
            raise ValueError(f"{path}: configuration name {name!r} is used twice")
        bias = fields.get("logit_bias")
        if isinstance(bias, dict):
            try:
                fields["logit_bias"] = {int(k): v for k, v in bias.items()}
            except ValueError:
                raise ValueError(f"{path}: configuration {name!r}: logit_bias keys must be token "
                                 f"ids, got {sorted(bias)!r}") from None
        try:
            _check_fields(fields, name)
            SamplingParams(**fields)
        except (TypeError, ValueError) as e:
            msg = str(e)
            if not msg.startswith("configuration "):
                msg = f"configuration {name!r}: {msg}"
            raise ValueError(f"{path}: {msg}") from None
        out[name] = fields
    return out


# -- the sweep -----------------------------------------------------------------------------------

class _Progress:
    """tqdm when importable, else a one-line counter on stderr; nothing when disabled."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled, self.bar = total, 0, enabled, None
        self.label = ""
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            self.bar = tqdm(total=total, desc="bench samplers", unit="run", file=sys.stderr,
                            dynamic_ncols=True)

    def set(self, label: str) -> None:
        self.label = label
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=True)
        elif self.enabled:
            self._line()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            self._line()

    def _line(self) -> None:
        sys.stderr.write(f"\rbench samplers: {self.done}/{self.total} runs  {self.label:<30.30}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _summary(values: List[float]) -> Dict[str, Optional[float]]:
    if not values:
        return {"median": None, "min": None, "max": None, "stdev": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else None}


def _run_metrics(state) -> Dict[str, Any]:
    t = state.timings
    n = t["n_tokens"]
    decode_ms, sample_ms = t["decode_ms"], t["sample_ms"]
    return {
        "sample_ms_per_token": sample_ms / n if n else None,
        "decode_ms_per_token": (decode_ms - sample_ms) / n if n else None,
        "tokens_per_second": n / (decode_ms / 1000.0) if n and decode_ms > 0 else None,
        "n_tokens": n,
        "finish_reason": state.finish_reason,
        "sample_ms": sample_ms,
        "decode_ms": decode_ms,
        "prefill_ms": t["prefill_ms"],
    }


def _changed_fields(params: SamplingParams) -> Dict[str, Any]:
    """The fields that differ from the SamplingParams defaults (as JSON-friendly values)."""
    base = SamplingParams().to_dict()
    return {k: v for k, v in params.to_dict().items() if base[k] != v}


def _row(name: str, params: Optional[SamplingParams], runs: List[Dict[str, Any]],
         error: Optional[str]) -> Dict[str, Any]:
    row: Dict[str, Any] = {"name": name}
    for m in METRICS:
        s = _summary([r[m] for r in runs if r[m] is not None])
        for k in ("median", "min", "max", "stdev"):
            row[f"{m}_{k}"] = s[k]
    ns = [r["n_tokens"] for r in runs]
    row["n_tokens"] = (ns[0] if len(set(ns)) == 1 else int(statistics.median(ns))) if ns else None
    reasons = sorted({r["finish_reason"] for r in runs if r["finish_reason"]})
    row["finish_reason"] = "/".join(reasons) if reasons else None
    row["repeats"] = len(runs)
    row["error"] = error
    row["params"] = _changed_fields(params) if params is not None else None
    row["runs"] = runs
    return row


def sweep_samplers(model, configs: Optional[Configs] = None, *, prompt: str = DEFAULT_PROMPT,
                   max_new_tokens: int = 64, repeats: int = 3, warmup: int = 1, n_ctx: int = 2048,
                   n_threads: Optional[int] = None, ignore_eos: bool = True,
                   progress: bool = True,
                   sampler_impls: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Time every sampler configuration; one row (dict) per configuration, in order.

    ``model`` is a ``llamagen.Model`` or a GGUF path (loaded here, and closed afterwards).
    ``configs``: see the module docstring; None runs ``DEFAULT_CONFIGS``.  One Context (``n_ctx``,
    ``n_threads``) serves the whole sweep.  Each configuration gets ``warmup`` untimed runs, then
    ``repeats`` timed runs of ``prompt`` (the same seed each time).

    Row keys: ``name``; for each of ``METRICS``: ``<metric>_median``, ``_min``, ``_max`` and
    ``_stdev`` (None with a single repeat); ``n_tokens``; ``finish_reason``; ``repeats`` (timed
    runs done); ``error`` (None, or the exception that stopped this configuration); ``params``
    (fields changed from the SamplingParams defaults); ``runs`` (the per-run measurements);
    ``sampler_impl`` (the engine that ran it).

    ``sampler_impls``: run every configuration once per engine, e.g. ``("llama.cpp", "fast")``
    (one row each, in that order; compare them with ``format_engine_table``).  None: each
    configuration's own ``sampler_impl`` (default "fast").
    """
    import llamagen
    from llamagen import _core

    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    items = _normalize_configs(configs, DEFAULT_CONFIGS)
    if not items:
        raise ValueError("no configurations to run")
    names = [n for n, _ in items]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"configuration name(s) used twice: {', '.join(dup)}")
    if sampler_impls is not None:
        impls = list(sampler_impls)
        bad = [i for i in impls if i not in SAMPLER_IMPLS]
        if not impls or bad or len(set(impls)) != len(impls):
            raise ValueError(f"sampler_impls must list distinct values of {SAMPLER_IMPLS}, got {sampler_impls!r}")
        items = [(name, spec, impl) for name, spec in items for impl in impls]
    else:
        items = [(name, spec, None) for name, spec in items]

    own_model = not isinstance(model, llamagen.Model)
    if own_model:
        model = llamagen.Model(os.fspath(model))
    rows: List[Dict[str, Any]] = []
    per_config = warmup + repeats
    bar = _Progress(len(items) * per_config, progress)
    try:
        with llamagen.Context(model, n_ctx=n_ctx, n_threads=n_threads) as ctx:
            for name, spec, impl in items:
                bar.set(name if impl is None else f"{name} [{impl}]")
                runs: List[Dict[str, Any]] = []
                params = None
                error = None
                done = 0
                try:
                    params = _make_params(name, spec, max_new_tokens, ignore_eos)
                    if impl is not None:
                        params = params.replace(sampler_impl=impl)
                    for i in range(per_config):
                        _text, state = _core._generate(ctx, prompt, params)
                        if i >= warmup:
                            runs.append(_run_metrics(state))
                        done += 1
                        bar.update()
                except Exception as e:  # a bad configuration must not stop the sweep
                    error = f"{type(e).__name__}: {e}"
                    bar.update(per_config - done)
                row = _row(name, params, runs, error)
                row["sampler_impl"] = (impl if impl is not None else
                                       (params.sampler_impl if params is not None else None))
                rows.append(row)
    finally:
        bar.close()
        if own_model:
            model.close()
    return rows


# -- rendering -----------------------------------------------------------------------------------

def _fmt(v, digits: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def format_table(rows: List[Dict[str, Any]]) -> str:
    """An aligned plain-text table: sampling and decode ms per token, tokens/s, tokens, finish."""
    headers = ["config", "sample ms/tok", "min", "max", "stdev", "decode ms/tok", "tok/s",
               "tok/s min", "tok/s max", "tokens", "finish"]
    any_error = any(r.get("error") for r in rows)
    if any_error:
        headers.append("error")
    body = []
    for r in rows:
        line = [
            str(r["name"]),
            _fmt(r.get("sample_ms_per_token_median"), 4),
            _fmt(r.get("sample_ms_per_token_min"), 4),
            _fmt(r.get("sample_ms_per_token_max"), 4),
            _fmt(r.get("sample_ms_per_token_stdev"), 4),
            _fmt(r.get("decode_ms_per_token_median"), 3),
            _fmt(r.get("tokens_per_second_median"), 1),
            _fmt(r.get("tokens_per_second_min"), 1),
            _fmt(r.get("tokens_per_second_max"), 1),
            "-" if r.get("n_tokens") is None else str(r["n_tokens"]),
            r.get("finish_reason") or "-",
        ]
        if any_error:
            line.append(r.get("error") or "")
        body.append(line)
    left = {0, 10, 11}  # text columns
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(headers)]

    def fmt_line(cells):
        out = []
        for i, c in enumerate(cells):
            last = i == len(cells) - 1
            if i in left:
                out.append(c if last else c.ljust(widths[i]))
            else:
                out.append(c.rjust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [fmt_line(headers), fmt_line(["-" * w for w in widths])]
    lines += [fmt_line(b) for b in body]
    return "\n".join(lines) + "\n"


def format_engine_table(rows: List[Dict[str, Any]], *, markdown: bool = False) -> str:
    """Both engines side by side (rows of a sweep run with ``sampler_impls``): per configuration,
    sampling ms per token with llama.cpp's chain and with the fast engine, the speed-up, and
    tokens/s of the whole generation loop with each."""
    by: Dict[str, Dict[str, Dict[str, Any]]] = {}
    order: List[str] = []
    for r in rows:
        if r["name"] not in by:
            by[r["name"]] = {}
            order.append(r["name"])
        by[r["name"]][r.get("sampler_impl") or "fast"] = r
    headers = ["config", "llama.cpp ms/tok", "fast ms/tok", "speed-up", "llama.cpp tok/s", "fast tok/s"]
    body = []
    for name in order:
        a, b = by[name].get("llama.cpp", {}), by[name].get("fast", {})
        ma, mb = a.get("sample_ms_per_token_median"), b.get("sample_ms_per_token_median")
        body.append([name, _fmt(ma, 3), _fmt(mb, 3),
                     f"{ma / mb:.1f}x" if ma and mb else "-",
                     _fmt(a.get("tokens_per_second_median"), 1), _fmt(b.get("tokens_per_second_median"), 1)])
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * 5) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines) + "\n"
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                                  for i, c in enumerate(cells)).rstrip()
    lines = [fmt(headers), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
    return "\n".join(lines) + "\n"


def to_json(rows: List[Dict[str, Any]], *, indent: Optional[int] = 2) -> str:
    """The rows as a JSON array (per-run measurements included under "runs")."""
    return json.dumps(rows, indent=indent) + "\n"


def _csv_columns(rows: List[Dict[str, Any]]) -> List[str]:
    cols = ["name"]
    for m in METRICS:
        cols += [f"{m}_median", f"{m}_min", f"{m}_max", f"{m}_stdev"]
    cols += ["n_tokens", "finish_reason", "repeats", "error", "params", "sampler_impl"]
    return cols


def to_csv(rows: List[Dict[str, Any]]) -> str:
    """The rows as CSV, one line per configuration (``params`` as a JSON string, no per-run data)."""
    buf = io.StringIO()
    cols = _csv_columns(rows)
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        rec = {c: r.get(c) for c in cols}
        rec["params"] = json.dumps(r.get("params"), sort_keys=True) if r.get("params") is not None else ""
        for c in cols:
            if rec[c] is None:
                rec[c] = ""
        w.writerow(rec)
    return buf.getvalue()


def plot(rows: List[Dict[str, Any]], path: Union[str, os.PathLike], *,
         title: Optional[str] = None) -> str:
    """Write a bar chart (PNG, or any format matplotlib infers from the suffix) of the median
    sampling ms per token of each configuration, with min-max error bars.  Configurations that
    failed are left out.  Needs matplotlib (``pip install "llamagen[plot]"``).  Returns the path."""
    Figure = _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    ok = [r for r in rows if r.get("sample_ms_per_token_median") is not None]
    if not ok:
        raise ValueError("nothing to plot: no configuration has timings")
    names = [str(r["name"]) for r in ok]
    med = [r["sample_ms_per_token_median"] for r in ok]
    lo = [max(0.0, m - r["sample_ms_per_token_min"]) for m, r in zip(med, ok)]
    hi = [max(0.0, r["sample_ms_per_token_max"] - m) for m, r in zip(med, ok)]
    fig = Figure(figsize=(8.0, 1.2 + 0.38 * len(ok)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ypos = list(range(len(ok)))
    ax.barh(ypos, med, xerr=[lo, hi], color="#4C72B0", ecolor="#333333", capsize=3)
    ax.set_yticks(ypos)
    ax.set_yticklabels(names)
    ax.invert_yaxis()
    ax.set_xlabel("sampling ms per token (median, min-max)")
    ok_ids = {id(r) for r in ok}
    failed = [str(r["name"]) for r in rows if id(r) not in ok_ids]
    heading = title or "llamagen sampler configurations"
    if failed:
        heading += "\n(failed, not shown: " + ", ".join(failed) + ")"
    ax.set_title(heading, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out = os.fspath(path)
    fig.savefig(out)
    return out
