# GenerationState: begin / next / end streaming over one context.  Included by _core.pyx.
#
# Each step runs in one nogil block: decode the previous token, sample (chain, then the grammar
# check), accept, end-of-generation check, token -> piece, UTF-8 hold-back, stop-string hold-back.
# Nothing in a step grows with the length of the output: only the held-back bytes (at most a
# partial character plus the longest stop string) are looked at again.

cdef class GenerationState:
    """One streaming generation over a Context: ``for chunk in state`` or gen_next(state).

    Created by :func:`gen_begin`.  Each ``__next__`` does one decode + sample step without the
    GIL and returns the new text (valid UTF-8; may be empty while bytes are held back).  The
    step that finishes also flushes what was held back; ``end()`` flushes the rest after an early
    stop and frees the sampler.  A newer gen_begin on the same context makes this state stale.
    """
    cdef Context _context
    cdef _Seq _seq
    cdef SeqCore * _core                    # self._seq.c
    cdef uint64_t _epoch
    cdef llama.llama_context * _lctx
    cdef vector[llama.llama_token_data] _cand
    cdef bint _ended
    cdef int64_t _t_prefill_us
    cdef int32_t _n_reused            # prompt tokens found in the cache (a loaded state), not prefilled
    cdef int64_t _t_gen_us
    cdef Py_ssize_t _chunk_from             # tokens before the latest step (chunk_logprobs)
    cdef llama.llama_batch _sbatch          # speculative steps: the pending token and its draft
    cdef bint _has_sbatch
    cdef CostCurve _curve                   # speculative steps: decode time by rows
    cdef SpecMemory * _mem                  # ... and the context's memory of it (NULL: none)
    cdef object _mem_ref                    # ... its owner (_SpecMemory)
    cdef tuple _lora                        # its LoRA set (see _adapters.pxi)

    def __cinit__(self):
        self._lctx = NULL
        self._ended = False
        self._has_sbatch = False
        self._mem = NULL
        # a placeholder until gen_begin sets the real one: an instance made without gen_begin
        # (GenerationState.__new__) raises instead of touching NULL
        self._seq = _Seq.__new__(_Seq)
        self._core = self._seq.c

    def __init__(self):
        raise TypeError("use llamagen.gen_begin(ctx, prompt, ...) to start a generation")

    def __dealloc__(self):
        if self._has_sbatch:
            llama.llama_batch_free(self._sbatch)
            self._has_sbatch = False

    cdef void _free_samplers(self) noexcept:
        if self._seq is not None:
            self._seq.c.free_samplers()

    # -- the step (no GIL) -------------------------------------------------------------------

    cdef int _step(self) noexcept nogil:
        cdef SeqCore * q = self._core
        """One token (or, speculating, the pending token and the accepted part of its draft).
        Returns 0, or llama_decode's non-zero code (the state then stops)."""
        cdef int32_t rc, k = 0, j
        cdef int64_t t0 = llama.llama_time_us(), td = 0
        cdef llama.llama_batch * b = &self._sbatch
        cdef bint asked = False
        q.out.clear()
        if q.pending >= 0:
            if q.drafter != NULL and q.spec_want(_spec_budget_curve(q, &self._curve)):
                # a step's cost includes drafting: nothing for an n-gram lookup, a draft model's
                # decodes for draft-simple (so a draft model that is not accepted stops paying)
                asked = True
                td = llama.llama_time_us()
                lgspec.run(q.drafter)
                q.n_caught_up = lgspec.caught_up(q.drafter)
                k = q.spec_take()
            if k == 0:
                if q.drafter != NULL and not asked:
                    td = llama.llama_time_us()
                rc = llama.llama_decode(self._lctx, llama.llama_batch_get_one(&q.pending, 1))
                if q.drafter != NULL:
                    llama.llama_synchronize(self._lctx)
                    self._curve.add(1, <double> (llama.llama_time_us() - td))
            else:
                for j in range(k + 1):
                    b.token[j] = q.pending if j == 0 else q.draft[j - 1]
                    b.pos[j] = q.n_past + j
                    b.n_seq_id[j] = 1
                    b.seq_id[j][0] = 0
                    b.logits[j] = 1
                b.n_tokens = k + 1
                if q.spec_exact:
                    lgctx.set_one_row(self._lctx, True)
                rc = llama.llama_decode(self._lctx, b[0])
                llama.llama_synchronize(self._lctx)
                if q.spec_exact:
                    lgctx.set_one_row(self._lctx, False)
                self._curve.add(k + 1, <double> (llama.llama_time_us() - td))
            if rc != 0:
                q.draft.clear()
                q.finish = FINISH_LENGTH if rc == 1 else FINISH_STOP
                q.flush()
                self._t_gen_us += llama.llama_time_us() - t0
                return rc
        if k == 0:
            q.consume(self._lctx, -1, self._cand.data())
        else:
            q.draft_idx = 1
            q.verify(self._lctx, 0, self._cand.data())
            q.spec_settle(self._lctx, 0)
            self._mem.save(&self._curve, q)
        self._t_gen_us += llama.llama_time_us() - t0
        return 0

    # -- Python API --------------------------------------------------------------------------

    cdef int _enter(self) except -1:
        """Lock the context and check that this state may step.  Returns 1 if finished."""
        if self._context is None:
            raise LlamaError("this GenerationState was not started: use llamagen.gen_begin()")
        if self._ended or self._core.finish != FINISH_NONE:
            return 1                        # (even once the context is closed)
        self._context._acquire()
        if self._core.finish != FINISH_NONE or self._ended:
            self._context._release()
            return 1
        if self._epoch != self._context._epoch:
            self._context._release()
            raise StaleStateError(
                "this generation is no longer active: a newer gen_begin (or clear/close) on its "
                "context replaced it")
        # (its LoRA set was applied when it started: anything that decodes with another set on
        # this context took it over first, which the epoch check above catches)
        return 0

    cdef object _next_chunk(self):
        """The next chunk as str, or None when the generation is over."""
        cdef int rc
        if self._enter():
            return None
        self._chunk_from = <Py_ssize_t> self._core.tokens.size()
        try:
            with nogil:
                rc = self._step()
        finally:
            self._context._release()
        if rc != 0:
            check_decode(rc, b"generation step")
        if self._core.finish == FINISH_ERROR:
            self._core.out.clear()
            raise _seq_failure(self._core)
        return self._seq.take_out()

    def __iter__(self):
        return self

    def __next__(self):
        chunk = self._next_chunk()
        if chunk is None:
            raise StopIteration
        return chunk

    def next(self):
        """The next chunk (str), or None once the generation has finished."""
        return self._next_chunk()

    cdef _run_all(self):
        """Run to the end without the GIL (used by generate()); returns the whole text."""
        cdef string acc
        cdef int rc = 0
        cdef SeqCore * q = self._core
        if self._enter():
            return ""
        self._context._abort.armed = 1
        self._context._abort.interrupted = 0
        try:
            with nogil:
                while q.finish == FINISH_NONE:
                    rc = self._step()
                    acc.append(q.out)
                    if rc != 0 or self._context._abort.interrupted:
                        break
                q.out.clear()
        finally:
            self._context._abort.armed = 0
            self._context._release()
        if self._context._abort.interrupted:
            self._context._abort.interrupted = 0
            raise KeyboardInterrupt
        if rc != 0:
            check_decode(rc, b"generation")
        if q.finish == FINISH_ERROR:
            raise _seq_failure(q)
        return PyUnicode_DecodeUTF8(acc.data(), <Py_ssize_t> acc.size(), NULL)

    def end(self):
        """Finish: flush held-back text (returned as str) and free the sampler.  Idempotent."""
        if self._ended:
            return ""
        if self._context is not None:
            # wait for a step running in another thread: it uses the samplers freed here
            self._context._acquire_any()
        try:
            if self._ended:
                return ""
            self._ended = True
            if self._core.finish == FINISH_NONE:
                self._core.finish = FINISH_CANCELLED      # ended early, by the caller
            # what only stepping needs goes now (n_vocab candidates: 3 MB at 262k)
            self._cand.clear()
            self._cand.shrink_to_fit()
            self._core.out.clear()
            self._core.flush()
            if self._core.attached and self._context is not None and self._epoch == self._context._epoch:
                self._context._detach(0)        # the context stops sampling for this state
            self._free_samplers()
            return self._seq.take_out()
        finally:
            if self._context is not None:
                self._context._release()

    def close(self):
        self.end()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.end()

    # -- introspection -----------------------------------------------------------------------

    @property
    def params(self):
        return self._seq.params

    @property
    def seed(self):
        """The seed used (drawn from fresh entropy when params.seed is None)."""
        return self._seq.seed

    @property
    def n_prompt_tokens(self):
        return self._core.n_prompt

    @property
    def tokens(self):
        """Generated token ids so far."""
        return list(self._core.tokens)

    @property
    def n_tokens(self):
        return self._core.tokens.size()

    @property
    def logprobs(self):
        """TokenLogprobs of the generated tokens so far (``logprobs=k`` in the parameters), or
        None when logprobs are off."""
        if self._core.n_logprobs < 0:
            return None
        return _seq_logprobs(self._context.model, self._core, 0, -1)

    @property
    def chunk_logprobs(self):
        """TokenLogprobs of the tokens the latest step sampled (the chunk it returned may hold
        their text back, see __next__); None when logprobs are off."""
        if self._core.n_logprobs < 0:
            return None
        return _seq_logprobs(self._context.model, self._core, self._chunk_from, -1)

    @property
    def finish_reason(self):
        """"stop" (end of generation or stop string), "length" (max_new_tokens or context full),
        "error" (the grammar allowed no token: the step raised GrammarError), "cancelled"
        (end() before it finished) or None while running."""
        return _FINISH_NAMES[self._core.finish]

    @property
    def finished(self):
        return self._core.finish != FINISH_NONE or self._ended

    @property
    def sampler_engine(self):
        """What chooses the tokens: "fast" (llamagen's engine), "llama.cpp" (llama.cpp's sampler
        chain on the host) or "backend" (llama.cpp's chain inside the decode graph, on the
        model's output device).  sampler_impl="backend" runs as "llama.cpp" where llama.cpp
        cannot attach the chain to the context."""
        return _ENGINE_NAMES[self._core.engine]

    @property
    def speculative_stats(self):
        """Speculative decoding so far: drafted tokens, accepted ones, acceptance_rate and the
        decodes that verified a draft (None when the parameters have no ``speculative``)."""
        return _spec_stats(self._core)

    def save(self, path=None):
        """Save this running generation -- its KV cells, tokens, held-back text and sampler
        state -- as bytes (also written to ``path`` when given); ``llamagen.gen_resume(ctx,
        saved)`` goes on with it on any context of the same model, with the tokens this state
        would have produced.  Needs sampler_impl "fast" (the default) or greedy sampling."""
        return _gen_save(self, path)

    @property
    def timings(self):
        """prefill_ms; decode_ms (all steps: decode + sampling + detokenizing); sample_ms (the
        sampling part of it); n_tokens; tokens_per_second; n_cached_tokens (prompt tokens taken
        from a loaded state or the kept prompt of ``n`` > 1, not prefilled)."""
        n = self._core.tokens.size()
        gen_s = self._t_gen_us / 1e6
        n_prompt = self._core.n_prompt
        return {
            "prefill_ms": self._t_prefill_us / 1e3,
            "decode_ms": self._t_gen_us / 1e3,
            "sample_ms": self._core.t_sample_ns / 1e6,
            "n_prompt_tokens": n_prompt,
            "n_cached_tokens": self._n_reused,
            "n_tokens": n,
            "prefill_tokens_per_second": (n_prompt / (self._t_prefill_us / 1e6)
                                          if self._t_prefill_us > 0 else None),
            "tokens_per_second": n / gen_s if gen_s > 0 else None,
        }

    def __repr__(self):
        return (f"<llamagen.GenerationState tokens={self._core.tokens.size()} "
                f"finish_reason={self.finish_reason!r}>")


