"""What a sampler configuration does to the text: diversity, repetition, coherence, accuracy.

``sweep_quality(model, configs, prompts, samples=8)`` generates ``samples`` completions of every
prompt with every configuration through the batch scheduler (``map_generate``: all samples of all
prompts keep every sequence slot busy), scores each completion under the model at temperature 1
(``llamagen.score``), and reports per configuration the mean of each metric over prompts with a
bootstrap 95 % interval across prompts:

* diversity: ``distinct_1`` / ``distinct_2`` / ``distinct_3`` (distinct n-grams over all of a
  prompt's samples / all their n-grams) and ``self_overlap`` (self-BLEU style: each sample's clipped
  1- to 4-gram precision against the prompt's other samples, geometric mean; 1 = identical samples);
* repetition: ``repeat_4`` (share of a sample's 4-grams that repeat one before it) and ``loops``
  (share of samples with a line written 3 times or more);
* coherence: ``logprob`` (the mean token log-likelihood of a sample given its prompt) and
  ``perplexity``, under the model and optionally under a ``judge`` model;
* ``accuracy`` for prompts that give an ``answer`` (the answer as a word in the text), a ``regex``
  or a ``schema`` (the first JSON value in the text validates; needs ``jsonschema``);
* ``length`` (tokens) and the finish reasons; ``tokens_per_second`` of the generation and
  ``sample_ms_per_token`` (time in the sampler chain, decode excluded).

Token n-grams are over token ids.  ``to_html`` writes a report (table and example samples),
``plot_frontier`` the quality-diversity frontier (needs matplotlib).  From the command line:
``llamagen bench samplers --quality [--prompts FILE.jsonl] [--samples N] [--html OUT]``.
"""
from __future__ import annotations

import html
import importlib.resources
import json
import math
import os
import re
import time
from collections import Counter
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

from llamagen._configs import _make_params, _normalize_configs, _require_matplotlib
from llamagen._core import Context, Model
from llamagen.batch import map_generate
from llamagen.logprobs import score

__all__ = ["QUALITY_METRICS", "DEFAULT_QUALITY_CONFIGS", "load_prompts", "sweep_quality",
           "distinct_n", "self_overlap", "repeat_n", "has_loop", "is_correct", "bootstrap_ci",
           "format_quality_table", "to_html", "plot_frontier"]

# the metrics a row reports, each as {"mean", "lo", "hi"} over prompts
QUALITY_METRICS = ("distinct_1", "distinct_2", "distinct_3", "self_overlap", "repeat_4", "loops",
                   "logprob", "perplexity", "judge_logprob", "accuracy", "length")

# the default sweep: the truncation samplers people compare, at the temperatures they use
DEFAULT_QUALITY_CONFIGS: Dict[str, Dict[str, Any]] = {
    "greedy": {"temp": 0.0},
    "temp_0.7": {"temp": 0.7, "top_k": 0, "top_p": 1.0},
    "temp_1.0": {"temp": 1.0, "top_k": 0, "top_p": 1.0},
    "temp_1.5": {"temp": 1.5, "top_k": 0, "top_p": 1.0},
    "top_k_40": {"temp": 1.0, "top_k": 40, "top_p": 1.0},
    "top_p_0.9": {"temp": 1.0, "top_k": 0, "top_p": 0.9},
    "min_p_0.1": {"temp": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.1},
    "min_p_0.1_t1.5": {"temp": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.1},
    "typical_0.9": {"temp": 1.0, "top_k": 0, "top_p": 1.0, "typical_p": 0.9},
    "penalties": {"temp": 0.8, "repeat_penalty": 1.1, "frequency_penalty": 0.1},
    "dry": {"temp": 0.8, "dry_multiplier": 0.8},
    "xtc": {"temp": 1.0, "top_k": 0, "top_p": 1.0, "xtc_probability": 0.5,
            "xtc_threshold": 0.1},
}


