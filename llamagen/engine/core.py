"""The engine thread: an inbox of (_Op, job) pairs filled by the facade (engine.py) from any
thread, and a loop that admits requests into the BatchGenerator, steps it, runs embedding jobs
between steps, and hands each request's finished output to its stream (vLLM v1's engine core and
output processing, in one thread: llama.cpp decodes on the thread that owns the context)."""
from __future__ import annotations

import concurrent.futures
import enum
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np

from llamagen._core import BatchGenerator, Context, Model, _embed, _embed_splits, _EmbedText
from llamagen.embeddings import EmbedResult, _reindex
from llamagen.engine.streams import _DONE
from llamagen.engine.types import EngineChunk, EngineStats
from llamagen.errors import (
    EngineClosedError, GenerationError, LlamaError, QueueFullError, RequestCancelledError,
)

__all__ = ["EngineCore"]

# Embedding jobs take turns with generation.  While sequences generate, a slice takes about as
# long as a generation step (at most EMBED_SLICE_SECONDS; sized by the rate the last slices ran
# at), so the streams keep about half the engine's time and a token waits about one extra step.
# A text longer than a slice is decoded in pieces (a slice's worth of tokens, one at least) over
# several steps where the embedding context allows it (causal attention: _embed_splits), else
# whole.  With nothing generating, slices of EMBED_SLICE_CHARS characters run back to back (a new
# request waits for one of them at most).
EMBED_SLICE_SECONDS = 0.05
EMBED_SLICE_CHARS = 16384


class _Op(enum.Enum):
    """What the engine thread is asked to do (its inbox holds (op, job) pairs)."""
    ADD = "add"          # a _Request: admit its sequences
    CANCEL = "cancel"    # a _Request: drop its live sequences
    EMBED = "embed"      # an _EmbedJob: run it between two steps


@dataclass
class _EmbedJob:
    """Texts (or token ids) to embed on the engine thread; the caller waits on ``future``."""
    items: list
    norm: int
    truncate: bool
    add_special: bool
    parse_special: bool
    future: concurrent.futures.Future
    done: int = 0                        # items embedded so far (a slice per engine step)
    parts: list = field(default_factory=list)       # their (vectors, n_tokens, truncated)
    piece: Optional[_EmbedText] = None   # item ``done`` under way in pieces, if it is


class _Request:
    """One submitted request (n choices) as the engine thread sees it."""
    __slots__ = ("id", "tokens", "params", "deliver", "n", "sids", "seen", "left", "cached",
                 "completion", "cancelled", "done", "held", "drafted", "accepted")

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
        self.held: Dict[int, list] = {}     # seq id -> logprobs of tokens whose text is held back
        self.drafted = 0                    # speculative decoding, over the finished choices
        self.accepted = 0