cdef int _prefill(Context ctx, vector[llama.llama_token] & toks, SeqCore * q,
                  int32_t keep=0) except -1:
    """Clear the KV cache and decode the prompt in n_batch chunks (GIL released, Ctrl-C aware).
    ``keep`` > 0: the cache already holds the first ``keep`` prompt tokens (the previous
    generation's prompt, see _generate_n): everything after them is removed and only the rest is
    decoded.  A backend-sampling ``q`` gets its chain attached to sequence 0 before the last chunk
    (the one whose last token is sampled): earlier chunks sample nothing and draw no random
    numbers.  The last prompt token is decoded alone, so its logits are those of a cached
    prompt's (the batch's cache, ``keep``, the server): seeds reproduce either way."""
    cdef int32_t n_batch = llama.llama_n_batch(ctx._ctx)
    cdef int32_t i = keep, n, total = <int32_t> toks.size(), rc = 0
    cdef llama.llama_memory_t mem = llama.llama_get_memory(ctx._ctx)
    ctx._abort.armed = 1
    ctx._abort.interrupted = 0
    ctx._abort.last_us = llamagen_monotonic_us()
    try:
        with nogil:
            if i <= 0 or i >= total or not llama.llama_memory_seq_rm(mem, 0, i, -1):
                # (a memory that cannot cut a sequence in the middle starts over)
                llama.llama_memory_clear(mem, True)
                i = 0
            while i < total:
                n = total - i
                if n > 1:
                    n -= 1          # the last token alone, as after a cached prefix (_fill_batch)
                if n > n_batch:
                    n = n_batch
                if i + n == total and q.backend and not q.attached:
                    q.attach(ctx._attach(0, q.chain))
                rc = llama.llama_decode(ctx._ctx, llama.llama_batch_get_one(toks.data() + i, n))
                if rc != 0:
                    break
                i += n
    finally:
        ctx._abort.armed = 0
    if rc != 0 or ctx._abort.interrupted:
        with nogil:
            llama.llama_memory_clear(mem, True)
        if ctx._abort.interrupted:
            ctx._abort.interrupted = 0
            raise KeyboardInterrupt
        check_decode(rc, b"prompt prefill")
    return 0


