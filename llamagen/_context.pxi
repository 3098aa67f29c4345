# Context: a llama_context (KV cache, compute buffers) over a Model.  Included by _core.pyx.

cimport cython

from llamagen._util import physical_cores as _physical_cores

cdef extern from *:
    """
    #include <time.h>
    static inline long long llamagen_monotonic_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    }
    static inline long long llamagen_monotonic_us(void) {
        return llamagen_monotonic_ns() / 1000;
    }
    """
    long long llamagen_monotonic_us() nogil
    long long llamagen_monotonic_ns() nogil


cdef struct AbortState:
    int armed            # check for signals while a long call runs
    int interrupted      # a signal handler raised: abort the running call
    long long last_us    # last time the GIL was taken to look for signals


cdef cbool _abort_callback(void * data) noexcept nogil:
    """Called by ggml between graph nodes.  While armed, look for a pending Ctrl-C every 50 ms."""
    cdef AbortState * st = <AbortState *> data
    cdef long long now
    if not st.armed:
        return False
    if st.interrupted:
        return True
    now = llamagen_monotonic_us()
    if now - st.last_us < 50000:
        return False
    st.last_us = now
    with gil:
        try:
            PyErr_CheckSignals()     # runs Python's signal handlers (Ctrl-C raises here)
        except BaseException:
            st.interrupted = 1       # the caller raises KeyboardInterrupt once decode returns
    return st.interrupted != 0


from cpython.exc cimport PyErr_CheckSignals


# pooling names -> llama.cpp's (rank: a reranker's classification head, llamagen.rerank)
_POOLING = {"none": llama.LLAMA_POOLING_TYPE_NONE, "mean": llama.LLAMA_POOLING_TYPE_MEAN,
            "cls": llama.LLAMA_POOLING_TYPE_CLS, "last": llama.LLAMA_POOLING_TYPE_LAST,
            "rank": llama.LLAMA_POOLING_TYPE_RANK}
_POOLING_NAMES = {v: k for k, v in _POOLING.items()}


# no_gc_clear: __dealloc__ needs ``self.model`` to hand the model back.  Without it, a Context
# caught in a reference cycle (a subclass instance referring to itself, say) gets ``model`` set to
# None by the cycle collector first: the Model could then be freed before this context (which
# llama.cpp still ties to it), or, when kept elsewhere, never be freed by its close().
# KV cache element types (llama-server's -ctk / -ctv choices)
_KV_TYPES = {"f32": ggml.GGML_TYPE_F32, "f16": ggml.GGML_TYPE_F16, "bf16": ggml.GGML_TYPE_BF16,
             "q8_0": ggml.GGML_TYPE_Q8_0, "q4_0": ggml.GGML_TYPE_Q4_0, "q4_1": ggml.GGML_TYPE_Q4_1,
             "iq4_nl": ggml.GGML_TYPE_IQ4_NL, "q5_0": ggml.GGML_TYPE_Q5_0,
             "q5_1": ggml.GGML_TYPE_Q5_1}


cdef ggml.ggml_type _kv_type(str field, value) except *:
    if not isinstance(value, str) or value not in _KV_TYPES:
        raise invalid(ValueError, field, f"{field} must be one of {', '.join(_KV_TYPES)}, got "
                      f"{value!r}")
    return <ggml.ggml_type> _KV_TYPES[value]