class EngineCore:
    """The engine thread and what only it touches (the BatchGenerator, the live sequences), plus
    the locked inbox the facade submits to.  ``max_queue``: sequences allowed to wait for a slot
    (None: no limit)."""

    def __init__(self, model: Model, ctx: Context, batch: BatchGenerator, ectx: Optional[Context],
                 n_parallel: int, max_queue: Optional[int]):
        self.model = model
        self.n_ctx = ctx.n_ctx
        self.n_parallel = n_parallel
        self.max_queue = max_queue
        self._batch = batch
        self._ectx = ectx
        self._lock = threading.Condition()
        self._inbox: deque = deque()        # (_Op, _Request | _EmbedJob)
        self._n_seqs = 0                    # sequences submitted and not finished
        self.closing = False
        self._ids = itertools.count()
        self._live: Dict[int, _Request] = {}        # seq id -> request (engine thread only)
        self._embeds: deque = deque()       # embedding jobs under way, oldest first (ditto)
        self._embed_rate = 20_000.0         # characters embedded per second, as last measured
        self._piece_rate = 2_000.0          # tokens per second of pieces, ditto
        self._step_s = EMBED_SLICE_SECONDS  # a generation step's time (moving average)
        self._split = ectx is not None and _embed_splits(ectx)
        self.n_embed_pieces = 0             # pieces of texts embedded so far (tests, debugging)
        self._prompt_total = 0
        self._gen_total = 0
        self._requests_total = 0
        self.stats = self._snapshot()      # replaced after every step (readers take it whole)
        self._thread = threading.Thread(target=self._run, name="llamagen-engine", daemon=True)
        self._thread.start()

    # -- from any thread -----------------------------------------------------------------------

    def submit(self, tokens, ps, deliver) -> _Request:
        req = _Request(next(self._ids), tokens, ps, deliver)
        with self._lock:
            if self.closing:
                raise EngineClosedError("the engine is closed")
            if self.max_queue is not None and \
                    self._n_seqs + req.n - self.n_parallel > self.max_queue:
                raise QueueFullError(f"{max(0, self._n_seqs - self.n_parallel)} sequences already "
                                     f"wait for a slot (max_queue={self.max_queue})")
            self._n_seqs += req.n
            self._inbox.append((_Op.ADD, req))
            self._lock.notify()
        return req

    def cancel(self, req: _Request) -> None:
        """Cancel at the next step (any thread).  Idempotent."""
        if req.done or req.cancelled:
            return
        req.cancelled = True
        with self._lock:
            self._inbox.append((_Op.CANCEL, req))
            self._lock.notify()

    def submit_embed(self, job: _EmbedJob) -> None:
        with self._lock:
            if self.closing:
                raise EngineClosedError("the engine is closed")
            self._inbox.append((_Op.EMBED, job))
            self._lock.notify()

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Stop the thread (requests in flight end with EngineClosedError); True once it ended."""
        with self._lock:
            self.closing = True
            self._lock.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the engine thread ---------------------------------------------------------------------

    def _embed_slice(self) -> None:
        """Embed the next slice of the oldest embedding job (see EMBED_SLICE_SECONDS), so that a
        job of a thousand texts takes turns with generation steps instead of stalling every
        stream for its whole length (21 s for 1,000 inputs, issue 35)."""
        job = self._embeds[0]
        fut = job.future
        if not job.parts and job.piece is None and not fut.set_running_or_notify_cancel():
            self._embeds.popleft()          # (cancelled before its first slice)
            return
        items, i = job.items, job.done
        seconds = min(EMBED_SLICE_SECONDS, self._step_s) if self._live else None
        budget = EMBED_SLICE_CHARS if seconds is None else \
            min(EMBED_SLICE_CHARS, int(self._embed_rate * seconds))
        try:
            if job.piece is None and seconds is not None and self._split and \
                    len(items[i]) > budget:
                job.piece = _EmbedText(self._ectx, items[i], job.norm, job.truncate,
                                       job.add_special, job.parse_special)
            if job.piece is not None:
                self._embed_piece(job, seconds)
                return
            j, size = i, 0
            while j < len(items) and (j == i or size + len(items[j]) <= budget):
                size += len(items[j])
                j += 1
            t0 = time.perf_counter()
            part = _embed(self._ectx, items[i:j], job.norm, job.truncate, job.add_special,
                          job.parse_special)
        except BaseException as e:      # noqa: BLE001 - handed to the caller
            self._embeds.popleft()
            fut.set_exception(_reindex(e, i, "text"))
            return
        took = time.perf_counter() - t0
        if took > 0.002:                # (the rate of slices big enough to time)
            self._embed_rate = 0.5 * self._embed_rate + 0.5 * size / took
        job.parts.append(part)
        job.done = j
        if j == len(items):
            self._embed_done(job)

    def _embed_piece(self, job: _EmbedJob, seconds: Optional[float]) -> None:
        """The next piece of the text under way (a slice's worth of tokens, or the rest of it
        when nothing generates any more)."""
        p = job.piece
        k = p.n_tokens if seconds is None else \
            max(1, int(self._piece_rate * seconds))
        before = p.done
        t0 = time.perf_counter()
        finished = p.step(k)
        self.n_embed_pieces += 1
        took = time.perf_counter() - t0
        if took > 0.002 and p.done > before:
            self._piece_rate = 0.5 * self._piece_rate + 0.5 * (p.done - before) / took
        if finished:
            job.parts.append((p.vectors, [p.n_tokens], [p.truncated]))
            job.piece = None
            job.done += 1
            if job.done == len(job.items):
                self._embed_done(job)

    def _embed_done(self, job: _EmbedJob) -> None:
        self._embeds.popleft()
        vectors, n_tokens, cut = [], [], []
        for v, n, c in job.parts:
            vectors.append(v)
            n_tokens += n
            cut += c
        if isinstance(vectors[0], np.ndarray):      # pooled: one (n, n_embd) array
            vectors = np.concatenate(vectors) if len(vectors) > 1 else vectors[0]
        else:                                       # per token: a list of arrays
            vectors = [a for v in vectors for a in v]
        job.future.set_result(EmbedResult(vectors, n_tokens, cut))

    def _snapshot(self) -> EngineStats:
        b = self._batch
        running = b.n_active
        ram = b.ram_cache
        return EngineStats(
            n_running=running, n_waiting=max(0, self._n_seqs - running), kv_used=b.kv_used,
            kv_size=self.n_ctx, prompt_tokens_total=self._prompt_total,
            generated_tokens_total=self._gen_total, prefix_cache_queries=b.n_cache_queries,
            prefix_cache_hits=b.n_cache_hits + b.n_shared_tokens,
            requests_total=self._requests_total, n_steps=b.n_steps,
            draft_tokens_total=b.n_drafted, accepted_draft_tokens_total=b.n_accepted,
            n_stalled_steps=b.n_stalled_steps, ram_cache_bytes=ram["bytes"],
            ram_cache_restored_tokens=ram["restored_tokens"])

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
                    while not self._inbox and not self._live and not self._embeds and \
                            not self.closing:
                        self._lock.wait()
                    if self.closing:
                        break
                    todo = list(self._inbox)
                    self._inbox.clear()
                for op, req in todo:
                    if op is _Op.ADD:
                        self._admit(req)
                    elif op is _Op.EMBED:
                        self._embeds.append(req)
                    else:
                        self._drop(req)
                if self._embeds:
                    self._embed_slice()
                if self._live:
                    self._step()
                self.stats = self._snapshot()
        except BaseException as e:        # a bug: never leave callers waiting forever
            self._fail_all(e)
            raise
        finally:
            with self._lock:
                self.closing = True
                todo = list(self._inbox)
                self._inbox.clear()
            for op, req in todo:
                if op is _Op.ADD:
                    self._finish(req, [EngineClosedError("the engine was closed")])
                elif op is _Op.EMBED and req.future.set_running_or_notify_cancel():
                    req.future.set_exception(EngineClosedError("the engine was closed"))
            for job in self._embeds:
                if not job.future.done():
                    job.future.set_exception(EngineClosedError("the engine was closed"))
            self._embeds.clear()
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
            self.cancel(req)

    def _fail_all(self, exc: BaseException) -> None:
        reqs = {id(r): r for r in self._live.values()}
        self._live.clear()
        for req in reqs.values():
            self._finish(req, [exc])

    def _step(self) -> None:
        b = self._batch
        error = None
        t0 = time.perf_counter()
        try:
            out = b.step()
        except LlamaError as e:
            out = []
            error = e
        self._step_s = 0.8 * self._step_s + 0.2 * (time.perf_counter() - t0)
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
            index = req.sids[sid]
            if reason in ("cancelled", "error"):
                # not an answer: the request fails as a whole (one place, not every reader)
                kind = RequestCancelledError if reason == "cancelled" else GenerationError
                items.append(kind(f"choice {index} ended without an answer ({reason})",
                                  index=index, reason=reason))
                self._retire(req, sid)
                continue
            stop = b.stop_sequence(sid) if reason == "stop" else None
            if reason is not None:
                spec = b.speculative_stats(sid)
                if spec is not None:
                    req.drafted += spec["drafted"]
                    req.accepted += spec["accepted"]
            chunk = EngineChunk(index, text, toks, reason, stop,
                                self._visible_logprobs(req, sid, b.logprobs(sid, seen), text,
                                                       toks, reason, stop))
            if seen == 0 and req.params[index].prompt_logprobs is not None:
                chunk.prompt_logprobs = b.prompt_logprobs(sid)
            items.append(chunk)
            if reason is not None:
                self._retire(req, sid)
        if error is not None:
            # sequences that failed (a grammar that allows no token) raised; the others' chunks
            # of this step come with the next step.  A decode failure ended every running one.
            for sid, req in list(self._live.items()):
                if b.finish_reason(sid) in ("error", "cancelled"):
                    self._retire(req, sid)
                    per_req.setdefault(req.id, [req]).append(error)
        self.stats = self._snapshot()      # before handing out: a reader sees this step's state
        for items in per_req.values():
            req = items.pop(0)
            errors = [x for x in items if isinstance(x, BaseException)]
            if errors:
                # the request fails whole: its other choices end, the first error is raised
                self._drop_live(req)
                self._finish(req, [x for x in items if not isinstance(x, BaseException)]
                             + errors[:1])
            elif req.left == 0:
                self._finish(req, items)
            else:
                self._hand_out(req, items)

    def _visible_logprobs(self, req: _Request, sid: int, lps, text: str, toks, reason, stop):
        """The logprobs of the tokens behind the text a chunk shows: a token whose text is held
        back (part of a character, a possible stop string) gives its logprob with the chunk that
        shows the text, and the end-of-generation token, which has no text, gives none (as
        OpenAI's and vLLM's logprobs)."""
        if lps is None:
            return None
        held = req.held.pop(sid, None)
        if held:
            lps = held + lps
        if reason is None and not text:
            if lps:
                req.held[sid] = lps
            return []
        if reason == "stop" and stop is None and lps and toks and self.model.is_eog(toks[-1]) \
                and req.params[0].prompt_logprobs is None:
            # (with the prompt's logprobs, every token is listed: OpenAI's echo, which scorers
            # such as lm-eval read as prompt + the generated tokens)
            lps = lps[:-1]
        return lps

    def _drop_live(self, req: _Request) -> None:
        for sid in list(req.sids):
            if sid in self._live:
                self._batch.cancel(sid)
                self._retire(req, sid)