cdef vector[llama.llama_token] _prompt_tokens(Context ctx, prompt, bint add_special,
                                             bint parse_special, int32_t n_ctx) except *:
    """Tokenize (or check) a prompt and make sure it leaves room for one new token.  User code
    may run here (a token object's __index__) and may close the context: callers check it again
    (under its lock) before any C call that needs it."""
    cdef vector[llama.llama_token] toks
    prompt = _check_prompt(prompt)         # TypeError for what is neither text nor token ids
    if isinstance(prompt, (str, bytes)):
        ctx._check()
        ctx.model._pin()                   # tokenizing releases the GIL: keep the vocabulary
        try:
            toks = _tokenize(ctx._vocab, prompt, add_special, parse_special)
        finally:
            ctx.model._release_user()
    else:
        _fill_tokens(toks, prompt, ctx._n_vocab)
    if toks.size() == 0:
        raise ValueError("the prompt is empty (no tokens to condition on)")
    if <int32_t> toks.size() >= n_ctx:
        # the same error the engine raises for it (a ValueError, as before)
        raise PromptTooLongError(toks.size(), n_ctx,
                                 f"the prompt has {toks.size()} tokens but the context holds "
                                 f"{n_ctx}: it must leave room for at least one new token (use a "
                                 "larger n_ctx)")
    return toks