@cython.no_gc_clear
cdef class Context:
    """A llama.cpp context over a Model: the KV cache and compute state for generation.

    ``Context(model, *, n_ctx=2048, n_batch=512, n_ubatch=512, n_seq_max=1, n_threads=None,
    n_threads_batch=None, flash_attn=None, kv_unified=None, embeddings=False, pooling=None,
    deterministic=False, type_k="f16", type_v="f16")``.
    ``n_ctx=0`` takes the model's training context; ``n_threads=None`` uses the machine's
    physical cores.  ``embeddings=True`` makes a context for llamagen.embed (pooled vectors;
    ``pooling`` "mean", "cls", "last" or "none", default the model's own): it generates nothing,
    its KV cache is unified and its ubatch is the whole batch (a text is pooled within one
    decode).  ``kv_unified`` defaults to False (True for embeddings).  Read the values llama.cpp
    actually uses back from the properties.  ``deterministic=True``: every sequence's logits are
    bit-identical whether it is decoded alone or with any companions, in any slot or cell, from
    a cached prefix or not, with any thread count (batch-invariant kernels, docs/determinism.md;
    CPU only, flash attention on).  ``type_k`` / ``type_v``: the KV cache's element types
    (f16, q8_0, q4_0, ... as llama-server's -ctk / -ctv); a quantized V cache needs flash
    attention (``flash_attn=None`` then turns it on).  One lock per context serializes every
    call into it; creation releases the GIL.
    """
    cdef llama.llama_context * _ctx
    cdef readonly Model model
    cdef const llama.llama_vocab * _vocab
    cdef int32_t _n_vocab
    cdef PyThread_type_lock _lock
    cdef AbortState _abort
    cdef uint64_t _epoch          # bumped by every gen_begin: older states become stale
    # per sequence id: the sampler chain attached for backend sampling (sampler_impl="backend"),
    # owned by the context from llama_set_sampler until it is detached (llama.cpp keeps a pointer)
    cdef vector[llama.llama_sampler *] _attached
    cdef readonly bint kv_unified
    # saved state loaded into sequence 0 (load_state / load_seq_state / set_seq_state): its
    # tokens, which the next gen_begin on a prompt they begin does not prefill again, while
    # nothing else took the context over since (epoch)
    cdef object _resume
    cdef uint64_t _resume_epoch
    cdef readonly str type_k          # KV cache element types ("f16", "q8_0", ...)
    cdef readonly str type_v
    cdef readonly bint deterministic  # batch-invariant kernels (docs/determinism.md)
    cdef readonly bint embeddings     # an embedding context (llamagen.embed): no generation
    # pooled embeddings from the final hidden states, skipping the lm_head (csrc/lg_embed.h):
    # 0 not tried yet, 1 checked equal to llama.cpp's pooling on this context's first decode, -1 off
    cdef lgembd.Tap _tap
    cdef public int _tap_state       # (public: tests force the llama.cpp path with -1)
    # held for a whole call (generate, generate_batch, score, embed) so that another thread's
    # call waits instead of taking the context over between steps; a new stream (gen_begin,
    # BatchGenerator) takes it only while it starts.  Re-entrant: a thread may nest calls.
    cdef object _owner
    # LoRA (_adapters.pxi): the default set (set_adapters), the set llama.cpp applies now, and
    # the set a loaded state's cells are taken to have been computed with
    cdef tuple _lora_default
    cdef tuple _lora_applied
    cdef tuple _resume_lora
    cdef object _cvec                # (ControlVector, layer_start, layer_end) applied, or None
    cdef object _spec_memory         # {drafter: _SpecMemory}: what its last stream learned
    cdef object _batch_curve         # _SpecMemory: batch step costs (_batch_curve_memory)
    cdef object __weakref__

    def __cinit__(self):
        self._lora_default = ()
        self._lora_applied = ()
        self._resume_lora = ()
        self._cvec = None
        self._ctx = NULL
        self._lock = PyThread_allocate_lock()
        if self._lock == NULL:
            raise MemoryError()
        memset(&self._abort, 0, sizeof(AbortState))
        memset(&self._tap, 0, sizeof(lgembd.Tap))
        self._tap_state = 0
        self._epoch = 0
        self._owner = _threading.RLock()

    def __init__(self, Model model not None, *, n_ctx=2048, n_batch=512, n_ubatch=512,
                 n_seq_max=1, n_threads=None, n_threads_batch=None, flash_attn=None,
                 kv_unified=None, bint offload_kqv=True, bint swa_full=True,
                 bint embeddings=False, pooling=None, bint deterministic=False,
                 type_k="f16", type_v="f16"):
        cdef llama.llama_context_params params = llama.llama_context_default_params()
        cdef llama.llama_context * c
        if self._ctx != NULL:
            raise LlamaError("Context is already initialised")
        model._check()
        if model.vocab_only:
            raise ContextError("the model was loaded with vocab_only=True (no weights): it can "
                               "tokenize, but a Context needs the full model")
        n_ctx = _check_int("n_ctx", n_ctx, 0, 1 << 24, "0 (the model's training context) or more")
        n_batch = _check_int("n_batch", n_batch, 1, 1 << 20, "at least 1")
        n_ubatch = _check_int("n_ubatch", n_ubatch, 1, 1 << 20, "at least 1")
        max_seq = llama.llama_max_parallel_sequences()
        n_seq_max = _check_int("n_seq_max", n_seq_max, 1, max_seq, f"between 1 and {max_seq}")
        if n_threads is None:
            n_threads = _physical_cores()
        n_threads = _check_int("n_threads", n_threads, 1, 4096, "at least 1 (or None)")
        if n_threads_batch is None:
            n_threads_batch = n_threads
        n_threads_batch = _check_int("n_threads_batch", n_threads_batch, 1, 4096, "at least 1 (or None)")
        if n_ctx and n_ctx < n_seq_max:
            raise ValueError(f"n_ctx ({n_ctx}) must be at least n_seq_max ({n_seq_max})")
        if kv_unified is None:
            kv_unified = embeddings
        elif kv_unified is not True and kv_unified is not False:
            raise TypeError(f"kv_unified must be None, True or False, got {kv_unified!r}")
        if embeddings and not kv_unified and n_seq_max > 1:
            # (several sequences in one batch over per-sequence KV streams mix up at this commit)
            raise ValueError("an embedding context with n_seq_max > 1 needs kv_unified=True "
                             "(the default for embeddings)")
        if embeddings and n_batch % n_seq_max:
            # llama.cpp reserves the pooling graph with n_batch / n_seq_max tokens per sequence
            # and aborts the process when that does not divide (GGML_ASSERT in build_pooling)
            raise ValueError(f"an embedding context needs n_batch ({n_batch}) to be a multiple of "
                             f"n_seq_max ({n_seq_max})")
        if pooling is not None:
            if not embeddings:
                raise ValueError("pooling applies to embedding contexts (embeddings=True)")
            if pooling not in _POOLING:
                raise ValueError(f"pooling must be None (the model's own) or one of "
                                 f"{', '.join(map(repr, _POOLING))}, got {pooling!r}")
            if pooling == "rank" and not (
                    llama.llama_model_cls_label(model._model, 0) != NULL or
                    model.metadata.get(f"{model.architecture}.pooling_type") == "4"):
                # llama.cpp would pool anyway and report a hidden-state value as the "score"
                raise ValueError("pooling='rank' needs a reranker: this model's GGUF has neither "
                                 "classifier labels nor rank pooling")
            params.pooling_type = _POOLING[pooling]
        if embeddings:
            # a text's vector is pooled within one decode: llama.cpp must not split the batch
            n_ubatch = n_batch
        params.embeddings = embeddings
        self.embeddings = embeddings
        if embeddings:
            params.cb_eval = lgembd.tap_cb
            params.cb_eval_user_data = &self._tap
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_ubatch, n_batch)
        params.n_seq_max = n_seq_max
        params.n_threads = n_threads
        params.n_threads_batch = n_threads_batch
        if flash_attn is None:
            params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_AUTO
        elif flash_attn is True or flash_attn is False:
            params.flash_attn_type = (llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                      else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        else:
            raise ValueError(f"flash_attn must be None (auto), True or False, got {flash_attn!r}")
        if deterministic:
            # the batch-invariant attention is ggml-cpu's flash-attention kernel (patch 0002)
            if flash_attn is False:
                raise ValueError("deterministic=True needs flash attention (flash_attn=None or True)")
            if model.n_gpu_layers != 0 and llama.llama_supports_gpu_offload():
                raise ContextError("deterministic=True runs on the CPU backend only: load the model "
                                   "with n_gpu_layers=0 (see docs/determinism.md)")
            params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_ENABLED
            params.op_offload = False      # no big CPU-weight matmul sent to a GPU for large batches
        params.kv_unified = kv_unified
        self.kv_unified = kv_unified
        params.type_k = _kv_type("type_k", type_k)
        params.type_v = _kv_type("type_v", type_v)
        if ggml.ggml_is_quantized(params.type_v):
            # llama.cpp refuses a quantized V cache without flash attention (its plain attention
            # path multiplies by V^T, which it cannot transpose when quantized)
            if flash_attn is False:
                raise invalid(ValueError, "type_v", f"type_v={type_v}: a quantized V cache needs "
                              "flash attention (flash_attn=None or True)")
            params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self.type_k, self.type_v = type_k, type_v
        params.offload_kqv = offload_kqv
        params.swa_full = swa_full
        params.no_perf = True
        params.abort_callback = _abort_callback
        params.abort_callback_data = &self._abort
        _refresh_log_levels()
        _take_errors()
        model._pin()                    # a close() meanwhile waits for this context
        with nogil:
            c = llama.llama_init_from_model(model._model, params)
        if c == NULL:
            model._release_user()
            raise ContextError(f"could not create the context: {_take_errors() or 'out of memory?'}")
        self._ctx = c
        self.deterministic = deterministic
        if deterministic:
            lgctx.set_batch_invariant(c, True)
        self._attached.assign(llama.llama_n_seq_max(c), NULL)
        self.model = model
        self._vocab = model._vocab
        self._n_vocab = model.n_vocab

    def __dealloc__(self):
        if self._ctx != NULL:
            llama.llama_free(self._ctx)
            self._ctx = NULL
            if self.model is not None:
                self.model._release_user()
        self._detach_all()
        if self._lock != NULL:
            PyThread_free_lock(self._lock)
            self._lock = NULL

    # -- locking -----------------------------------------------------------------------------

    cdef int _acquire(self) except -1:
        """Take this context's lock (waiting without the GIL) and check that it is open."""
        if not PyThread_acquire_lock(self._lock, NOWAIT_LOCK):
            with nogil:
                PyThread_acquire_lock(self._lock, WAIT_LOCK)
        if self._ctx == NULL:
            PyThread_release_lock(self._lock)
            raise LlamaError("the context is closed")
        return 0

    cdef void _acquire_any(self) noexcept:
        """Take the lock even when the context is closed (to free what a generation owns)."""
        if not PyThread_acquire_lock(self._lock, NOWAIT_LOCK):
            with nogil:
                PyThread_acquire_lock(self._lock, WAIT_LOCK)

    cdef inline void _release(self) noexcept:
        PyThread_release_lock(self._lock)

    # -- who decodes: every generation (stream, batch, replay) takes the context over ----------

    cdef void _take_over(self) noexcept nogil:
        """A new user of the context (lock held): earlier states and batches become stale and
        the sampler chains they attached stop sampling."""
        self._epoch += 1
        self._detach_all()

    cdef bint _attach(self, int32_t seq, llama.llama_sampler * chain) noexcept nogil:
        """Backend sampling (lock held): llama_decode samples sequence ``seq`` with ``chain`` in
        its own graph from now on.  On success the context owns ``chain`` (freed when detached);
        False when llama.cpp cannot offload it (the caller keeps it and samples on the host)."""
        self._detach(seq)
        if not llama.llama_set_sampler(self._ctx, seq, chain):
            return False
        self._attached[seq] = chain
        return True

    cdef void _detach(self, int32_t seq) noexcept nogil:
        """Stop backend sampling for ``seq`` and free its chain (lock held).  No-op when none;
        after llama_free (``_ctx`` NULL) it only frees the chain."""
        cdef llama.llama_sampler * chain
        if seq < 0 or <size_t> seq >= self._attached.size() or self._attached[seq] == NULL:
            return
        chain = self._attached[seq]
        self._attached[seq] = NULL
        if self._ctx != NULL:
            llama.llama_set_sampler(self._ctx, seq, NULL)
        llama.llama_sampler_free(chain)

    cdef void _detach_all(self) noexcept nogil:
        cdef size_t i
        for i in range(self._attached.size()):
            self._detach(<int32_t> i)

    cdef int _check(self) except -1:
        if self._ctx == NULL:
            raise LlamaError("the context is closed")
        return 0

    def close(self):
        """Free the context (and let its Model go).  Idempotent; waits for a running step."""
        if self._ctx == NULL:
            return
        self._acquire()
        try:
            llama.llama_free(self._ctx)
            self._ctx = NULL
            self._detach_all()             # (only frees: the llama context is gone)
            self._epoch += 1
            self.model._release_user()
        finally:
            self._release()

    @property
    def closed(self):
        return self._ctx == NULL

    def _exclusive(self):
        """Internal: the lock a whole call holds (``with ctx._exclusive(): ...``)."""
        return self._owner

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        if self._ctx == NULL:
            return "<llamagen.Context closed>"
        return f"<llamagen.Context n_ctx={self.n_ctx} n_batch={self.n_batch} n_seq_max={self.n_seq_max}>"

    # -- values llama.cpp actually uses ------------------------------------------------------

    @property
    def n_ctx(self):
        self._check()
        return llama.llama_n_ctx(self._ctx)

    # -- saved state -----------------------------------------------------------------------------

    cdef int _check_seq(self, seq_id) except -1:
        n = llama.llama_n_seq_max(self._ctx)
        if isinstance(seq_id, bool) or not isinstance(seq_id, int) or not 0 <= seq_id < n:
            raise invalid(ValueError, "seq_id", f"seq_id must be an int from 0 to {n - 1}, got "
                          f"{seq_id!r}")
        return 0

    cdef vector[llama.llama_token] _state_tokens(self, tokens) except *:
        cdef vector[llama.llama_token] toks
        if tokens is None:
            return toks
        _fill_tokens(toks, list(tokens), self._n_vocab)
        if <int64_t> toks.size() > llama.llama_n_ctx(self._ctx):
            raise invalid(ValueError, "tokens", f"{toks.size()} tokens are more than the context "
                          f"holds ({llama.llama_n_ctx(self._ctx)})")
        return toks

    cdef void _resume_with(self, list tokens) noexcept:
        # (lock held) the loaded state replaced what earlier states relied on
        self._take_over()
        self._resume = tokens
        self._resume_epoch = self._epoch
        self._resume_lora = self._lora_default

    # -- adapters (_adapters.pxi) --------------------------------------------------------------

    def set_adapters(self, adapters=None):
        """Make ``adapters`` ({LoraAdapter: scale}, pairs, one LoraAdapter (scale 1), or None /
        {} for none) the LoRA set of every later request that does not name its own (``lora=``
        in SamplingParams).  Requests already running keep theirs.  No reload: llama.cpp switches
        sets between decodes."""
        key = _canonical_lora(adapters) if adapters is not None else ()
        key = _lora_key(self, key)
        self._acquire()
        try:
            self._lora_default = key
        finally:
            self._release()

    @property
    def adapters(self):
        """The default LoRA set ({LoraAdapter: scale}; see set_adapters)."""
        return dict(self._lora_default)

    cdef int _use_lora(self, tuple key) except -1:
        """(lock held) Apply the adapter set ``key`` for the next decodes, if it is not already."""
        cdef vector[llama.llama_adapter_lora *] ptrs
        cdef vector[float] scales
        if key == self._lora_applied:
            return 0
        for a, scale in key:
            if (<LoraAdapter> a)._ptr == NULL or self.model._model == NULL:
                raise LlamaError("a LoRA adapter of this request is no longer loaded")
            ptrs.push_back((<LoraAdapter> a)._ptr)
            scales.push_back(scale)
        if llama.llama_set_adapters_lora(self._ctx, ptrs.data(), ptrs.size(), scales.data()) != 0:
            raise ContextError("llama.cpp refused the LoRA adapter set")
        self._lora_applied = key
        return 0

    def set_control_vector(self, cvec=None, *, layer_start=None, layer_end=None):
        """Apply a ControlVector to layers ``layer_start``..``layer_end`` (inclusive; default 1 to
        the model's last), or remove it (None).  It changes every later decode of this context,
        so running generations and batches become stale (their cells were computed without it)."""
        cdef ControlVector cv
        cdef int32_t n_layer, lo, hi, rc
        self._check()
        n_layer = llama.llama_model_n_layer(self.model._model)
        lo = 1 if layer_start is None else _check_int("layer_start", layer_start, 1, n_layer,
                                                       f"a layer from 1 to {n_layer}")
        hi = n_layer if layer_end is None else _check_int("layer_end", layer_end, lo, n_layer,
                                                           f"a layer from {lo} to {n_layer}")
        if cvec is not None:
            cv = <ControlVector?> cvec
            if cv.n_embd != llama.llama_model_n_embd(self.model._model):
                raise invalid(ValueError, "cvec", f"the control vector has n_embd {cv.n_embd}, "
                              f"the model {llama.llama_model_n_embd(self.model._model)}")
        self._acquire()
        try:
            _take_errors()
            if cvec is None:
                rc = llama.llama_set_adapter_cvec(self._ctx, NULL, 0, 0, -1, -1)
            else:
                rc = llama.llama_set_adapter_cvec(self._ctx, cv._data.data(), cv._data.size(),
                                                  cv.n_embd, lo, hi)
            if rc != 0:
                raise ContextError("llama.cpp refused the control vector: " + (_take_errors() or "?"))
            self._take_over()
            self._resume = None
            self._cvec = None if cvec is None else (cvec, lo, hi)
        finally:
            self._release()

    @property
    def control_vector(self):
        """(ControlVector, layer_start, layer_end) applied, or None."""
        return self._cvec

    def save_state(self, path, tokens=None):
        """Write the whole context state (every sequence's KV cells) and ``tokens`` (the token
        ids those cells hold, for whoever loads it) to ``path`` (llama_state_save_file)."""
        cdef vector[llama.llama_token] toks
        cdef bytes pb = _os.fsencode(path)
        cdef const char * p = pb
        cdef bint ok
        self._acquire()
        try:
            toks = self._state_tokens(tokens)
            with nogil:
                ok = llama.llama_state_save_file(self._ctx, p, toks.data(), toks.size())
        finally:
            self._release()
        if not ok:
            raise LlamaError(f"could not save the state to {path!r}: {_take_errors() or 'I/O error'}")

    def load_state(self, path):
        """Read a state ``save_state`` wrote (from a context of the same model and shape) and
        return its tokens.  Earlier generations on this context become stale; a ``gen_begin``
        whose prompt begins with sequence 0's tokens prefills only the rest.  LlamaError for a
        file that is not such a state (nothing is left half-loaded: the cache is then empty)."""
        cdef vector[llama.llama_token] toks
        cdef bytes pb = _os.fsencode(path)
        cdef const char * p = pb
        cdef size_t n = 0
        cdef bint ok
        if not _os.path.isfile(path):
            raise FileNotFoundError(f"no state file {path!r}")
        self._acquire()
        try:
            toks.resize(llama.llama_n_ctx(self._ctx))
            _take_errors()
            with nogil:
                ok = llama.llama_state_load_file(self._ctx, p, toks.data(), toks.size(), &n)
            if not ok:
                llama.llama_memory_clear(llama.llama_get_memory(self._ctx), True)
                self._take_over()
                raise LlamaError(f"could not load the state in {path!r} (another model or context "
                                 f"shape, or not a state file): {_take_errors() or 'rejected'}")
            tokens = [toks[i] for i in range(n)]
            self._resume_with(tokens)
            return tokens
        finally:
            self._release()

    def seq_state(self, seq_id=0):
        """Sequence ``seq_id``'s state (its KV cells) as bytes (llama_state_seq_get_data)."""
        cdef size_t size, got
        cdef int32_t seq
        cdef bytearray buf
        cdef unsigned char[::1] view
        self._acquire()
        try:
            self._check_seq(seq_id)
            seq = seq_id
            size = llama.llama_state_seq_get_size(self._ctx, seq)
            buf = bytearray(size)
            if size:
                view = buf
                with nogil:
                    got = llama.llama_state_seq_get_data(self._ctx, &view[0], size, seq)
                if got == 0:
                    raise LlamaError(f"could not read sequence {seq_id}'s state")
                del buf[got:]
            return bytes(buf)
        finally:
            self._release()

    def set_seq_state(self, data, seq_id=0, tokens=None):
        """Put a state ``seq_state`` returned into sequence ``seq_id`` (its cells are replaced).
        ``tokens``: the token ids it holds, so that a later gen_begin (sequence 0) can continue
        from it.  LlamaError when llama.cpp refuses the data (another model or shape)."""
        cdef const unsigned char[::1] view
        cdef size_t got
        cdef int32_t seq
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
            raise invalid(TypeError, "data", "data must be the non-empty bytes seq_state returned")
        view = bytes(data)
        self._acquire()
        try:
            self._check_seq(seq_id)
            seq = seq_id
            toks = self._state_tokens(tokens)
            _take_errors()
            with nogil:
                llama.llama_memory_seq_rm(llama.llama_get_memory(self._ctx), seq, -1, -1)
                got = llama.llama_state_seq_set_data(self._ctx, &view[0], view.shape[0], seq)
            if got == 0:
                llama.llama_memory_seq_rm(llama.llama_get_memory(self._ctx), seq_id, -1, -1)
                self._take_over()
                raise LlamaError(f"could not restore sequence {seq_id}'s state (another model or "
                                 f"context shape?): {_take_errors() or 'rejected'}")
            self._resume_with(list(toks) if seq_id == 0 and tokens is not None else None)
        finally:
            self._release()

    def save_seq_state(self, path, seq_id=0, tokens=None):
        """Write sequence ``seq_id``'s state and ``tokens`` to ``path``; returns the bytes
        written (llama_state_seq_save_file)."""
        cdef vector[llama.llama_token] toks
        cdef bytes pb = _os.fsencode(path)
        cdef const char * p = pb
        cdef int32_t seq
        cdef size_t n
        self._acquire()
        try:
            self._check_seq(seq_id)
            seq = seq_id
            toks = self._state_tokens(tokens)
            with nogil:
                n = llama.llama_state_seq_save_file(self._ctx, p, seq, toks.data(), toks.size())
        finally:
            self._release()
        if n == 0:
            raise LlamaError(f"could not save sequence {seq_id}'s state to {path!r}")
        return n

    def load_seq_state(self, path, seq_id=0):
        """Read a file ``save_seq_state`` wrote into sequence ``seq_id`` (its cells replaced);
        returns its tokens.  Loaded into sequence 0, a gen_begin whose prompt begins with them
        prefills only the rest."""
        cdef vector[llama.llama_token] toks
        cdef bytes pb = _os.fsencode(path)
        cdef const char * p = pb
        cdef size_t n = 0, got
        cdef int32_t seq
        if not _os.path.isfile(path):
            raise FileNotFoundError(f"no state file {path!r}")
        self._acquire()
        try:
            self._check_seq(seq_id)
            seq = seq_id
            toks.resize(llama.llama_n_ctx(self._ctx))
            _take_errors()
            with nogil:
                llama.llama_memory_seq_rm(llama.llama_get_memory(self._ctx), seq, -1, -1)
                got = llama.llama_state_seq_load_file(self._ctx, p, seq, toks.data(), toks.size(), &n)
            if got == 0:
                llama.llama_memory_seq_rm(llama.llama_get_memory(self._ctx), seq, -1, -1)
                self._take_over()
                raise LlamaError(f"could not load the sequence state in {path!r} (another model or "
                                 f"context shape, or not a state file): {_take_errors() or 'rejected'}")
            tokens = [toks[i] for i in range(n)]
            self._resume_with(tokens if seq_id == 0 else None)
            return tokens
        finally:
            self._release()

    def seq_state_size(self, seq_id=0):
        """Bytes of sequence ``seq_id``'s state (its KV cells, as llama_state_seq_get_size
        counts them): with the KV cache's element types, what a cached token costs."""
        self._acquire()
        try:
            self._check_seq(seq_id)
            return llama.llama_state_seq_get_size(self._ctx, <int32_t> seq_id)
        finally:
            self._release()

    @property
    def n_ctx_seq(self):
        """Context length available to one sequence (n_ctx / n_seq_max unless kv_unified)."""
        self._check()
        return llama.llama_n_ctx_seq(self._ctx)

    @property
    def n_batch(self):
        self._check()
        return llama.llama_n_batch(self._ctx)

    @property
    def n_ubatch(self):
        self._check()
        return llama.llama_n_ubatch(self._ctx)

    @property
    def n_seq_max(self):
        self._check()
        return llama.llama_n_seq_max(self._ctx)

    @property
    def pooling(self):
        """How an embedding context pools token vectors ("mean", "cls", "last", "none", "rank");
        None for a generation context."""
        self._check()
        if not self.embeddings:
            return None
        return _POOLING_NAMES.get(llama.llama_get_pooling_type(self._ctx), "none")

    cdef int _check_generative(self) except -1:
        self._check()
        if self.embeddings:
            raise ContextError("this context was made for embeddings (embeddings=True): generate "
                               "and score with a Context made without it")
        return 0

    @property
    def n_threads(self):
        self._check()
        return llama.llama_n_threads(self._ctx)

    @property
    def n_threads_batch(self):
        self._check()
        return llama.llama_n_threads_batch(self._ctx)

    def set_n_threads(self, n_threads, n_threads_batch=None):
        n_threads = _check_int("n_threads", n_threads, 1, 4096, "between 1 and 4096")
        nb = n_threads if n_threads_batch is None else n_threads_batch
        nb = _check_int("n_threads_batch", nb, 1, 4096, "between 1 and 4096")
        self._acquire()
        try:
            llama.llama_set_n_threads(self._ctx, n_threads, nb)
        finally:
            self._release()

    def clear(self):
        """Empty the KV cache (every sequence).  Any running generation becomes stale."""
        self._acquire()
        try:
            llama.llama_memory_clear(llama.llama_get_memory(self._ctx), True)
            self._take_over()
        finally:
            self._release()


def _check_int(str name, value, long long lo, long long hi, str expect):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo or value > hi:
        raise ValueError(f"{name} must be {expect}, got {value}")
    return value


cdef tuple _lora_key(Context ctx, lora):
    """The adapter set a request runs with: the context's default for None, else ``lora`` (a
    canonical tuple from SamplingParams), each adapter checked against the context's model."""
    if lora is None:
        return ctx._lora_default
    for a, _ in lora:
        (<LoraAdapter?> a)._check_for(ctx.model)
    return lora
