"""Ray Data stages: llamagen on every node of a cluster (``pip install "llamagen[ray]"``).

    import ray, llamagen.ray
    ds = ray.data.read_parquet("prompts/")
    out = llamagen.ray.generate(ds, model="/models/x.gguf", prompt_column="prompt",
                                actors=4, cpus_per_actor=2, batch_size=64, max_new_tokens=128)
    out.write_parquet("results/")

The stages are callable classes for ``Dataset.map_batches`` (``GenerateStage``, ``ChatStage``,
``EmbedStage``): each actor loads the model once and runs every batch it gets through one
BatchGenerator (or one packed ``llamagen.embed``).  ``generate``, ``chat`` and ``embed`` wrap them
with an actor pool sized for the installed Ray.  See docs/ray.md.

Importing ``llamagen`` does not import Ray; importing this module does.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np

try:
    import ray
    import ray.data
except ImportError as e:                       # pragma: no cover - the message is the point
    raise ImportError('llamagen.ray needs Ray Data: pip install "llamagen[ray]" '
                      f'(or pip install "ray[data]"): {e}') from e

from llamagen import chat as _chat
from llamagen._core import Context, Model
from llamagen.batch import map_generate
from llamagen.embeddings import embed as _embed
from llamagen.sampling import FIELDS, SamplingParams, resolve
from llamagen.speculative import Speculative

__all__ = ["GenerateStage", "ChatStage", "EmbedStage", "generate", "chat", "embed",
           "OUTPUT_COLUMNS", "EMBED_COLUMNS", "assigned_cpus", "actor_pool_kwargs"]

# the columns a generation stage adds to its input's
OUTPUT_COLUMNS = ("text", "finish_reason", "n_prompt_tokens", "n_tokens", "error")
# and an embedding stage (besides its vector column, "embedding" by default)
EMBED_COLUMNS = ("n_tokens", "error")

# SamplingParams fields holding ints: a column of ints with nulls reaches the stage as floats
_INT_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams)
                        if f.type in ("int", "Optional[int]"))


# -- Ray facts -----------------------------------------------------------------------------------

def _ray_version() -> Tuple[int, int]:
    parts = ray.__version__.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):           # an odd build string: treat it as current Ray
        return (99, 0)


def assigned_cpus() -> Optional[float]:
    """The CPUs Ray assigned to the calling task or actor (``get_assigned_resources()["CPU"]``);
    0.0 when it was given none, None outside Ray."""
    if not ray.is_initialized():
        return None
    return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))


def _threads(n_threads: Optional[int]) -> Optional[int]:
    """``n_threads`` if given, else the whole CPUs Ray assigned (never more; at least 1, as Ray
    sets OMP_NUM_THREADS), else llama.cpp's default (outside Ray)."""
    if n_threads is not None:
        if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1:
            raise ValueError(f"n_threads must be an int >= 1 or None, got {n_threads!r}")
        return n_threads
    cpus = assigned_cpus()
    if cpus is None:
        return None
    return max(1, int(cpus + 1e-9))


def actor_pool_kwargs(actors: Union[int, Tuple[int, int]]) -> Dict[str, Any]:
    """The ``map_batches`` keyword that makes an actor pool of ``actors`` (an int, or a
    ``(min, max)`` autoscaling range) in the installed Ray: ``compute=ActorPoolStrategy(...)``
    before 2.9 and from 2.51, ``concurrency=`` in 2.9-2.50."""
    if isinstance(actors, tuple):
        if len(actors) != 2 or not all(_is_count(a) for a in actors) or actors[0] > actors[1]:
            raise ValueError(f"actors must be an int >= 1 or a (min, max) pair, got {actors!r}")
        lo, hi = actors
    elif _is_count(actors):
        lo = hi = actors
    else:
        raise ValueError(f"actors must be an int >= 1 or a (min, max) pair, got {actors!r}")
    if (2, 9) <= _ray_version() <= (2, 50):
        return {"concurrency": lo if lo == hi else (lo, hi)}
    if lo == hi:
        return {"compute": ray.data.ActorPoolStrategy(size=lo)}
    return {"compute": ray.data.ActorPoolStrategy(min_size=lo, max_size=hi)}


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _actor_request(actors: int, cpus_per_actor: float, reserve_cpu: Optional[bool]):
    """(num_cpus each actor requests, n_threads to pass or None).

    Ray Data starts the actors before the read tasks; actors holding every CPU leave the reads
    unschedulable and the dataset hangs (ray issue 44687).  When the actors, spread over the
    nodes, would not leave a whole CPU free on the smallest node (or ``reserve_cpu=True``), each
    actor requests less so one CPU stays free per node, and still runs ``cpus_per_actor``
    threads: Ray's read tasks are short and mostly I/O.
    """
    if reserve_cpu is False:
        return cpus_per_actor, None
    if not ray.is_initialized():
        ray.init()                              # what Ray Data would do when the dataset runs
    nodes = [float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]
    nodes = [c for c in nodes if c > 0]
    if not nodes:
        return cpus_per_actor, None
    per_node = math.ceil(actors / len(nodes))
    smallest = min(nodes)
    if reserve_cpu is None and per_node * cpus_per_actor <= smallest - 1:
        return cpus_per_actor, None             # a CPU stays free anyway
    request = max(0.0, min(float(cpus_per_actor), (smallest - 1) / per_node))
    request = math.floor(request * 1e4) / 1e4   # Ray's resource precision
    if request >= cpus_per_actor:
        return cpus_per_actor, None
    return request, max(1, int(cpus_per_actor))