def _gen_begin(Context ctx not None, prompt, params, bint add_special=True, bint parse_special=True):
    """Start a generation (see llamagen.gen_begin).  ``params`` is a validated SamplingParams."""
    cdef vector[llama.llama_token] toks
    if not isinstance(params, SamplingParams):
        raise TypeError("params must be a llamagen.SamplingParams")
    if params.prompt_logprobs is not None:
        raise invalid(ValueError, "prompt_logprobs",
                      "prompt_logprobs is computed by batches and the engine (BatchGenerator, "
                      "map_generate, AsyncEngine); for one text use llamagen.score")
    ctx._check_generative()
    toks = _prompt_tokens(ctx, prompt, add_special, parse_special, llama.llama_n_ctx_seq(ctx._ctx))
    cdef int32_t keep = 0, limit
    resume = ctx._resume
    if resume is not None and _lora_key(ctx, params.lora) == ctx._resume_lora:
        # a loaded state (Context.load_state ...): its tokens that begin the prompt stay, all but
        # the prompt's last token (decoded alone, as after any cached prompt)
        limit = min(<int32_t> toks.size() - 1, <int32_t> len(resume))
        while keep < limit and toks[keep] == resume[keep]:
            keep += 1
    return _start(ctx, toks, params, keep, ctx._resume_epoch if keep > 0 else 0)


