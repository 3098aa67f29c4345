"""AsyncEngine: the facade (validate, prepare, submit; embeddings; stats; close) and the engine
thread's loop (admit, step, hand out), which talk through a locked inbox of (_Op, job) pairs.
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import enum
import itertools
import os
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

from llamagen._core import BatchGenerator, Context, Model, _check_grammar, _embed
from llamagen._shared import check_n, seeded
from llamagen._util import check_prompt, default_model_path
from llamagen.embeddings import EmbedResult, _norm_code, _rerank_items, _text_list
from llamagen.engine.streams import _DONE, EngineStream, SyncStream
from llamagen.engine.types import EngineChunk, EngineResult, EngineStats, PreparedRequest
from llamagen.errors import EngineClosedError, LlamaError, PromptTooLongError, QueueFullError
from llamagen.sampling import SamplingParams, resolve

__all__ = ["AsyncEngine"]


class _Op(enum.Enum):
    """What the engine thread is asked to do (its inbox holds (op, job) pairs)."""
    ADD = "add"          # a _Request: admit its sequences
    CANCEL = "cancel"    # a _Request: drop its live sequences
    EMBED = "embed"      # an _EmbedJob: run it between two steps


@dataclass
class _EmbedJob:
    items: list
    norm: int
    truncate: bool
    add_special: bool
    parse_special: bool
    future: concurrent.futures.Future


# Engines not closed yet.  At interpreter exit a still-running engine thread would go on decoding
# while C++ static destructors tear ggml down (SIGSEGV, issue 26): close them first, while the
# interpreter is whole (atexit runs before daemon threads are abandoned).
_open_engines: "weakref.WeakSet[AsyncEngine]" = weakref.WeakSet()


@atexit.register
def _close_open_engines() -> None:
    for engine in list(_open_engines):
        try:
            engine.close()
        except Exception:       # exiting anyway: one engine's failure must not keep the others open
            pass


class _Request:
    """One submitted request (n choices) as the engine thread sees it."""
    __slots__ = ("id", "tokens", "params", "deliver", "n", "sids", "seen", "left", "cached",
                 "completion", "cancelled", "done")

    def __init__(self, rid, tokens, params, deliver):
        self.id = rid
        self.tokens = tokens
        self.params = params                # one SamplingParams per choice
        self.deliver = deliver              # called on the engine thread with a list of items
        self.n = len(params)
        self.sids: Dict[int, int] = {}      # seq id -> choice index
        self.seen: Dict[int, int] = {}      # seq id -> tokens already handed out
        self.left = self.n
        self.cached = 0
        self.completion = 0
        self.cancelled = False
        self.done = False


class AsyncEngine:
    """Continuous batching for many concurrent requests over one model.

    ``AsyncEngine(model=None, *, n_ctx=16384, n_parallel=8, n_threads=None, n_batch=512,
    max_queue=None, prompt_cache=True, chat_template=None)``: ``model`` is a Model, a GGUF path, or None for the
    default model package.  ``n_parallel`` sequences decode together (all in one unified KV cache
    of ``n_ctx`` cells); more wait, up to ``max_queue`` (then QueueFullError).  ``prompt_cache``:
    True keeps finished sequences' cells for later prompts with the same prefix, idle caches
    holding up to max(2 * n_batch, n_ctx // n_parallel) cells (the least recently used go first);
    an int sets that budget; False turns it off.  ``deterministic=True``: a request's tokens and
    logprobs are the same whatever else the engine runs and whatever ran before
    (``Context(deterministic=True)``, docs/determinism.md).
    """

    def __init__(self, model: Union[Model, str, os.PathLike, None] = None, *, n_ctx: int = 16384,
                 n_parallel: int = 8, n_threads: Optional[int] = None, n_batch: int = 512,
                 max_queue: Optional[int] = None, prompt_cache: Union[bool, int] = True,
                 params: Optional[SamplingParams] = None, embeddings: bool = False,
                 pooling: Optional[str] = None, embed_batch: int = 2048,
                 chat_template: Optional[str] = None, deterministic: bool = False):
        if max_queue is not None and (isinstance(max_queue, bool) or not isinstance(max_queue, int)
                                      or max_queue < 0):
            raise ValueError(f"max_queue must be None or an int >= 0, got {max_queue!r}")
        if model is None:
            model = default_model_path()
        self._own_model = not isinstance(model, Model)
        self.model = Model(os.fspath(model)) if self._own_model else model
        self.chat_template = chat_template
        if chat_template is not None:
            try:
                self.model.chat_template_source(chat_template)     # parses it: fail here, not per request
            except BaseException:
                if self._own_model:
                    self.model.close()
                raise
        try:
            self._ctx = Context(self.model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                n_seq_max=n_parallel, n_threads=n_threads, kv_unified=True,
                                deterministic=bool(deterministic))
            self._batch = BatchGenerator(self._ctx, n_parallel=n_parallel, prompt_cache=prompt_cache)
            self._ectx = None
            if embeddings:
                # (llama.cpp needs n_batch to be a multiple of n_seq_max for pooling)
                n_seq = next(d for d in range(min(64, embed_batch), 0, -1) if embed_batch % d == 0)
                self._ectx = Context(self.model, n_ctx=embed_batch, n_batch=embed_batch,
                                     n_seq_max=n_seq, n_threads=n_threads, embeddings=True,
                                     pooling=pooling)
        except BaseException:
            if getattr(self, "_ctx", None) is not None:
                self._ctx.close()
            if self._own_model:
                self.model.close()
            raise
        self.n_ctx = self._ctx.n_ctx
        self.n_parallel = n_parallel
        self.deterministic = self._ctx.deterministic
        self.max_queue = max_queue
        self.defaults = params if params is not None else SamplingParams()
        self._lock = threading.Condition()
        self._inbox: deque = deque()        # (_Op, _Request | _EmbedJob)
        self._n_seqs = 0                    # sequences submitted and not finished
        self._closing = False
        self._ids = itertools.count()
        self._live: Dict[int, _Request] = {}        # seq id -> request (engine thread only)
        self._prompt_total = 0
        self._gen_total = 0
        self._requests_total = 0
        self._stats = self._snapshot()
        self._thread = threading.Thread(target=self._run, name="llamagen-engine", daemon=True)
        self._thread.start()
        _open_engines.add(self)

    # -- submitting ----------------------------------------------------------------------------

    def tokenize(self, text, add_special: bool = True, parse_special: bool = False) -> List[int]:
        return self.model.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.model.detokenize(tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        """Render chat messages with the model's own Jinja template (or the engine's
        ``chat_template``) as llama-server does (ChatML when the model has none): Model.render_chat."""
        kwargs.setdefault("template", self.chat_template)
        return self.model.render_chat(messages, add_generation_prompt=add_generation_prompt,
                                      **kwargs)

    def prepare_chat(self, messages, **kwargs):
        """``messages`` with ``tools``, ``tool_choice``, ``parallel_tool_calls`` rendered for this
        engine's model and template: a llamagen.tools.ChatPrompt (its prompt, the sampling
        parameters the tool-call format needs, and the parser of the replies)."""
        from llamagen import tools
        kwargs.setdefault("template", self.chat_template)
        return tools.prepare(self.model, messages, **kwargs)

    def _prepare(self, prompt, params, n, add_special, parse_special, sampling):
        """Validate everything a request needs (on the caller's thread): token ids and one
        SamplingParams per choice."""
        if self._closing:
            raise EngineClosedError("the engine is closed")
        n = check_n(n)
        p = resolve(params if params is not None else self.defaults, (), sampling)
        if p.gbnf is not None:
            _check_grammar(self.model, p)          # GrammarError now, not from the stream
        n_vocab = self.model.n_vocab
        for t, _ in p.logit_bias:
            if not 0 <= t < n_vocab:
                raise ValueError(f"logit_bias names token {t}, not a token id in [0, {n_vocab})")
        prompt = check_prompt(prompt)
        if isinstance(prompt, (str, bytes)):
            tokens = self.model.tokenize(prompt, add_special=add_special,
                                         parse_special=parse_special)
        else:
            tokens = list(prompt)
            for t in tokens:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_vocab:
                    raise ValueError(f"prompt token {t!r} is not a token id in [0, {n_vocab})")
        if not tokens:
            raise ValueError("the prompt is empty (no tokens to condition on)")
        if len(tokens) >= self.n_ctx:
            raise PromptTooLongError(len(tokens), self.n_ctx)
        return tokens, seeded(p, n)

    def _submit(self, tokens, ps, deliver) -> _Request:
        req = _Request(next(self._ids), tokens, ps, deliver)
        with self._lock:
            if self._closing:
                raise EngineClosedError("the engine is closed")
            if self.max_queue is not None and \
                    self._n_seqs + req.n - self.n_parallel > self.max_queue:
                raise QueueFullError(f"{max(0, self._n_seqs - self.n_parallel)} sequences already "
                                     f"wait for a slot (max_queue={self.max_queue})")
            self._n_seqs += req.n
            self._inbox.append((_Op.ADD, req))
            self._lock.notify()
        return req

    def _cancel(self, req: _Request) -> None:
        """Cancel at the next step (any thread).  Idempotent."""
        if req.done or req.cancelled:
            return
        req.cancelled = True
        with self._lock:
            self._inbox.append((_Op.CANCEL, req))
            self._lock.notify()

    def prepare(self, prompt, params: Optional[SamplingParams] = None, *, n: int = 1,
                add_special: bool = True, parse_special: bool = True,
                **sampling) -> "PreparedRequest":
        """Everything ``stream`` does before submitting, from any thread: tokenize the prompt,
        resolve and check the sampling (a JSON schema converted, a grammar built once).  These can
        take a while for large inputs and release the GIL in C++, so a server runs them in a worker
        thread and hands the result to ``stream_prepared`` on its event loop.  Raises what
        ``stream`` raises."""
        tokens, ps = self._prepare(prompt, params, n, add_special, parse_special, sampling)
        return PreparedRequest(tokens, ps)

    def stream_prepared(self, prepared: "PreparedRequest") -> "EngineStream":
        """Submit a request ``prepare`` made (cheap: call it on the event loop)."""
        if not isinstance(prepared, PreparedRequest):
            raise TypeError(f"stream_prepared takes what prepare() returns, not "
                            f"{type(prepared).__name__}")
        loop = asyncio.get_running_loop()
        s = EngineStream(self, len(prepared.tokens), loop)
        s._req = self._submit(prepared.tokens, prepared.params, s._deliverer())
        return s

    def stream(self, prompt, params: Optional[SamplingParams] = None, *, n: int = 1,
               add_special: bool = True, parse_special: bool = True, **sampling) -> "EngineStream":
        """Submit a request; returns an async iterator of EngineChunks (all choices interleaved,
        ``chunk.index`` tells them apart).  Everything is validated here, before it returns:
        ValueError / TypeError naming a bad field, PromptTooLongError, QueueFullError,
        EngineClosedError.  Closing the iterator (``aclose()``, ``async with``, leaving an
        ``async for`` by break and dropping it, or cancelling the task reading it) cancels the
        request at the next step and frees its KV cells."""
        asyncio.get_running_loop()           # (no loop: fail before any work)
        return self.stream_prepared(self.prepare(prompt, params, n=n, add_special=add_special,
                                                 parse_special=parse_special, **sampling))

    async def generate(self, prompt, params: Optional[SamplingParams] = None, *, n: int = 1,
                       add_special: bool = True, parse_special: bool = True,
                       **sampling) -> EngineResult:
        s = self.stream(prompt, params, n=n, add_special=add_special,
                        parse_special=parse_special, **sampling)
        async with s:
            return await s.collect()

    def stream_sync(self, prompt, params: Optional[SamplingParams] = None, *, n: int = 1,
                    add_special: bool = True, parse_special: bool = True,
                    **sampling) -> "SyncStream":
        """The same from a plain thread: a blocking iterator of EngineChunks."""
        tokens, ps = self._prepare(prompt, params, n, add_special, parse_special, sampling)
        s = SyncStream(self, len(tokens))
        s._req = self._submit(tokens, ps, s._queue.put)
        return s

    def generate_sync(self, prompt, params: Optional[SamplingParams] = None, *, n: int = 1,
                      add_special: bool = True, parse_special: bool = True,
                      **sampling) -> EngineResult:
        with self.stream_sync(prompt, params, n=n, add_special=add_special,
                              parse_special=parse_special, **sampling) as s:
            return s.collect()

    # -- embeddings ----------------------------------------------------------------------------

    @property
    def embeddings(self) -> bool:
        """Whether this engine embeds (made with embeddings=True)."""
        return self._ectx is not None

    @property
    def reranks(self) -> bool:
        """Whether this engine's embedding context is a reranker's (pooling "rank")."""
        return self._ectx is not None and self._ectx.pooling == "rank"

    def _check_embed(self, rerank: bool) -> None:
        if self._ectx is None:
            raise LlamaError("this engine was made without embeddings=True")
        if rerank != self.reranks:
            raise ValueError("this engine's embedding context pools with rank: score (query, "
                             "document) pairs with rerank()" if self.reranks else
                             "rerank needs an engine made with embeddings=True, pooling='rank' "
                             "(a reranker model)")

    def _submit_embed(self, texts, normalize, truncate, add_special, parse_special):
        self._check_embed(rerank=False)
        return self._queue_embed(_text_list(texts, "texts", "embed"), _norm_code(normalize),
                                 truncate, add_special, parse_special)

    def _queue_embed(self, items, norm, truncate, add_special, parse_special):
        """An embedding job (token ids or texts) for the engine thread: a Future."""
        job = _EmbedJob(items, norm, bool(truncate), add_special, parse_special,
                        concurrent.futures.Future())
        with self._lock:
            if self._closing:
                raise EngineClosedError("the engine is closed")
            self._inbox.append((_Op.EMBED, job))
            self._lock.notify()
        return job.future

    async def embed(self, texts, *, normalize=True, truncate: bool = False,
                    add_special: bool = True, parse_special: bool = False) -> EmbedResult:
        """Embed ``texts`` (see llamagen.embed) on the engine thread: an EmbedResult.  Errors
        about a text (too long, not a text) are raised here."""
        fut = self._submit_embed(texts, normalize, truncate, add_special, parse_special)
        return await asyncio.wrap_future(fut)

    def embed_sync(self, texts, *, normalize=True, truncate: bool = False,
                   add_special: bool = True, parse_special: bool = False) -> EmbedResult:
        return self._submit_embed(texts, normalize, truncate, add_special, parse_special).result()

    async def rerank(self, query: str, documents, *, truncate: bool = False) -> EmbedResult:
        """Score ``documents`` against ``query`` (see llamagen.rerank) on the engine thread: an
        EmbedResult whose vectors hold the head's outputs per document (column 0: the score)."""
        return await asyncio.wrap_future(self._submit_rerank(query, documents, truncate))

    def rerank_sync(self, query: str, documents, *, truncate: bool = False) -> EmbedResult:
        return self._submit_rerank(query, documents, truncate).result()

    def _submit_rerank(self, query, documents, truncate):
        self._check_embed(rerank=True)
        return self._queue_embed(_rerank_items(self.model, query, documents), -1, truncate,
                                 False, False)

    def _run_embed(self, job: _EmbedJob) -> None:
        fut = job.future
        if not fut.set_running_or_notify_cancel():
            return
        try:
            vectors, n_tokens, cut = _embed(self._ectx, job.items, job.norm, job.truncate,
                                            job.add_special, job.parse_special)
        except BaseException as e:      # noqa: BLE001 - handed to the caller
            fut.set_exception(e)
        else:
            fut.set_result(EmbedResult(vectors, n_tokens, cut))

    # -- state ---------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        """Counters as of the last step (a consistent snapshot, cheap to read)."""
        return self._stats

    @property
    def closed(self) -> bool:
        return self._closing

    def close(self, timeout: Optional[float] = None) -> None:
        """Cancel every request, stop the engine thread and free the context (and the model,
        when the engine loaded it).  Idempotent."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        if not self._thread.is_alive():
            _open_engines.discard(self)
            self._ctx.close()
            if self._ectx is not None:
                self._ectx.close()
            if self._own_model:
                self.model.close()

    async def aclose(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the engine thread ---------------------------------------------------------------------

    def _snapshot(self) -> EngineStats:
        b = self._batch
        running = b.n_active
        return EngineStats(
            n_running=running, n_waiting=max(0, self._n_seqs - running), kv_used=b.kv_used,
            kv_size=self.n_ctx, prompt_tokens_total=self._prompt_total,
            generated_tokens_total=self._gen_total, prefix_cache_queries=b.n_cache_queries,
            prefix_cache_hits=b.n_cache_hits + b.n_shared_tokens,
            requests_total=self._requests_total, n_steps=b.n_steps,
            n_stalled_steps=b.n_stalled_steps)

    def _warm_up(self) -> None:
        """One decode before the first request, as llama-server does (first-use costs: buffer
        allocation, weight repacking).  On this thread: ggml's OpenMP workers belong to the
        thread that decodes, and a second decoding thread in the process makes libgomp stop
        spinning once its threads outnumber the cores (gemma3 on 2 cores: 27 instead of 45 t/s)."""
        b = self._batch
        sid = b.add([self.model.bos if self.model.bos >= 0 else 0], max_new_tokens=1, temp=0)
        while b.finish_reason(sid) is None:
            b.step()
        b.forget(sid)
        b.drop_prompt_cache()

    def _run(self) -> None:
        try:
            self._warm_up()
            while True:
                with self._lock:
                    while not self._inbox and not self._live and not self._closing:
                        self._lock.wait()
                    if self._closing:
                        break
                    todo = list(self._inbox)
                    self._inbox.clear()
                for op, req in todo:
                    if op is _Op.ADD:
                        self._admit(req)
                    elif op is _Op.EMBED:
                        self._run_embed(req)
                    else:
                        self._drop(req)
                if self._live:
                    self._step()
                self._stats = self._snapshot()
        except BaseException as e:        # a bug: never leave callers waiting forever
            self._fail_all(e)
            raise
        finally:
            with self._lock:
                self._closing = True
                todo = list(self._inbox)
                self._inbox.clear()
            for op, req in todo:
                if op is _Op.ADD:
                    self._finish(req, [EngineClosedError("the engine was closed")])
                elif op is _Op.EMBED and req.future.set_running_or_notify_cancel():
                    req.future.set_exception(EngineClosedError("the engine was closed"))
            self._fail_all(EngineClosedError("the engine was closed"))

    def _admit(self, req: _Request) -> None:
        if req.cancelled:
            self._finish(req, [])
            return
        self._requests_total += 1
        self._prompt_total += len(req.tokens)
        try:
            for i, p in enumerate(req.params):
                sid = self._batch.add(req.tokens, p)
                req.sids[sid] = i
                req.seen[sid] = 0
                self._live[sid] = req
        except Exception as e:          # (validated before: a failure here is unexpected)
            self._drop_live(req)
            self._finish(req, [e])

    def _drop(self, req: _Request) -> None:
        """Cancel a request's live sequences (their prompt caches stay) and end it."""
        self._drop_live(req)
        self._finish(req, [])

    def _retire(self, req: _Request, sid: int) -> None:
        """A sequence is over (finished, failed or cancelled): forget it."""
        del self._live[sid]
        self._batch.forget(sid)
        req.left -= 1
        with self._lock:
            self._n_seqs -= 1

    def _finish(self, req: _Request, items: list) -> None:
        """Hand out a request's last items and its end; sequences never admitted stop counting."""
        if req.done:
            return
        req.done = True
        with self._lock:
            self._n_seqs -= req.left
        req.left = 0
        items.append(_DONE)
        self._hand_out(req, items)

    def _hand_out(self, req: _Request, items: list) -> None:
        try:
            req.deliver(items)
        except Exception:           # the reader's event loop is closed: nobody reads any more
            self._cancel(req)

    def _fail_all(self, exc: BaseException) -> None:
        reqs = {id(r): r for r in self._live.values()}
        self._live.clear()
        for req in reqs.values():
            self._finish(req, [exc])

    def _step(self) -> None:
        b = self._batch
        error = None
        try:
            out = b.step()
        except LlamaError as e:
            out = []
            error = e
        per_req: Dict[int, list] = {}
        for sid, text in out:
            req = self._live.get(sid)
            if req is None:
                continue
            items = per_req.setdefault(req.id, [req])
            seen = req.seen[sid]
            toks = b.tokens(sid, seen)
            req.seen[sid] = seen + len(toks)
            req.completion += len(toks)
            self._gen_total += len(toks)
            if seen == 0 and req.sids[sid] == 0:
                req.cached = b.n_cached(sid)
            reason = b.finish_reason(sid)
            items.append(EngineChunk(req.sids[sid], text, toks, reason,
                                     b.stop_sequence(sid) if reason == "stop" else None,
                                     b.logprobs(sid, seen)))
            if reason is not None:
                self._retire(req, sid)
        if error is not None:
            # sequences that failed (a grammar that allows no token) raised; the others' chunks
            # of this step come with the next step.  A decode failure ended every running one.
            for sid, req in list(self._live.items()):
                if b.finish_reason(sid) in ("error", "cancelled"):
                    self._retire(req, sid)
                    per_req.setdefault(req.id, [req]).append(error)
        self._stats = self._snapshot()      # before handing out: a reader sees this step's state
        for items in per_req.values():
            req = items.pop(0)
            if items and isinstance(items[-1], BaseException):
                self._drop_live(req)          # the request fails whole: its other choices end
                self._finish(req, items)
            elif req.left == 0:
                self._finish(req, items)
            else:
                self._hand_out(req, items)

    def _drop_live(self, req: _Request) -> None:
        for sid in list(req.sids):
            if sid in self._live:
                self._batch.cancel(sid)
                self._retire(req, sid)