# -- values out of Ray's columns -----------------------------------------------------------------

def _py(v):
    """A batch value as plain Python: numpy scalars and arrays (Ray's list and struct columns)
    become ints, floats, strs, lists and dicts."""
    if isinstance(v, np.ndarray):
        return [_py(x) for x in v] if v.dtype == object else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Mapping):
        return {k: _py(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_py(x) for x in v]
    return v


def _is_null(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _columns(batch) -> Dict[str, np.ndarray]:
    """A map_batches batch (numpy dict or pandas DataFrame) as {column: array}."""
    if isinstance(batch, Mapping):
        return {k: np.asarray(v) if not isinstance(v, np.ndarray) else v for k, v in batch.items()}
    if hasattr(batch, "columns") and hasattr(batch, "to_numpy"):           # pandas
        return {c: batch[c].to_numpy() for c in batch.columns}
    if hasattr(batch, "column_names") and hasattr(batch, "column"):        # pyarrow.Table
        return {c: batch.column(c).to_numpy(zero_copy_only=False) for c in batch.column_names}
    raise TypeError(f"a batch must be a dict of columns or a DataFrame, got {type(batch).__name__}")


def _column(cols: Dict[str, np.ndarray], name: str, what: str) -> np.ndarray:
    try:
        return cols[name]
    except KeyError:
        raise KeyError(f"the batch has no {what} column {name!r} (columns: "
                       f"{', '.join(map(repr, cols)) or 'none'})") from None


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _model_path(model) -> str:
    path = os.fspath(model)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not os.path.exists(path):
        node = ray.util.get_node_ip_address() if ray.is_initialized() else "this machine"
        raise FileNotFoundError(f"model {path!r} does not exist on {node}: the path must exist on "
                                "every node that runs the stage (shared storage, or the same local "
                                "path on each node)")
    return path


# -- generation ----------------------------------------------------------------------------------

class GenerateStage:
    """A ``Dataset.map_batches`` callable class: text generation with llamagen.

        ds.map_batches(GenerateStage, fn_constructor_kwargs={"model": "/models/x.gguf",
                       "max_new_tokens": 128}, batch_size=64, num_cpus=2,
                       compute=ray.data.ActorPoolStrategy(size=4))

    ``__init__`` runs once per actor: it loads ``model`` (a GGUF path that must exist on every
    node) and makes a Context with ``n_seq_max`` sequence slots of ``n_ctx_seq`` tokens each and
    ``n_threads`` threads: by default the whole CPUs Ray assigned to the actor, never more.
    ``__call__(batch)`` runs every row of the batch through one BatchGenerator (map_generate:
    all slots stay busy, refilled as sequences finish) and returns the input columns plus
    ``text``, ``finish_reason``, ``n_prompt_tokens``, ``n_tokens`` and ``error`` (None, or the
    error of a row that could not run, e.g. a prompt too long; the other rows go on).

    Sampling: ``params`` (a SamplingParams) and/or keywords (``max_new_tokens=``, ``temp=``, ...).
    Per-row overrides: a column named after a SamplingParams field (``seed``, ``max_new_tokens``,
    ``temp``, ``stop``, ...) overrides it for its row; a null keeps the stage's value.
    ``overrides``: None (every such column), or the names allowed (``()``: none).
    ``model_kwargs`` go to ``llamagen.Model`` (e.g. ``n_gpu_layers``), ``context_kwargs`` to
    ``llamagen.Context`` (e.g. ``n_batch``, ``kv_unified``; ``n_ctx`` there replaces
    ``n_seq_max * n_ctx_seq``).  ``deterministic=True``: a row's output does not depend on the
    rows batched with it, nor on the actor or the order (docs/determinism.md).
    """

    def __init__(self, model, *, prompt_column: str = "prompt", n_seq_max: int = 16,
                 n_ctx_seq: int = 2048, n_threads: Optional[int] = None,
                 params: Optional[SamplingParams] = None, overrides: Optional[Iterable[str]] = None,
                 model_kwargs: Optional[Mapping[str, Any]] = None,
                 context_kwargs: Optional[Mapping[str, Any]] = None, deterministic: bool = False,
                 draft_model=None, **sampling):
        self.params = resolve(params, (), sampling)
        self.prompt_column = self._input_column(prompt_column)
        if overrides is None:
            self.overrides = frozenset(FIELDS)
        else:
            if isinstance(overrides, str):
                overrides = (overrides,)
            self.overrides = frozenset(overrides)
            unknown = self.overrides - frozenset(FIELDS)
            if unknown:
                raise ValueError(f"overrides names no sampling parameter: {sorted(unknown)}")
        if not _is_count(n_seq_max):
            raise ValueError(f"n_seq_max must be an int >= 1, got {n_seq_max!r}")
        if not _is_count(n_ctx_seq):
            raise ValueError(f"n_ctx_seq must be an int >= 1, got {n_ctx_seq!r}")
        self.n_threads = _threads(n_threads)
        self.model = Model(_model_path(model), **dict(model_kwargs or {}))
        # draft_model (a path, loaded here beside the model): speculative decoding with it
        # (draft-simple), the lengths from ``speculative=`` when given
        self.draft_model = None
        if draft_model is not None:
            self.draft_model = Model(_model_path(draft_model), **dict(model_kwargs or {}))
            spec = self.params.speculative
            fields = {k: v for k, v in (spec.to_dict() if spec is not None else {}).items()
                      if k in ("n_max", "n_min", "adaptive", "exact")}
            self.params = self.params.replace(speculative=Speculative(
                type="draft-simple", draft_model=self.draft_model, **fields))
        ckw = dict(context_kwargs or {})
        ckw.setdefault("n_ctx", n_seq_max * n_ctx_seq)
        ckw.setdefault("deterministic", bool(deterministic))
        self.ctx = Context(self.model, n_seq_max=n_seq_max, n_threads=self.n_threads,
                           n_threads_batch=self.n_threads, **ckw)
        # over this actor's batches: speculative decoding's drafted and accepted tokens
        self.stats = {"draft_tokens": 0, "accepted_draft_tokens": 0}

    def _input_column(self, name):
        if not isinstance(name, str) or not name:
            raise TypeError(f"the input column must be a column name, got {name!r}")
        if name in OUTPUT_COLUMNS:
            raise ValueError(f"the input column {name!r} would be overwritten by the stage's "
                             f"output ({', '.join(OUTPUT_COLUMNS)}): rename it")
        return name

    def _prompt(self, value):
        """The prompt (str or token ids) of one row's input value."""
        return _py(value)                           # a str, bytes or token ids

    def _row_overrides(self, cols, names, i) -> dict:
        out = {}
        for name in names:
            v = _py(cols[name][i])
            if _is_null(v):
                continue
            if name in _INT_FIELDS and isinstance(v, float) and v.is_integer():
                v = int(v)                          # an int column with nulls arrives as floats
            out[name] = v
        return out

    def __call__(self, batch) -> Dict[str, np.ndarray]:
        cols = _columns(batch)
        src = _column(cols, self.prompt_column, "input")
        n = len(src)
        names = [c for c in cols if c in self.overrides and c != self.prompt_column]
        text: List[str] = [""] * n
        reason: List[Optional[str]] = [None] * n
        n_prompt = np.zeros(n, np.int64)
        n_tok = np.zeros(n, np.int64)
        error: List[Optional[str]] = [None] * n
        rows, items = [], []
        for i in range(n):
            try:
                prompt = self._prompt(src[i])
            except (ValueError, TypeError) as e:    # e.g. a chat template that fails
                error[i] = _error_text(e)
                continue
            item = self._row_overrides(cols, names, i)
            item["prompt"] = prompt
            rows.append(i)
            items.append(item)
        if items:
            run_stats: dict = {}
            for r in map_generate(self.ctx, items, batch_size=self.ctx.n_seq_max,
                                  params=self.params, stats=run_stats):
                i = rows[r.index]
                if r.error is not None:
                    error[i] = _error_text(r.error)
                    continue
                text[i], reason[i], n_tok[i] = r.text, r.finish_reason, len(r.tokens)
                n_prompt[i] = r.choices[0].n_prompt_tokens
            for k in self.stats:
                self.stats[k] += run_stats.get(k, 0)
        out = dict(cols)
        out.update(text=np.array(text, dtype=object), finish_reason=np.array(reason, dtype=object),
                   n_prompt_tokens=n_prompt, n_tokens=n_tok, error=np.array(error, dtype=object))
        return out


class ChatStage(GenerateStage):
    """GenerateStage for chat: each row's ``messages`` (OpenAI-style dicts ``{"role", "content"}``)
    rendered and tokenized by ``llamagen.chat.prepare`` as llama-server does (the model's chat
    template, ChatML for a model without one, ``template=`` instead; special tokens parsed, the
    model's BOS not doubled).  A row whose messages do not render gets the error; the others go
    on.  Other arguments as GenerateStage's.
    """

    def __init__(self, model, *, messages_column: str = "messages", template: Optional[str] = None,
                 chat_template_kwargs: Optional[Mapping[str, Any]] = None,
                 enable_thinking: Optional[bool] = None, **kwargs):
        if "prompt_column" in kwargs:
            raise TypeError("ChatStage reads messages_column, not prompt_column")
        super().__init__(model, prompt_column=messages_column, **kwargs)
        self.template = template
        self.chat_template_kwargs = dict(chat_template_kwargs) if chat_template_kwargs else None
        self.enable_thinking = enable_thinking

    def prepare(self, messages):
        """One row's messages as llamagen.chat.prepare makes them (tokens, template sampling)."""
        msgs = _py(messages)
        if isinstance(msgs, str):
            raise TypeError("messages must be a list of {'role', 'content'} dicts, got a str")
        # a struct column has every key of every row's messages: a None is an absent key
        msgs = [{k: v for k, v in m.items() if v is not None or k == "content"}
                if isinstance(m, dict) else m for m in msgs]
        return _chat.prepare(self.model, msgs, template=self.template,
                             chat_template_kwargs=self.chat_template_kwargs,
                             enable_thinking=self.enable_thinking)

    def render(self, messages) -> str:
        """The prompt text of one row's messages."""
        return self.prepare(messages).prompt

    def _prompt(self, value):
        return self.prepare(value).tokens


# -- embeddings ----------------------------------------------------------------------------------

class EmbedStage:
    """A ``Dataset.map_batches`` callable class: embeddings with ``llamagen.embed``.

    ``__init__`` loads ``model`` once per actor and makes an embedding Context
    (``embeddings=True``, ``pooling``: None for the model's own, "mean", "cls", "last") of
    ``n_batch`` tokens and ``n_seq_max`` sequences per decode, with the CPUs Ray assigned as
    threads.  ``__call__(batch)`` embeds the ``text_column`` of every row, packed into as few
    decodes as fit, and returns the input columns plus ``output_column`` (float32 vectors, one per
    row), ``n_tokens`` and ``error``: a text that cannot be embedded (too long without
    ``truncate=True``) gets its error and a vector of NaN; the others are embedded alone.
    """

    def __init__(self, model, *, text_column: str = "text", output_column: str = "embedding",
                 pooling: Optional[str] = None, normalize=True, truncate: bool = False,
                 n_seq_max: int = 64, n_batch: int = 4096, n_threads: Optional[int] = None,
                 model_kwargs: Optional[Mapping[str, Any]] = None,
                 context_kwargs: Optional[Mapping[str, Any]] = None):
        for name in (text_column, output_column):
            if not isinstance(name, str) or not name:
                raise TypeError(f"column names must be non-empty str, got {name!r}")
        if text_column in EMBED_COLUMNS + (output_column,):
            raise ValueError(f"the input column {text_column!r} would be overwritten by the "
                             f"stage's output: rename it")
        self.text_column, self.output_column = text_column, output_column
        self.normalize, self.truncate = normalize, truncate
        self.n_threads = _threads(n_threads)
        self.model = Model(_model_path(model), **dict(model_kwargs or {}))
        ckw = dict(context_kwargs or {})
        ckw.setdefault("n_ctx", n_batch)
        self.ctx = Context(self.model, embeddings=True, pooling=pooling, n_batch=n_batch,
                           n_seq_max=n_seq_max, n_threads=self.n_threads,
                           n_threads_batch=self.n_threads, **ckw)

    def _embed(self, texts):
        return _embed(self.ctx, texts, normalize=self.normalize, truncate=self.truncate,
                      details=True)

    def __call__(self, batch) -> Dict[str, np.ndarray]:
        cols = _columns(batch)
        texts = [_py(v) for v in _column(cols, self.text_column, "text")]
        n = len(texts)
        error: List[Optional[str]] = [None] * n
        if n == 0:
            vecs: Any = np.zeros((0, self.model.n_embd), np.float32)
            n_tok = []
        else:
            try:
                r = self._embed(texts)
                vecs, n_tok = r.vectors, r.n_tokens
            except (ValueError, TypeError):
                vecs, n_tok = self._one_by_one(texts, error)
        out = dict(cols)
        if isinstance(vecs, list):                  # pooling "none": one matrix per text
            col = np.empty(n, dtype=object)
            col[:] = vecs
            vecs = col
        out[self.output_column] = vecs
        out["n_tokens"] = np.asarray(n_tok, np.int64)
        out["error"] = np.array(error, dtype=object)
        return out

    def _one_by_one(self, texts, error):
        """The batch failed on some text: embed each alone, so only the bad ones fail."""
        vecs, n_tok = [], []
        for i, t in enumerate(texts):
            try:
                r = self._embed([t])
                vecs.append(r.vectors[0])
                n_tok.append(r.n_tokens[0])
            except (ValueError, TypeError) as e:
                error[i] = _error_text(e).replace("text 0", f"row {i}", 1)
                vecs.append(None)
                n_tok.append(0)
        shapes = [v.shape for v in vecs if v is not None]
        if shapes and all(len(s) == 1 for s in shapes):
            blank = np.full(shapes[0], np.nan, np.float32)
            return np.stack([blank if v is None else v for v in vecs]), n_tok
        blank = np.zeros((0, self.model.n_embd), np.float32)
        return [blank if v is None else v for v in vecs], n_tok


# -- helpers -------------------------------------------------------------------------------------

def _map(ds, cls, ctor: dict, *, actors, cpus_per_actor, batch_size, preserve_order,
         reserve_cpu, map_kwargs):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(cpus_per_actor, bool) or not isinstance(cpus_per_actor, (int, float)) or \
            not cpus_per_actor > 0:
        raise ValueError(f"cpus_per_actor must be a number > 0, got {cpus_per_actor!r}")
    pool = actor_pool_kwargs(actors)
    most = actors[1] if isinstance(actors, tuple) else actors
    kw = dict(map_kwargs or {})
    if "num_cpus" in kw:
        num_cpus, threads = kw.pop("num_cpus"), None
    else:
        num_cpus, threads = _actor_request(most, cpus_per_actor, reserve_cpu)
    if threads is not None and ctor.get("n_threads") is None:
        ctor["n_threads"] = threads
    out = ds.map_batches(cls, fn_constructor_kwargs=ctor, batch_size=batch_size,
                         batch_format="numpy", num_cpus=num_cpus, **pool, **kw)
    if preserve_order:
        out.context.execution_options.preserve_order = True
    return out


def generate(ds, *, model, prompt_column: str = "prompt", actors: Union[int, Tuple[int, int]] = 4,
             cpus_per_actor: float = 2, batch_size: int = 64, n_seq_max: Optional[int] = None,
             preserve_order: bool = False, reserve_cpu: Optional[bool] = None,
             params: Optional[SamplingParams] = None, overrides: Optional[Iterable[str]] = None,
             n_ctx_seq: int = 2048, n_threads: Optional[int] = None,
             model_kwargs: Optional[Mapping[str, Any]] = None,
             context_kwargs: Optional[Mapping[str, Any]] = None,
             map_kwargs: Optional[Mapping[str, Any]] = None, draft_model=None, **sampling):
    """``ds`` with every row's ``prompt_column`` generated: GenerateStage on a pool of ``actors``
    actors (an int, or a ``(min, max)`` range) of ``cpus_per_actor`` CPUs, ``batch_size`` rows per
    call.  Returns a lazy Dataset: the input columns plus text, finish_reason, n_prompt_tokens,
    n_tokens, error.

    ``n_seq_max``: sequences decoded together per actor (default ``min(batch_size, 64)``).
    ``preserve_order=True``: rows come out in input order (Ray's ``preserve_order``; slower to
    start streaming).  ``reserve_cpu``: None leaves one CPU per node free for Ray's read tasks
    when the actors would take them all (then each actor requests fewer CPUs but still runs
    ``cpus_per_actor`` threads); True always, False never.  ``map_kwargs`` go to
    ``map_batches`` (``memory``, ``num_gpus``, ``max_restarts``, ``max_task_retries``, ...).
    ``draft_model``: a draft model's path, loaded by each actor (speculative decoding with
    draft-simple).  Sampling keywords and the rest as GenerateStage's.
    """
    return _generation(ds, GenerateStage, dict(model=model, prompt_column=prompt_column),
                       actors=actors, cpus_per_actor=cpus_per_actor, batch_size=batch_size,
                       n_seq_max=n_seq_max, preserve_order=preserve_order,
                       reserve_cpu=reserve_cpu, params=params, overrides=overrides,
                       n_ctx_seq=n_ctx_seq, n_threads=n_threads, model_kwargs=model_kwargs,
                       context_kwargs=context_kwargs, map_kwargs=map_kwargs,
                       draft_model=draft_model, **sampling)


def chat(ds, *, model, messages_column: str = "messages", template: Optional[str] = None,
         chat_template_kwargs: Optional[Mapping[str, Any]] = None,
         enable_thinking: Optional[bool] = None, **kwargs):
    """``generate`` for chat: each row's ``messages_column`` rendered with the model's chat
    template, or ``template`` (ChatStage).  The other keywords (pool, ordering, sampling, ...)
    as ``generate``'s."""
    stage = dict(model=model, messages_column=messages_column, template=template,
                 chat_template_kwargs=chat_template_kwargs, enable_thinking=enable_thinking)
    return _generation(ds, ChatStage, stage, **kwargs)


def _generation(ds, cls, stage: dict, *, actors=4, cpus_per_actor=2, batch_size=64,
                n_seq_max=None, preserve_order=False, reserve_cpu=None, params=None,
                overrides=None, n_ctx_seq=2048, n_threads=None, model_kwargs=None,
                context_kwargs=None, map_kwargs=None, draft_model=None, **sampling):
    ctor = dict(stage, n_seq_max=n_seq_max or min(batch_size, 64), n_ctx_seq=n_ctx_seq,
                n_threads=n_threads, params=resolve(params, (), sampling), overrides=overrides,
                model_kwargs=model_kwargs, context_kwargs=context_kwargs, draft_model=draft_model)
    return _map(ds, cls, ctor, actors=actors, cpus_per_actor=cpus_per_actor,
                batch_size=batch_size, preserve_order=preserve_order, reserve_cpu=reserve_cpu,
                map_kwargs=map_kwargs)


def embed(ds, *, model, text_column: str = "text", output_column: str = "embedding",
          pooling: Optional[str] = None, normalize=True, truncate: bool = False,
          actors: Union[int, Tuple[int, int]] = 4, cpus_per_actor: float = 2,
          batch_size: int = 256, n_seq_max: int = 64, n_batch: int = 4096,
          preserve_order: bool = False, reserve_cpu: Optional[bool] = None,
          n_threads: Optional[int] = None, model_kwargs: Optional[Mapping[str, Any]] = None,
          context_kwargs: Optional[Mapping[str, Any]] = None,
          map_kwargs: Optional[Mapping[str, Any]] = None):
    """``ds`` with every row's ``text_column`` embedded (EmbedStage): the input columns plus
    ``output_column`` (float32 vectors), n_tokens and error.  Pool and ordering arguments as
    ``generate``'s."""
    ctor = dict(model=model, text_column=text_column, output_column=output_column,
                pooling=pooling, normalize=normalize, truncate=truncate, n_seq_max=n_seq_max,
                n_batch=n_batch, n_threads=n_threads, model_kwargs=model_kwargs,
                context_kwargs=context_kwargs)
    return _map(ds, EmbedStage, ctor, actors=actors, cpus_per_actor=cpus_per_actor,
                batch_size=batch_size, preserve_order=preserve_order, reserve_cpu=reserve_cpu,
                map_kwargs=map_kwargs)