cdef GenerationState _start(Context ctx, vector[llama.llama_token] & toks, params, int32_t keep,
                            uint64_t keep_epoch):
    """A GenerationState for prompt ``toks``; ``keep`` > 0: the cache holds its first ``keep``
    tokens, unless something took the context over since epoch ``keep_epoch``."""
    cdef GenerationState st = GenerationState.__new__(GenerationState)
    cdef int64_t t0
    cdef int32_t n_ctx
    st._lora = _lora_key(ctx, params.lora)
    # the lock from the "is it open?" check to the last C call: another thread's close() waits
    ctx._acquire()
    try:
        n_ctx = llama.llama_n_ctx_seq(ctx._ctx)
        st._seq = _new_seq(ctx, params, <int32_t> toks.size(), n_ctx)
        st._core = st._seq.c
        _reasoning_prime(st._core, toks, params)
        st._context = ctx
        st._lctx = ctx._ctx
        st._cand.resize(ctx._n_vocab)
        st._core.prompt = toks              # (what a drafter begins with, and save() keeps)
        if st._core.spec_n_max > 0:
            st._core.drafter = _new_drafter(params.speculative, 1, ctx)
            st._core.owns_drafter = True
            st._sbatch = llama.llama_batch_init(st._core.spec_n_max + 1, 0, 1)
            # (a reference: the context drops a drafter's memory 8 drafters later)
            st._mem_ref = _spec_memory(ctx, params.speculative)
            st._mem = &(<_SpecMemory> st._mem_ref).m
            st._mem.load(&st._curve, st._core)
            st._has_sbatch = True
        if ctx._epoch != keep_epoch:
            keep = 0
        st._n_reused = keep
        ctx._use_lora(st._lora)
        ctx._take_over()
        st._epoch = ctx._epoch
        t0 = llama.llama_time_us()
        _prefill(ctx, toks, st._core, keep)
        st._t_prefill_us = llama.llama_time_us() - t0
    finally:
        ctx._release()
    return st


def _generate(Context ctx not None, prompt, params, bint add_special=True, bint parse_special=True):
    """Whole generation in one call (see llamagen.generate): text identical to the stream."""
    cdef GenerationState st = _gen_begin(ctx, prompt, params, add_special, parse_special)
    try:
        text = st._run_all()
        return text + st.end(), st
    finally:
        st._free_samplers()


def _generate_n(Context ctx not None, prompt, list params, bint add_special=True,
                bint parse_special=True):
    """One generation per SamplingParams in ``params``, one after another on sequence 0, the
    prompt prefilled once: each later one keeps the prompt's cells but its last token, which is
    decoded again for its logits.  [(text, state)]."""
    cdef vector[llama.llama_token] toks
    cdef GenerationState st
    cdef uint64_t epoch = 0
    ctx._check_generative()
    toks = _prompt_tokens(ctx, prompt, add_special, parse_special, llama.llama_n_ctx_seq(ctx._ctx))
    out = []
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise TypeError("params must be llamagen.SamplingParams")
        st = _start(ctx, toks, p, <int32_t> toks.size() - 1 if i > 0 else 0, epoch)
        try:
            text = st._run_all()
            out.append((text + st.end(), st))
        finally:
            st._free_samplers()
        epoch = ctx._epoch
    return out


def _spec_caught_up(GenerationState st):
    """(tests) Generated tokens a draft model's context decoded to catch up with the stream
    (those its drafting left decoded are kept: csrc/lg_spec.cpp run())."""
    return st._core.n_caught_up


def _spec_learned(obj):
    """(tests) What a Context remembers of its latest speculative stream, or what a
    GenerationState knows now: {rows: mean decode us} measured, and the decayed (accepted,
    cut short) counts; None where nothing was learned."""
    cdef CostCurve * c
    cdef GenerationState st
    cdef SpecMemory * m
    if isinstance(obj, Context):
        mems = (<Context> obj)._spec_memory
        if not mems:
            return None
        last = next(reversed(mems.values()))       # (the latest used drafter's)
        m = &(<_SpecMemory> last).m
        if not m.has:
            return None
        c = &m.curve
        s, f = m.s, m.f
    else:
        st = <GenerationState?> obj
        if st._mem == NULL:
            return None
        c = &st._curve
        s, f = st._core.spec_s, st._core.spec_f
    return {"rows": {r: c.mean(r) for r in c.seen}, "accepted": s, "cut_short": f}
