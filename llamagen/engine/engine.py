"""AsyncEngine, the facade: a request validated once (prompt tokens, one SamplingParams per
choice), submitted to the engine thread (core.py) and read back through a stream (streams.py);
embedding jobs; stats; close.  Everything here runs on the caller's thread.
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import weakref
from typing import List, Optional, Sequence, Union

from llamagen import adapters as _adapters, chat
from llamagen._core import BatchGenerator, Context, Model, _check_grammar
from llamagen._shared import check_n, seeded
from llamagen._util import check_prompt, default_model_path
from llamagen.embeddings import EmbedResult, _norm_code, _rerank_items, _text_list
from llamagen.engine.core import EngineCore, _EmbedJob, _Request
from llamagen.engine.streams import EngineStream, SyncStream
from llamagen.engine.types import EngineResult, EngineStats, PreparedRequest
from llamagen.errors import EngineClosedError, LlamaError, PromptTooLongError, invalid
from llamagen.sampling import SamplingParams, resolve
from llamagen.speculative import coerce as coerce_speculative

__all__ = ["AsyncEngine"]


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
    (``Context(deterministic=True)``, docs/determinism.md).  ``speculative``: a
    llamagen.Speculative (or type name) every request drafts with unless its own parameters say
    otherwise (docs/speculative.md).  ``type_k`` / ``type_v``: the KV cache's element types
    (``Context``'s; q8_0 halves the cache, docs/kv-cache.md).  ``lora``: LoRA adapters to
    load (paths, (path, scale) pairs or LoraAdapters), applied to every request that does not
    name its own set unless ``lora_apply=False``; ``engine.adapters`` lists them, a request's
    ``lora={index or adapter: scale}`` picks its own (docs/adapters.md).  ``control_vector``:
    a ControlVector, path or [(path, strength)] on layers ``control_vector_layers`` (start, end).
    ``cache_ram_mib``: host RAM for prompt caches evicted from the KV cache, restored on a later
    hit instead of prefilled (llama-server's ``--cache-ram``; 0 off, -1 no limit; docs/state.md).
    """

    def __init__(self, model: Union[Model, str, os.PathLike, None] = None, *, n_ctx: int = 16384,
                 n_parallel: int = 8, n_threads: Optional[int] = None, n_batch: int = 512,
                 max_queue: Optional[int] = None, prompt_cache: Union[bool, int] = True,
                 params: Optional[SamplingParams] = None, embeddings: bool = False,
                 pooling: Optional[str] = None, embed_batch: int = 2048,
                 chat_template: Optional[str] = None, deterministic: bool = False,
                 speculative=None, type_k: str = "f16", type_v: str = "f16", lora=None,
                 lora_apply: bool = True, control_vector=None, control_vector_layers=None,
                 cache_ram_mib: int = 0):
        # every request drafts this way unless it says otherwise (``speculative=`` / its params)
        self.speculative = coerce_speculative(speculative)
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
                                deterministic=bool(deterministic), type_k=type_k, type_v=type_v)
            loaded = _adapters.load_loras(self.model, lora)
            self.adapters = [a for a, _ in loaded]
            self._ctx.set_adapters({a: sc for a, sc in loaded} if lora_apply else None)
            cvec = _adapters.control_vector_from(control_vector)
            if cvec is not None:
                lo, hi = control_vector_layers or (None, None)
                self._ctx.set_control_vector(cvec, layer_start=lo, layer_end=hi)
            if isinstance(cache_ram_mib, bool) or not isinstance(cache_ram_mib, int) or cache_ram_mib < -1:
                raise ValueError(f"cache_ram_mib must be -1 (no limit), 0 (off) or MiB, got {cache_ram_mib!r}")
            ram = -1 if cache_ram_mib < 0 else cache_ram_mib << 20
            self._batch = BatchGenerator(self._ctx, n_parallel=n_parallel, prompt_cache=prompt_cache,
                                         cache_ram=ram if prompt_cache else 0)
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
        self.n_batch = n_batch
        self.n_parallel = n_parallel
        self.deterministic = self._ctx.deterministic
        self.max_queue = max_queue
        self.defaults = params if params is not None else SamplingParams()
        self._piece_bytes: Optional[int] = None
        self._core = EngineCore(self.model, self._ctx, self._batch, self._ectx, n_parallel,
                                max_queue)
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
        """``messages`` (with ``tools``, ``tool_choice``, ``parallel_tool_calls``, ...) rendered
        and tokenized for this engine's model and template: llamagen.chat.prepare's ChatPrompt
        (prompt tokens, the sampling the template needs, the parser of the replies)."""
        kwargs.setdefault("template", self.chat_template)
        return chat.prepare(self.model, messages, **kwargs)

    def _prepare(self, prompt, params, n, add_special, parse_special, sampling):
        """Validate everything a request needs (on the caller's thread): token ids and one
        SamplingParams per choice."""
        if self._core.closing:
            raise EngineClosedError("the engine is closed")
        n = check_n(n)
        if sampling.get("lora") is not None:
            sampling = dict(sampling, lora=_adapters.lora_arg(self.adapters, sampling["lora"]))
        spec = sampling.get("speculative")
        if isinstance(spec, dict) and self.speculative is not None:
            # a request's fields change the engine's drafting, not replace it
            sampling = dict(sampling, speculative={**self.speculative.to_dict(), **spec})
        budget = message = None
        if "reasoning_budget_message" in sampling or (isinstance(prompt, chat.ChatPrompt)
                                                     and "reasoning_budget" in sampling):
            sampling = dict(sampling)       # (a chat budget needs the template's thinking tags)
            message = sampling.pop("reasoning_budget_message", None)
            if isinstance(prompt, chat.ChatPrompt):
                budget = sampling.pop("reasoning_budget", None)
        p = resolve(params if params is not None else self.defaults, (), sampling)
        if self.speculative is not None and p.speculative is None and "speculative" not in sampling:
            p = p.replace(speculative=self.speculative)
        if isinstance(prompt, chat.ChatPrompt):
            p = prompt.params(p)                   # what its template asks of sampling
            # (a template that does not think: the budget is ignored, as llama-server does)
            p = prompt.budgeted(p, budget, message)
            prompt = prompt.tokens
        for a, _ in p.lora or ():
            if a.model is not self.model or a.closed:
                raise invalid(ValueError, "lora", f"the LoRA adapter {a.path!r} is "
                              + ("closed" if a.closed else "loaded for another model"))
        if p.gbnf is not None:
            _check_grammar(self.model, p)          # GrammarError now, not from the stream
        n_vocab = self.model.n_vocab
        for t, _ in p.logit_bias:
            if not 0 <= t < n_vocab:
                raise invalid(ValueError, "logit_bias",
                              f"logit_bias names token {t}, not a token id in [0, {n_vocab})")
        prompt = check_prompt(prompt)
        if isinstance(prompt, (str, bytes)):
            if len(prompt) >= self.n_ctx:
                # no token is longer than the model's longest piece: a text that long per
                # context cell cannot fit, and is refused before it is tokenized (an 8 MB prompt
                # took 9.4 s to get its 400, issue 35)
                at_least = -(-len(prompt) // self._max_piece_bytes())
                if at_least >= self.n_ctx:
                    raise PromptTooLongError(
                        at_least, self.n_ctx, f"the prompt is at least {at_least} tokens long "
                        f"({len(prompt)} characters, no token longer than "
                        f"{self._max_piece_bytes()} bytes) but the context holds {self.n_ctx}")
            tokens = self.model.tokenize(prompt, add_special=add_special,
                                         parse_special=parse_special)
        else:
            tokens = list(prompt)
            for t in tokens:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_vocab:
                    raise invalid(ValueError, "prompt",
                                  f"prompt token {t!r} is not a token id in [0, {n_vocab})")
        if not tokens:
            raise invalid(ValueError, "prompt", "the prompt is empty (no tokens to condition on)")
        if len(tokens) >= self.n_ctx:
            raise PromptTooLongError(len(tokens), self.n_ctx)
        return tokens, seeded(p, n)

    def _max_piece_bytes(self) -> int:
        """The longest token's text in bytes (special tokens too), found once."""
        if self._piece_bytes is None:
            m = self.model
            self._piece_bytes = max(1, max((len(m.token_to_piece(t, special=True))
                                            for t in range(m.n_vocab)), default=1))
        return self._piece_bytes

    def _cancel(self, req: _Request) -> None:
        """Cancel a request at the engine's next step (streams call it; any thread)."""
        self._core.cancel(req)

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
        s._req = self._core.submit(prepared.tokens, prepared.params, s._deliverer())
        return s

    def stream(self, prompt, params: Optional[SamplingParams] = None, *, n: int = 1,
               add_special: bool = True, parse_special: bool = True, **sampling) -> "EngineStream":
        """Submit a request; returns an async iterator of EngineChunks (all choices interleaved,
        ``chunk.index`` tells them apart).  ``prompt``: text, token ids, or a llamagen.chat
        ChatPrompt (its tokens; what its template asks of sampling merged into ``params``).
        Everything is validated here, before it returns: InvalidParamError (a ValueError /
        TypeError) naming a bad field, PromptTooLongError, QueueFullError, EngineClosedError.
        Closing the iterator (``aclose()``, ``async with``, leaving an ``async for`` by break and
        dropping it, or cancelling the task reading it) cancels the request at the next step and
        frees its KV cells."""
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
        s._req = self._core.submit(tokens, ps, s._queue.put)
        return s

    def generate_sync(self, prompt, params: Optional[SamplingParams] = None, *, n: int = 1,
                      add_special: bool = True, parse_special: bool = True,
                      **sampling) -> EngineResult:
        with self.stream_sync(prompt, params, n=n, add_special=add_special,
                              parse_special=parse_special, **sampling) as s:
            return s.collect()

    # -- adapters ------------------------------------------------------------------------------

    def lora_scales(self) -> List[float]:
        """The default scale of each of ``adapters`` (0: not applied unless a request asks)."""
        default = self._ctx.adapters
        return [default.get(a, 0.0) for a in self.adapters]

    def set_lora_scales(self, scales) -> None:
        """New default scales ({index or adapter: scale}; adapters left out get 0) for requests
        submitted from now on; running ones keep theirs."""
        self._ctx.set_adapters(_adapters.lora_arg(self.adapters, scales) if scales else None)

    # -- slots (llama-server's /slots/{id}?action=...) --------------------------------------------

    def save_slot(self, slot: int, path) -> tuple:
        """Write idle slot ``slot``'s prompt cache (its cells and tokens) to ``path``: (tokens,
        bytes).  Blocks until the engine is between steps; call it off the event loop."""
        return self._batch.save_slot(slot, path)

    def restore_slot(self, slot: int, path) -> tuple:
        """Load a ``save_slot`` file into idle slot ``slot`` as its prompt cache: (tokens, bytes)."""
        return self._batch.restore_slot(slot, path)

    def erase_slot(self, slot: int) -> int:
        return self._batch.erase_slot(slot)

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
        self._core.submit_embed(job)
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

    # -- state ---------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        """Counters as of the last step (a consistent snapshot, cheap to read)."""
        return self._core.stats

    @property
    def closed(self) -> bool:
        return self._core.closing

    def close(self, timeout: Optional[float] = None) -> None:
        """Cancel every request, stop the engine thread and free the context (and the model,
        when the engine loaded it).  Idempotent."""
        if self._core.stop(timeout):
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