# -- prompts -----------------------------------------------------------------------------------

def load_prompts(path: Union[str, os.PathLike, None] = None) -> List[Dict[str, Any]]:
    """The prompts of a JSONL file: one ``{"prompt": str, "answer"?: str, "regex"?: str,
    "schema"?: {...}, "kind"?: str}`` per line (default: the file shipped with llamagen).
    ValueError naming the line for anything else."""
    if path is None:
        text = importlib.resources.files("llamagen").joinpath(
            "data/quality_prompts.jsonl").read_text(encoding="utf-8")
        where = "quality_prompts.jsonl"
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        where = os.fspath(path)
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where}:{i}: not JSON ({e})") from None
        _check_item(item, f"{where}:{i}")
        out.append(item)
    if not out:
        raise ValueError(f"{where}: no prompts")
    return out


def _check_item(item: Any, where: str) -> None:
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"]:
        raise ValueError(f"{where}: each prompt is an object with a non-empty 'prompt' string")
    for key in ("answer", "regex"):
        if key in item and not isinstance(item[key], str):
            raise ValueError(f"{where}: '{key}' must be a string")
    if "regex" in item:
        try:
            re.compile(item["regex"])
        except re.error as e:
            raise ValueError(f"{where}: 'regex' does not compile: {e}") from None
    if "schema" in item and not isinstance(item["schema"], dict):
        raise ValueError(f"{where}: 'schema' must be a JSON schema object")


# -- metrics -----------------------------------------------------------------------------------

def _ngrams(tokens: Sequence, n: int) -> List[tuple]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: Sequence[Sequence], n: int) -> float:
    """Distinct n-grams over all samples / all their n-grams (NaN without any n-gram)."""
    grams = [g for s in samples for g in _ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else math.nan


def self_overlap(samples: Sequence[Sequence], max_n: int = 4) -> float:
    """Self-BLEU style overlap: each sample's clipped n-gram precisions (n = 1..max_n) against all
    the other samples together, their geometric mean, averaged over samples.  1: every sample's
    n-grams all appear in the others (identical samples); 0: none do.  NaN for one sample."""
    if len(samples) < 2:
        return math.nan
    counts = [[Counter(_ngrams(s, n)) for n in range(1, max_n + 1)] for s in samples]
    scores = []
    for i, mine in enumerate(counts):
        logs = []
        for k in range(max_n):
            total = sum(mine[k].values())
            if not total:
                continue
            ref: Counter = Counter()
            for j, other in enumerate(counts):
                if j != i:
                    ref |= other[k]             # the most any single other sample has
            hit = sum(min(c, ref[g]) for g, c in mine[k].items())
            logs.append(math.log(max(hit, 1e-9) / total) if hit else -math.inf)
        if logs:
            scores.append(math.exp(sum(logs) / len(logs)) if all(math.isfinite(x) for x in logs)
                          else 0.0)
    return float(np.mean(scores)) if scores else math.nan


def repeat_n(tokens: Sequence, n: int = 4) -> float:
    """The share of a sample's n-grams that repeat an n-gram before them (0 for none)."""
    grams = _ngrams(tokens, n)
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def has_loop(text: str, times: int = 3) -> bool:
    """Whether a non-empty line (stripped) appears ``times`` times or more."""
    lines = Counter(x.strip() for x in text.splitlines() if x.strip())
    return any(c >= times for c in lines.values())


_JSON_START = re.compile(r"[\[{]")


def is_correct(item: Mapping[str, Any], text: str) -> Optional[bool]:
    """Whether ``text`` answers ``item`` (None when the item gives no answer): ``answer`` as a
    whole word (case-insensitive), ``regex`` found, or ``schema`` validated by the first JSON
    value in the text."""
    if "answer" in item:
        return re.search(r"(?<!\w)" + re.escape(item["answer"].strip()) + r"(?!\w)", text,
                         re.IGNORECASE) is not None
    if "regex" in item:
        return re.search(item["regex"], text) is not None
    if "schema" in item:
        dec = json.JSONDecoder()
        for m in _JSON_START.finditer(text):
            try:
                value, _ = dec.raw_decode(text, m.start())
            except ValueError:
                continue
            return _validates(item["schema"], value)
        return False
    return None


def _validates(schema: dict, value: Any) -> bool:
    try:
        import jsonschema
    except ImportError:
        return isinstance(value, dict)      # (without jsonschema: an object parses)
    return jsonschema.Draft202012Validator(schema).is_valid(value)


def bootstrap_ci(values: Sequence[float], *, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> Dict[str, float]:
    """The mean of ``values`` (NaNs left out) and a percentile bootstrap interval of it."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if x.size == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan}
    if x.size == 1:
        return {"mean": float(x[0]), "lo": float(x[0]), "hi": float(x[0])}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    a = (1.0 - level) / 2
    return {"mean": float(x.mean()), "lo": float(np.quantile(means, a)),
            "hi": float(np.quantile(means, 1.0 - a))}


# -- the sweep ----------------------------------------------------------------------------------

def _scores(ctx: Context, pairs: List[tuple]) -> List[float]:
    """Mean token logprob of each (prompt, continuation) under ``ctx``'s model (each distinct
    pair scored once: greedy samples are copies)."""
    unique = list(dict.fromkeys(pairs))
    means = {}
    for pair, r in zip(unique, score(ctx, unique)):
        lps = [x for x in r.logprobs if x is not None]
        means[pair] = float(np.mean(lps)) if lps else math.nan
    return [means[p] for p in pairs]


def sweep_quality(model, configs: Optional[Mapping[str, Any]] = None, prompts=None, *,
                  samples: int = 8, max_new_tokens: int = 64, batch_size: int = 16,
                  n_ctx: Optional[int] = None, n_threads: Optional[int] = None,
                  judge=None, seed: int = 0, n_boot: int = 2000, examples: int = 3,
                  progress: bool = False) -> List[Dict[str, Any]]:
    """One row per configuration (see the module's doc).  ``model`` / ``judge``: a Model or a
    GGUF path; ``configs``: ``{name: {SamplingParams field: value}}`` (default
    DEFAULT_QUALITY_CONFIGS); ``prompts``: a JSONL path, a list of prompt dicts or strings (default:
    the shipped file).  Sample i of a prompt uses seed ``seed + i``.  A configuration that fails
    records ``error`` and the sweep goes on.  A greedy configuration (``temp <= 0``) generates once
per prompt: its samples are that answer ``samples`` times."""
    items = load_prompts(prompts) if prompts is None or isinstance(prompts, (str, os.PathLike)) \
        else [p if isinstance(p, dict) else {"prompt": p} for p in prompts]
    for i, item in enumerate(items):
        _check_item(item, f"prompts[{i}]")
    own = not isinstance(model, Model)
    m = Model(os.fspath(model)) if own else model
    own_judge = judge is not None and not isinstance(judge, Model)
    jm = Model(os.fspath(judge)) if own_judge else judge
    longest = max(len(m.tokenize(it["prompt"])) for it in items)
    per_seq = longest + max_new_tokens + 8
    batch_size = max(1, min(batch_size, 64))
    ctx = Context(m, n_ctx=n_ctx or per_seq * batch_size, n_seq_max=batch_size,
                  n_threads=n_threads)
    jctx = None
    if jm is not None:      # (its tokenizer may cut the same text into more tokens)
        j_seq = max(len(jm.tokenize(it["prompt"])) for it in items) + 4 * max_new_tokens + 8
        jctx = Context(jm, n_ctx=j_seq * 4, n_seq_max=4, n_threads=n_threads)
    rows = []
    try:
        for name, spec in _normalize_configs(configs, DEFAULT_QUALITY_CONFIGS):
            rows.append(_one_config(ctx, jctx, items, name, spec, samples, max_new_tokens,
                                    batch_size, seed, n_boot, examples, progress))
    finally:
        ctx.close()
        if jctx is not None:
            jctx.close()
        if own:
            m.close()
        if own_judge:
            jm.close()
    return rows


def _one_config(ctx, jctx, items, name, spec, samples, max_new_tokens, batch_size, seed, n_boot,
                examples, progress) -> Dict[str, Any]:
    row: Dict[str, Any] = {"name": name, "error": None, "samples": samples,
                           "prompts": len(items)}
    try:
        params = _make_params(name, spec, max_new_tokens, False).replace(seed=seed)
        row["params"] = {k: v for k, v in params.to_dict().items()
                         if k in (spec if isinstance(spec, Mapping) else {})}
        # greedy decoding has one answer per prompt: its samples are copies of it (decoding
        # copies side by side would only measure llama.cpp's batch variance)
        n_gen = 1 if params.greedy else samples
        t0 = time.perf_counter()
        stats: Dict[str, float] = {}
        results = list(map_generate(ctx, [it["prompt"] for it in items], batch_size=batch_size,
                                    params=params, n=n_gen, progress=progress, stats=stats))
        gen_s = time.perf_counter() - t0
        gen_tokens = 0
        for r in results:
            if r.error is not None:
                raise r.error
            gen_tokens += sum(len(c.tokens) for c in r.choices)
            if n_gen == 1:
                r.choices = list(r.choices) * samples
        t0 = time.perf_counter()
        pairs = [(it["prompt"], c.text) for it, r in zip(items, results) for c in r.choices
                 if c.text]
        lp = iter(_scores(ctx, pairs))
        jlp = iter(_scores(jctx, pairs)) if jctx is not None else None
        score_s = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
        row["error"] = f"{type(e).__name__}: {e}"
        return row
    per: Dict[str, List[float]] = {k: [] for k in QUALITY_METRICS}
    reasons: Counter = Counter()
    n_tokens = 0
    for it, r in zip(items, results):
        toks = [c.tokens for c in r.choices]
        texts = [c.text for c in r.choices]
        reasons.update(c.finish_reason for c in r.choices)
        n_tokens += sum(len(t) for t in toks)
        for n in (1, 2, 3):
            per[f"distinct_{n}"].append(distinct_n(toks, n))
        per["self_overlap"].append(self_overlap(toks))
        per["repeat_4"].append(float(np.mean([repeat_n(t) for t in toks])))
        per["loops"].append(float(np.mean([has_loop(t) for t in texts])))
        mine = [next(lp) for t in texts if t]
        per["logprob"].append(float(np.nanmean(mine)) if mine else math.nan)
        per["perplexity"].append(math.exp(-per["logprob"][-1]) if mine else math.nan)
        if jlp is not None:
            theirs = [next(jlp) for t in texts if t]
            per["judge_logprob"].append(float(np.nanmean(theirs)) if theirs else math.nan)
        right = [is_correct(it, t) for t in texts]
        if right and right[0] is not None:
            per["accuracy"].append(float(np.mean(right)))
        per["length"].append(float(np.mean([len(t) for t in toks])))
    row["metrics"] = {k: bootstrap_ci(v, n_boot=n_boot, seed=seed) for k, v in per.items()}
    row["finish_reasons"] = dict(reasons)
    row["tokens"] = n_tokens
    row["generate_seconds"] = gen_s
    row["score_seconds"] = score_s
    row["tokens_per_second"] = gen_tokens / gen_s if gen_s > 0 else math.nan   # (generated)
    row["sample_ms_per_token"] = (1000 * stats["sample_seconds"] / stats["sampled_tokens"]
                                  if stats.get("sampled_tokens") else math.nan)
    row["examples"] = [{"prompt": it["prompt"], "text": r.choices[0].text}
                       for it, r in list(zip(items, results))[:examples]]
    return row


# -- reports ------------------------------------------------------------------------------------

_SHOWN = ("distinct_2", "self_overlap", "repeat_4", "loops", "logprob", "perplexity",
          "accuracy", "length")


def _cell(m: Optional[Mapping[str, float]]) -> str:
    if not m or m["mean"] is None or math.isnan(m["mean"]):
        return "-"
    return f"{m['mean']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]"


def format_quality_table(rows: List[Dict[str, Any]]) -> str:
    """A plain-text table: each metric's mean [95 % interval]."""
    head = ["config"] + list(_SHOWN) + ["tok/s", "sample ms/tok"]
    lines = ["\t".join(head)]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['name']}\terror: {r['error']}")
            continue
        cells = [r["name"]] + [_cell(r["metrics"].get(k)) for k in _SHOWN] + \
            [f"{r['tokens_per_second']:.1f}", f"{r['sample_ms_per_token']:.3f}"]
        lines.append("\t".join(cells))
    return "\n".join(lines) + "\n"


def to_html(rows: List[Dict[str, Any]], path: Union[str, os.PathLike], *,
            title: str = "llamagen sampler quality") -> None:
    """Write an HTML report: the table (mean and 95 % interval per metric) and example samples
    per configuration."""
    e = html.escape
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
           "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
           "td:first-child{text-align:left}pre{white-space:pre-wrap;background:#f6f6f6;"
           "padding:6px}</style></head><body>", f"<h1>{e(title)}</h1>",
           "<table id='metrics'><thead><tr><th>config</th>"]
    out += [f"<th>{e(k)}</th>" for k in _SHOWN] + ["<th>tokens/s</th><th>sample ms/token</th>"
                                                   "</tr></thead><tbody>"]
    for r in rows:
        if r.get("error"):
            out.append(f"<tr><td>{e(r['name'])}</td><td colspan='{len(_SHOWN) + 2}'>"
                       f"error: {e(r['error'])}</td></tr>")
            continue
        cells = "".join(f"<td>{e(_cell(r['metrics'].get(k)))}</td>" for k in _SHOWN)
        out.append(f"<tr><td>{e(r['name'])}</td>{cells}"
                   f"<td>{r['tokens_per_second']:.1f}</td>"
                   f"<td>{r['sample_ms_per_token']:.3f}</td></tr>")
    out.append("</tbody></table><h2>Examples</h2>")
    for r in rows:
        if r.get("error"):
            continue
        out.append(f"<h3 id='ex-{e(r['name'])}'>{e(r['name'])}</h3>")
        for x in r.get("examples", []):
            out.append(f"<p><b>{e(x['prompt'])}</b></p><pre>{e(x['text'])}</pre>")
    out.append("</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(out))


def plot_frontier(rows: List[Dict[str, Any]], path: Union[str, os.PathLike], *,
                  x: str = "distinct_2", y: str = "logprob") -> None:
    """The quality-diversity frontier: each configuration a point (x: diversity, y: the mean
    token log-likelihood) with its 95 % intervals as error bars.  Needs matplotlib."""
    Figure = _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig = Figure(figsize=(8, 6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in rows:
        if r.get("error"):
            continue
        mx, my = r["metrics"][x], r["metrics"][y]
        if any(math.isnan(v) for v in (mx["mean"], my["mean"])):
            continue
        ax.errorbar(mx["mean"], my["mean"],
                    xerr=[[mx["mean"] - mx["lo"]], [mx["hi"] - mx["mean"]]],
                    yerr=[[my["mean"] - my["lo"]], [my["hi"] - my["mean"]]], fmt="o", capsize=3)
        ax.annotate(r["name"], (mx["mean"], my["mean"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"{x} (diversity, higher = more varied)")
    ax.set_ylabel(f"{y} (mean token log-likelihood, higher = more fluent)")
    ax.set_title("Sampler configurations: quality vs diversity (95 % intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
