# BatchGenerator: continuous batching of many sequences over one context.  Included by _core.pyx.
#
# Each step puts one token for every generating sequence into one llama_batch, fills the rest of
# the batch (up to n_batch) with prompt tokens of sequences still being prefilled, decodes it once
# without the GIL, then samples every sequence that has an output row -- in parallel (OpenMP) when
# the vocabulary is large enough for that to pay.  A finished sequence frees its KV cells and its
# slot, which the next waiting prompt takes.  With ``prompt_cache`` a finished sequence's cells stay
# in its slot (recorded as the slot's token list) until the slot is needed: a new prompt goes to
# the free slot holding the longest common prefix and only the rest is prefilled (multi-turn chat
# pays for the new turn only).  Idle caches are dropped first when the KV cache runs full, and the
# least recently used go beyond a budget of cells: on a unified cache every decode attends over
# the whole used range, so idle cells are not free (4.7k idle cells made a 451-token prefill of
# gemma3 3x slower).

cimport cython
from cython.parallel cimport prange, threadid

from collections import deque as _deque

from llamagen.sampling import resolve as _resolve_params

_MAIN_THREAD = _threading.main_thread().ident


cdef inline int64_t _cells_held(SeqCore * c) noexcept nogil:
    """KV cells a live sequence holds: its prompt fed so far, or its prompt and tokens."""
    return c.n_fed if c.n_fed < <int32_t> c.prompt.size() else c.n_past

# below this vocabulary size sampling a sequence costs microseconds: threads would cost more
cdef int32_t _PARALLEL_MIN_VOCAB = 16384


@cython.no_gc_clear
cdef class BatchGenerator:
    """Continuous batching over one Context: ``add`` prompts (any time), iterate to get
    ``(seq_id, chunk)`` pairs; one decode step serves every live sequence.

    ``BatchGenerator(ctx, *, n_parallel=None, params=None, **sampling)``: ``n_parallel`` sequences
    run at once (default and maximum: ``ctx.n_seq_max``); more prompts wait for a free slot.
    ``sampling`` / ``params`` are the defaults; ``add(prompt, **overrides)`` changes them for one
    sequence.  Creating a BatchGenerator takes the context over: single-stream states on it become
    stale, and a later gen_begin on the context makes this generator stale.
    """
    cdef Context _context
    cdef object _defaults
    cdef llama.llama_batch _batch
    cdef bint _has_batch
    cdef int32_t _n_batch
    cdef int32_t _n_slots
    cdef int32_t _n_ctx_seq
    cdef int _n_threads
    cdef list _slots                  # slot -> _Seq or None
    cdef dict _seqs                   # id -> _Seq
    cdef object _waiting              # ids waiting for a slot
    cdef object _ready                # (id, chunk) produced, not yet handed out
    cdef int64_t _next_id
    cdef uint64_t _epoch
    cdef vector[SeqCore *] _active        # the sequences this decode serves (one LoRA set)
    cdef vector[SeqCore *] _live          # every sequence holding a slot
    cdef dict _lora_ids                   # LoRA set -> its number (SeqCore.lora_id)
    cdef int32_t _next_lora_id
    cdef vector[int32_t] _slot_lora       # idle slot -> the LoRA set its cached cells were made with
    cdef readonly int64_t n_lora_switches # decodes that switched the context's LoRA set
    cdef RamCache * _ram                  # idle caches evicted to host RAM (_ramcache.pxi)
    cdef vector[int32_t] _sampled
    cdef vector[vector[llama.llama_token_data]] _cands
    cdef bint _add_special
    cdef bint _parse_special
    cdef readonly int64_t n_steps
    cdef readonly int64_t n_decoded_tokens
    cdef readonly int64_t n_shared_tokens     # prompt tokens copied from another sequence's cache
    cdef int32_t _min_share
    cdef bint _keep_cache
    cdef int64_t _cache_budget            # most cells idle caches may hold (the newest is kept)
    cdef vector[vector[llama.llama_token]] _slot_cache   # idle slot -> tokens its cells hold
    cdef vector[int64_t] _slot_stamp                      # when the slot was last released (LRU)
    cdef readonly int64_t n_cache_queries   # prompt tokens looked up in idle slots' caches
    cdef readonly int64_t n_cache_hits      # ... of those, found there (not prefilled)
    cdef readonly int64_t n_compactions     # times idle caches were packed (_pack_idle)
    # steps that decoded nothing while sequences held slots: a watchdog (0 in a healthy batch;
    # it counted 150k in 30 s when prompts that could not all fit waited on each other)
    cdef readonly int64_t n_stalled_steps
    # time spent sampling (chains, grammars, logprobs) over all steps, and the tokens sampled
    cdef readonly int64_t sample_us
    cdef readonly int64_t n_sampled
    # speculative decoding: one drafter per kind of Speculative (its key), shared by the slots
    cdef dict _drafter_index              # Speculative.key -> index in _drafters
    cdef vector[lgspec.Drafter *] _drafters
    cdef bint _no_drafts                  # this step's retry decodes without drafts
    cdef BatchSpec _spec                  # step time by rows (token-only steps), the drafts
    # per drafter: its latest verified sequence's acceptance, in the context's memory of that
    # drafter (_spec_memory: the next batch or stream on the context starts from it)
    cdef vector[SpecMemory *] _accepted
    cdef list _accepted_refs              # (owners of _accepted's pointers)
    cdef _SpecMemory _curve_mem           # (owner of _spec.curve: the context's, _batch_curve_memory)
    cdef int32_t _timed_rows              # this step's rows, when the cost model times it (else 0)
    cdef int64_t _timed_us                # ... its decode time; the sampling time is added
    cdef readonly int64_t n_drafted       # drafted tokens verified, over all sequences
    cdef readonly int64_t n_accepted      # ... of those accepted
    cdef int32_t _plp_rows                # most prompt-logprob rows of one sequence per decode
    cdef vector[_PromptRow] _prows        # this step's prompt-logprob rows

    def __cinit__(self):
        self._has_batch = False
        self._spec.curve = NULL
        self._ram = new RamCache()

    def __init__(self, Context ctx not None, *, n_parallel=None, params=None,
                 bint add_special=True, bint parse_special=True, share_prefix=16,
                 prompt_cache=False, cache_ram=0, **sampling):
        cdef int i
        ctx._check_generative()
        ram = _check_int("cache_ram", cache_ram, -1, 1 << 62,
                         "bytes of host RAM for evicted prompt caches (0: off, -1: no limit)")
        with ctx._owner:        # (waits for another thread's whole generate() to finish)
            self._init(ctx, n_parallel, params, add_special, parse_special, share_prefix,
                       prompt_cache, sampling)
        if ram != 0 and not self._keep_cache:
            raise invalid(ValueError, "cache_ram", "cache_ram keeps evicted prompt caches: it needs "
                          "prompt_cache")
        self._ram.cap = (1 << 62) if ram < 0 else ram

    cdef _init(self, Context ctx, n_parallel, params, bint add_special, bint parse_special,
               share_prefix, prompt_cache, dict sampling):
        cdef int i
        cdef int64_t budget = -1
        # Python work first (another thread may run meanwhile), then every C call on the
        # context under its lock: a close() from another thread waits, or we raise
        defaults = _resolve_params(params, (), sampling)
        if share_prefix is None or share_prefix is False:
            share_prefix = 0
        min_share = _check_int("share_prefix", share_prefix, 0, 1 << 30,
                               "0/None (off) or the shortest common prefix worth sharing")
        if prompt_cache is not True and prompt_cache is not False and prompt_cache is not None:
            budget = _check_int("prompt_cache", prompt_cache, 0, 1 << 40,
                                "True, False or the most KV cells idle caches may hold")
        ctx._acquire()
        try:
            max_seq = llama.llama_n_seq_max(ctx._ctx)
            if n_parallel is None:
                n_parallel = max_seq
            n_parallel = _check_int("n_parallel", n_parallel, 1, max_seq,
                                    f"between 1 and the context's n_seq_max ({max_seq})")
            self._context = ctx
            self._defaults = defaults
            self._n_slots = n_parallel
            self._min_share = min_share
            self._n_batch = llama.llama_n_batch(ctx._ctx)
            self._curve_mem = _batch_curve_memory(ctx, self._n_batch)
            self._spec.curve = &self._curve_mem.m.curve
            self._accepted_refs = []
            self._n_ctx_seq = llama.llama_n_ctx_seq(ctx._ctx)
            self._n_threads = max(1, llama.llama_n_threads(ctx._ctx))
            self._plp_rows = <int32_t> max(1, min(<int64_t> self._n_batch,
                                                  _SCORE_LOGITS_BUDGET // max(1, ctx._n_vocab)))
            self._slots = [None] * n_parallel
            if prompt_cache is True:
                # about one slot's share of the cache
                self._cache_budget = max(2 * self._n_batch, llama.llama_n_ctx(ctx._ctx) // n_parallel)
            elif budget < 0:
                self._cache_budget = 0
            else:
                self._cache_budget = budget
            self._keep_cache = self._cache_budget > 0
            self._slot_cache.resize(n_parallel)
            self._slot_stamp.assign(n_parallel, 0)
            self._slot_lora.assign(n_parallel, -1)
            self._lora_ids = {}
            self._next_lora_id = 0
            self._seqs = {}
            self._waiting = _deque()
            self._ready = _deque()
            self._next_id = 0
            self._add_special = add_special
            self._parse_special = parse_special
            self._batch = llama.llama_batch_init(self._n_batch, 0, 1)
            self._has_batch = True
            self._drafter_index = {}
            self._cands.resize(self._n_threads)
            ctx._take_over()
            self._epoch = ctx._epoch
            llama.llama_memory_clear(llama.llama_get_memory(ctx._ctx), True)
        finally:
            ctx._release()

    def __dealloc__(self):
        cdef size_t i
        if self._has_batch:
            llama.llama_batch_free(self._batch)
            self._has_batch = False
        for i in range(self._drafters.size()):
            lgspec.destroy(self._drafters[i])
        self._drafters.clear()
        self._accepted.clear()
        del self._ram
        self._ram = NULL

    # -- adding and inspecting sequences -----------------------------------------------------

    def add(self, prompt, params=None, **overrides):
        """Queue a prompt; returns its sequence id.  Allowed while the batch is running.

        Raises ValueError for a prompt that does not fit one sequence's context (others go on).
        """
        cdef vector[llama.llama_token] toks
        cdef _Seq q
        self._initialised()
        p = _resolve_params(params if params is not None else self._defaults, (), overrides)
        self._context._check()
        toks = _prompt_tokens(self._context, prompt, self._add_special, self._parse_special,
                              self._n_ctx_seq)
        # (reading the prompt ran user code, which may have closed the context: check again
        # under the lock, held while the samplers are built from its vocabulary)
        lora = _lora_key(self._context, p.lora)
        self._context._acquire()
        try:
            q = _new_seq(self._context, p, <int32_t> toks.size(), self._n_ctx_seq)
        finally:
            self._context._release()
        _reasoning_prime(q.c, toks, p)
        q.lora = lora
        q.c.lora_id = self._lora_id(lora)
        q.c.prompt = toks
        q.c.n_past = 0
        q.c.uid = self._next_id
        self._next_id += 1
        self._seqs[q.c.uid] = q
        self._waiting.append(q.c.uid)
        return q.c.uid

    cdef int32_t _lora_id(self, tuple key) except -1:
        """The number of LoRA set ``key`` in this batch (numbers are never reused: forgetting
        old sets only makes their idle caches miss)."""
        i = self._lora_ids.get(key)
        if i is None:
            if len(self._lora_ids) >= 4096:
                self._lora_ids.clear()
            i = self._lora_ids[key] = self._next_lora_id
            self._next_lora_id += 1
        return i

    cdef int _initialised(self) except -1:
        if self._context is None:
            raise LlamaError("this BatchGenerator was not initialised: BatchGenerator(ctx, ...)")
        return 0

    cdef _Seq _get(self, seq_id):
        self._initialised()
        try:
            q = self._seqs.get(seq_id)
        except TypeError:               # (unhashable)
            q = None
        if q is None:
            raise UnknownSequenceError(f"seq_id: no sequence {seq_id!r} in this batch",
                                       field="seq_id")
        return q

    def finish_reason(self, seq_id):
        """"stop", "length", "cancelled", "error" (its grammar allowed no token: that step
        raised GrammarError), or None while the sequence runs or waits."""
        cdef _Seq q = self._get(seq_id)
        if q.c.finish == FINISH_NONE and q.c.slot < 0 and q.c.uid not in self._waiting:
            return "cancelled"
        return _FINISH_NAMES[q.c.finish]

    def tokens(self, seq_id, Py_ssize_t start=0):
        """Token ids generated so far for ``seq_id`` (from index ``start``)."""
        cdef _Seq q = self._get(seq_id)
        cdef Py_ssize_t i, n = <Py_ssize_t> q.c.tokens.size()
        return [q.c.tokens[i] for i in range(max(0, start), n)]

    def seed(self, seq_id):
        return self._get(seq_id).seed

    def logprobs(self, seq_id, Py_ssize_t start=0):
        """TokenLogprobs of ``seq_id``'s generated tokens (from index ``start``), or None when its
        parameters have ``logprobs=None``."""
        cdef _Seq q = self._get(seq_id)
        if q.c.n_logprobs < 0:
            return None
        return _seq_logprobs(self._context.model, q.c, start, -1)

    def prompt_logprobs(self, seq_id):
        """TokenLogprobs of ``seq_id``'s prompt tokens once its prompt is in (the first has no
        logprob: None), or None when its parameters have ``prompt_logprobs=None``."""
        cdef _Seq q = self._get(seq_id)
        if q.c.n_prompt_lp < 0:
            return None
        if q.c.n_fed < <int32_t> q.c.prompt.size():
            return []
        return _prompt_logprobs(self._context.model, q.c)

    def n_tokens(self, seq_id):
        """How many tokens ``seq_id`` has generated (``tokens(seq_id, start)`` reads new ones)."""
        return self._get(seq_id).c.tokens.size()

    def n_prompt_tokens(self, seq_id):
        return self._get(seq_id).c.n_prompt

    def speculative_stats(self, seq_id):
        """``seq_id``'s speculative decoding: drafted and accepted tokens, acceptance_rate and
        the decodes that verified a draft (None without ``speculative`` in its parameters)."""
        return _spec_stats(self._get(seq_id).c)

    def n_cached(self, seq_id):
        """Prompt tokens of ``seq_id`` that were not prefilled: found in a slot's prompt cache or
        copied from another sequence's cells."""
        return self._get(seq_id).c.n_cached

    def stop_sequence(self, seq_id):
        """The stop string that ended ``seq_id``'s text, or None."""
        cdef _Seq q = self._get(seq_id)
        if q.c.stop_index < 0:
            return None
        return q.params.stop[q.c.stop_index]

    @property
    def kv_used(self):
        """KV cells held by this batch's slots: live sequences and idle prompt caches."""
        cdef int32_t slot
        cdef _Seq q
        cdef int64_t n = 0
        for slot in range(self._n_slots):
            q = self._slots[slot]
            n += self._slot_cache[slot].size() if q is None else _cells_held(q.c)
        return n

    def cancel(self, seq_id):
        """Stop a sequence now (waiting or running) and free its slot.  Idempotent.  Safe from
        another thread while the batch steps (it waits for the step to finish)."""
        cdef _Seq q = self._get(seq_id)
        self._context._acquire()
        try:
            try:
                self._waiting.remove(seq_id)
            except ValueError:
                pass
            if q.c.slot >= 0:
                self._release_slot(q)
            q.c.free_samplers()
        finally:
            self._context._release()

    def drop_prompt_cache(self, bint ram=False):
        """Free the cells every idle slot keeps for the prompt cache (live sequences go on; with
        a RAM tier the caches move there, unless ``ram``: then it is emptied too)."""
        self._initialised()
        self._context._acquire()
        try:
            if ram:
                self._ram.clear()
            if self._epoch == self._context._epoch:
                cap = self._ram.cap
                if ram:
                    self._ram.cap = 0
                _drop_idle_caches(self)
                self._ram.cap = cap
        finally:
            self._context._release()

    def save_slot(self, slot, path):
        """Write idle slot ``slot``'s cached cells and the tokens they hold to ``path``
        (llama_state_seq_save_file): (tokens, bytes written).  ValueError for a busy slot."""
        return _slot_save(self, slot, path)

    def restore_slot(self, slot, path):
        """Load a ``save_slot`` file into idle slot ``slot`` as its prompt cache (a later prompt
        that begins with those tokens prefills only the rest): (tokens, bytes read).
        LlamaError for a file of another model or context shape (the slot is left empty)."""
        return _slot_restore(self, slot, path)

    def erase_slot(self, slot):
        """Forget idle slot ``slot``'s prompt cache; the number of cells it held."""
        return _slot_erase(self, slot)

    def forget(self, seq_id):
        """Drop a finished sequence's bookkeeping (long-running pipelines)."""
        cdef _Seq q = self._get(seq_id)
        if q.c.finish == FINISH_NONE and (q.c.slot >= 0 or seq_id in self._waiting):
            raise ValueError(f"sequence {seq_id} is still running; cancel() it first")
        del self._seqs[seq_id]

    @property
    def n_active(self):
        """Sequences holding a slot."""
        return sum(1 for s in self._slots if s is not None)

    @property
    def n_waiting(self):
        return len(self._waiting)

    def __len__(self):
        return self.n_active + len(self._waiting)

    # -- stepping ------------------------------------------------------------------------------

    cdef _release_slot(self, _Seq q, bint keep=True):
        """Free ``q``'s slot; with the prompt cache on (and ``keep``), its cells stay there,
        recorded as the slot's token list, for a later prompt with the same prefix."""
        cdef int32_t slot = q.c.slot
        cdef SeqCore * c = q.c
        cdef int32_t n_gen
        if slot < 0:
            return
        if self._epoch == self._context._epoch:
            # (a stale batch no longer owns the context: its cells and chains were taken over)
            self._slot_cache[slot].clear()
            if keep and self._keep_cache and c.finish != FINISH_ERROR:
                if c.n_fed < <int32_t> c.prompt.size():      # cancelled during its prefill
                    self._slot_cache[slot].assign(c.prompt.begin(), c.prompt.begin() + c.n_fed)
                else:
                    self._slot_cache[slot] = c.prompt
                    n_gen = c.n_past - <int32_t> c.prompt.size()   # generated tokens decoded
                    if n_gen > 0:
                        self._slot_cache[slot].insert(self._slot_cache[slot].end(), c.tokens.begin(),
                                                      c.tokens.begin() + n_gen)
                self._slot_stamp[slot] = self.n_steps
                self._slot_lora[slot] = c.lora_id
                _trim_idle_caches(self, slot)
            else:
                llama.llama_memory_seq_rm(llama.llama_get_memory(self._context._ctx), slot, -1, -1)
            if q.c.attached:
                self._context._detach(slot)       # frees the chain
        q.c.drop_attached()
        q.c.drafter = NULL                        # (the batch's: the next sequence in the slot
        q.c.draft.clear()                         # begins it afresh)
        self._slots[slot] = None
        q.c.slot = -1

    cdef bint _wait_for_prefix(self, SeqCore * q) noexcept nogil:
        """True when another sequence is prefilling a prompt that shares a prefix worth sharing
        with ``q``: ``q`` then waits a step and copies it instead of decoding it alongside."""
        cdef size_t i
        cdef int32_t L, n
        cdef SeqCore * o
        for i in range(self._active.size()):
            o = self._active[i]
            if o == q or o.slot < 0 or not (o.fed_now > 0 or 0 < o.n_fed < <int32_t> o.prompt.size()):
                continue
            n = min(<int32_t> o.prompt.size(), <int32_t> q.prompt.size() - 1)
            L = 0
            while L < n and o.prompt[L] == q.prompt[L]:
                L += 1
            if L >= self._min_share or (L > 0 and L == n and n == <int32_t> q.prompt.size() - 1):
                return True      # (a prompt that is all another's but its last token: n copies)
        return False

    cdef void _share_prefix(self, SeqCore * q) noexcept nogil:
        """Before ``q``'s prompt is fed: copy the longest common prompt prefix another live
        sequence already has in the KV cache, so that prefix is decoded once (system prompts)."""
        cdef size_t i
        cdef int32_t L, best = 0, limit
        cdef SeqCore * o
        cdef SeqCore * src = NULL
        cdef llama.llama_memory_t mem
        limit = <int32_t> q.prompt.size() - 1          # at least one token left to decode
        for i in range(self._active.size()):
            o = self._active[i]
            if o == q or o.slot < 0 or o.n_fed <= best:
                continue
            L = 0
            while L < limit and L < o.n_fed and L < <int32_t> o.prompt.size() and o.prompt[L] == q.prompt[L]:
                L += 1
            if L > best:
                best = L
                src = o
        if src == NULL or (best < self._min_share and best < limit):
            return
        mem = llama.llama_get_memory(self._context._ctx)
        llama.llama_memory_seq_rm(mem, q.slot, -1, -1)
        llama.llama_memory_seq_cp(mem, src.slot, q.slot, -1, -1)
        llama.llama_memory_seq_rm(mem, q.slot, best, -1)
        q.n_fed = best
        q.n_cached = best
        self.n_shared_tokens += best

    cdef bint _no_room_to_start(self, SeqCore * q, int32_t n_in_batch) noexcept nogil:
        """On a unified cache: True when ``q``'s prompt has not started and the rest of it does
        not fit in the cells no live sequence holds or will need for the prompt it has begun
        (idle caches count as room: they are dropped when needed).  Starting it anyway let
        prompts that could not all fit each take part of the cache and wait forever for the
        rest (issue 26: four 450-token prompts on 512 cells).  False when no other sequence
        holds cells: then nothing would ever free any, so it starts (and is cut if too long)."""
        cdef size_t i
        cdef SeqCore * o
        cdef int64_t held = 0, pending = 0, n_ctx
        cdef bint others = False
        if not self._context.kv_unified or q.n_fed != q.n_cached:
            return False
        for i in range(self._live.size()):
            o = self._live[i]
            if o.slot < 0:
                continue
            held += _cells_held(o)
            if o.n_fed >= <int32_t> o.prompt.size():
                held += 1                      # the cell its next token needs
            elif o.n_fed != o.n_cached or o.fed_now > 0:       # begun: its rest is spoken for
                pending += <int32_t> o.prompt.size() - o.n_fed - o.fed_now
            if o != q and (o.n_fed > 0 or o.n_past > 0 or o.fed_now > 0):
                others = True
        if not others:
            return False
        n_ctx = llama.llama_n_ctx(self._context._ctx)
        return held + pending + n_in_batch + (<int32_t> q.prompt.size() - q.n_fed) > n_ctx

    cdef int _fill_batch(self, int n_gen_limit, bint with_prompts) noexcept nogil:
        """Put generating tokens (at most n_gen_limit sequences) and prompt chunks in the batch."""
        cdef size_t i
        cdef int32_t n = 0, k, j, n_gen = 0
        cdef SeqCore * q
        cdef llama.llama_batch * b = &self._batch
        for i in range(self._active.size()):
            q = self._active[i]
            q.batch_idx = -1
            q.fed_now = 0
            q.plp_count = 0
        for i in range(self._active.size()):
            q = self._active[i]
            if q.pending >= 0 and q.finish == FINISH_NONE and n_gen < n_gen_limit and n < self._n_batch:
                b.token[n] = q.pending
                b.pos[n] = q.n_past
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = q.slot
                b.logits[n] = 1
                q.batch_idx = n
                n += 1
                n_gen += 1
        for i in range(self._active.size()):
            # each generating sequence's draft after every pending token (drafts are optional:
            # they never take the room a pending token needs)
            q = self._active[i]
            q.draft_idx = -1
            if q.draft.size() == 0:
                continue
            if q.batch_idx < 0 or self._no_drafts or n + 1 >= self._n_batch:
                q.draft.clear()
                continue
            k = <int32_t> q.draft.size()
            if k > self._n_batch - n - 1:
                k = self._n_batch - n - 1
                q.draft.resize(k)
            q.draft_idx = n
            for j in range(k):
                b.token[n + j] = q.draft[j]
                b.pos[n + j] = q.n_past + 1 + j
                b.n_seq_id[n + j] = 1
                b.seq_id[n + j][0] = q.slot
                b.logits[n + j] = 1
            n += k
        if with_prompts:
            for i in range(self._active.size()):
                q = self._active[i]
                if q.n_fed >= <int32_t> q.prompt.size() or n >= self._n_batch:
                    continue
                if q.n_fed == 0 and self._min_share > 0 and q.n_prompt_lp < 0:
                    self._share_prefix(q)
                    if q.n_fed == 0 and self._wait_for_prefix(q):
                        continue
                if self._no_room_to_start(q, n):
                    continue
                k = <int32_t> q.prompt.size() - q.n_fed
                if k > 1 and q.n_prompt_lp < 0:
                    # the last prompt token is decoded alone, in a later step, as it is after a
                    # prompt-cache hit: its logits then do not depend on whether the prompt was
                    # cached (a row computed in a many-row chunk rounds differently on the
                    # repacked CPU kernels), so a seeded request reproduces (issue 29).  With
                    # prompt logprobs the prompt goes in whole, as llamagen.score decodes it
                    # (the same numbers), and its last cell is decoded again, alone (below).
                    k -= 1
                if k > self._n_batch - n:
                    k = self._n_batch - n
                if q.n_prompt_lp >= 0 and k > self._plp_rows:
                    k = self._plp_rows          # (llama.cpp keeps every output row's logits)
                for j in range(k):
                    b.token[n + j] = q.prompt[q.n_fed + j]
                    b.pos[n + j] = q.n_fed + j
                    b.n_seq_id[n + j] = 1
                    b.seq_id[n + j][0] = q.slot
                    # prompt logprobs: a row for each token that predicts a prompt token
                    b.logits[n + j] = q.n_prompt_lp >= 0 and q.n_fed + j + 1 < <int32_t> q.prompt.size()
                if q.n_prompt_lp >= 0:
                    q.plp_row = n
                    q.plp_pos = q.n_fed
                    q.plp_count = min(k, <int32_t> q.prompt.size() - 1 - q.n_fed)
                if q.n_fed + k == <int32_t> q.prompt.size() and q.max_new > 0 and (
                        k == 1 or q.n_prompt_lp < 0):
                    b.logits[n + k - 1] = 1
                    q.batch_idx = n + k - 1
                q.fed_now = k
                n += k
                if not self._context.kv_unified:
                    # with one KV stream per sequence, llama.cpp (this commit) mixes up several
                    # sequences' prompts in one batch (wrong, nondeterministic logits, seen on
                    # gemma3): feed one prompt per batch; generating tokens still share it
                    break
        b.n_tokens = n
        return n

    cdef int _decode_step(self) noexcept nogil:
        """Fill and decode one batch, retrying smaller when the KV cache is full.  Returns the
        decode code (0 ok, <0 fatal), or -100 when nothing was left to decode."""
        cdef llama.llama_context * lctx = self._context._ctx
        cdef int n_gen = 0, limit, rc
        cdef size_t i
        cdef bint prompts = True
        cdef SeqCore * q
        cdef bint any_spec, timed, exact
        cdef int64_t td
        for i in range(self._active.size()):
            if self._active[i].pending >= 0:
                n_gen += 1
        any_spec = _batch_draft(self)          # (_batch_spec.pxi)
        limit = n_gen
        self._no_drafts = False
        while True:
            if self._fill_batch(limit, prompts) == 0:
                return -100
            # the cost model sees steps of generated tokens and drafts only (prompt chunks take
            # other kernels), of any size: a 32-sequence batch's steps are what fit its drafts
            timed = any_spec
            for i in range(self._active.size()):
                if self._active[i].fed_now > 0:
                    timed = False
            td = llama.llama_time_us()
            exact = any_spec and _batch_one_row(self)     # (_batch_spec.pxi)
            if exact:
                lgctx.set_one_row(lctx, True)
            rc = llama.llama_decode(lctx, self._batch)
            if exact:
                lgctx.set_one_row(lctx, False)
            self._timed_rows = 0
            if rc == 0 and timed:
                llama.llama_synchronize(lctx)
                self._timed_rows = self._batch.n_tokens
                self._timed_us = llama.llama_time_us() - td
            if rc != 1:
                break
            # no KV room: first drop the drafts, then idle prompt caches, then defer the
            # prompts, then half of the generating sequences
            if not self._no_drafts:
                for i in range(self._active.size()):
                    if self._active[i].draft.size() > 0:
                        self._no_drafts = True
                if self._no_drafts:
                    continue
            if _drop_idle_caches(self):
                continue
            if prompts:
                prompts = False
            elif limit > 1:
                limit = limit // 2
            else:
                # a single token does not fit: that sequence is out of context
                for i in range(self._active.size()):
                    q = self._active[i]
                    if q.batch_idx >= 0:
                        q.out.clear()
                        q.finish = FINISH_LENGTH
                        q.pending = -1
                        q.flush()
                        q.batch_idx = -1
                        break
                return 1
        if rc != 0:
            return rc
        self.n_decoded_tokens += self._batch.n_tokens
        for i in range(self._active.size()):
            q = self._active[i]
            if q.fed_now > 0:
                q.n_fed += q.fed_now
                if q.n_fed == <int32_t> q.prompt.size() and q.batch_idx < 0 and q.max_new > 0:
                    # prompt logprobs, the prompt in whole: its last cell again, alone, for the
                    # first token's logits (as after a cached prompt: see _fill_batch)
                    llama.llama_memory_seq_rm(llama.llama_get_memory(lctx), q.slot, q.n_fed - 1, -1)
                    q.n_fed -= 1
                if q.n_fed == <int32_t> q.prompt.size():
                    q.n_past = q.n_fed       # the prompt stays: later sequences may share it
                    if q.max_new == 0:       # the prompt only (its prompt_logprobs)
                        q.finish = FINISH_LENGTH
                        q.flush()
        return 0

    @property
    def ram_cache(self):
        """The host-RAM tier: bytes used of the cap, entries, and how many were saved and
        restored (and the prompt tokens restoring spared)."""
        return {"bytes": self._ram.used, "cap": self._ram.cap, "entries": self._ram.entries.size(),
                "saved": self._ram.n_saved, "restored": self._ram.n_restored,
                "restored_tokens": self._ram.n_restored_tokens}

    cdef void _sample_all(self) noexcept nogil:
        cdef llama.llama_context * lctx = self._context._ctx
        cdef Py_ssize_t i, n = 0
        cdef int tid
        cdef SeqCore * q
        self._sampled.clear()
        for i in range(<Py_ssize_t> self._active.size()):
            q = self._active[i]
            q.out.clear()
            if q.batch_idx >= 0:
                self._sampled.push_back(<int32_t> i)
        n = <Py_ssize_t> self._sampled.size()
        # wait for the decode and put its outputs in order once, before threads read them
        llama.llama_synchronize(lctx)
        llama.llama_get_logits(lctx)
        if n > 1 and self._n_threads > 1 and self._context._n_vocab >= _PARALLEL_MIN_VOCAB:
            for i in prange(n, num_threads=self._n_threads, schedule="dynamic"):
                tid = threadid()
                q = self._active[self._sampled[i]]
                if q.draft_idx >= 0:
                    q.verify(lctx, q.batch_idx, self._cands[tid].data())
                else:
                    q.consume(lctx, q.batch_idx, self._cands[tid].data())
        else:
            for i in range(n):
                q = self._active[self._sampled[i]]
                if q.draft_idx >= 0:
                    q.verify(lctx, q.batch_idx, self._cands[0].data())
                else:
                    q.consume(lctx, q.batch_idx, self._cands[0].data())
        _prompt_rows(lctx, self._active, self._prows, self._n_threads)
        _batch_settle(self)

    cdef int _decode_group(self) noexcept:
        """Decode and sample the sequences in ``_active`` (lock held).  Ctrl-C aborts a long decode
        (a batch of long prompts) between graph nodes; the tokens of that decode stay unfed and a
        later step decodes them again.  (Only on the main thread, where Python runs signal
        handlers: an engine thread would take the GIL every 50 ms for nothing.)"""
        cdef Context ctx = self._context
        cdef int rc
        cdef int64_t t_sample
        ctx._abort.armed = _threading.get_ident() == _MAIN_THREAD
        ctx._abort.interrupted = 0
        ctx._abort.last_us = llamagen_monotonic_us()
        with nogil:
            rc = self._decode_step()
            if rc == 0:
                t_sample = llamagen_monotonic_us()
                self._sample_all()
                t_sample = llamagen_monotonic_us() - t_sample
                self.sample_us += t_sample
                self.n_sampled += <int64_t> self._sampled.size()
                if self._timed_rows > 0:
                    # a drafted row costs its decode and its sampling (a large vocabulary's
                    # rows are sampled one by one): the step's whole time against its rows
                    self._spec.curve.add(self._timed_rows, <double> (self._timed_us + t_sample))
                    self._timed_rows = 0
        ctx._abort.armed = 0
        return rc

    cdef int _step(self) except -1:
        """One decode step for every live sequence; queues (id, chunk) pairs.  0 when idle."""
        cdef Context ctx = self._context
        cdef _Seq q
        cdef int rc
        cdef size_t i
        cdef int32_t slot
        self._initialised()
        ctx._acquire()
        try:
            if self._epoch != ctx._epoch:
                raise StaleStateError("this batch is no longer active: a newer generation (gen_begin, "
                                      "clear, another BatchGenerator) took over its context")
            # waiting prompts take free slots
            while self._waiting:
                q = self._seqs[self._waiting[0]]
                slot = _take_slot(self, q.c)
                if slot < 0:
                    break
                self._waiting.popleft()
                q.c.slot = slot
                self._slots[slot] = q
                if q.c.backend:
                    q.c.attach(ctx._attach(slot, q.c.chain))
                if q.c.spec_n_max > 0:
                    _batch_admit_drafting(self, q, slot)
            first = None
            mixed = False
            self._live.clear()
            for q in self._slots:
                if q is not None:
                    self._live.push_back(q.c)
                    if first is None:
                        first = q
                    elif q.c.lora_id != (<_Seq> first).c.lora_id:
                        mixed = True
            if self._live.size() == 0:
                return 0
            if self._cands[0].size() == 0:
                for i in range(self._cands.size()):
                    self._cands[i].resize(ctx._n_vocab)
            order = [None]              # (one LoRA set, the usual case: every live sequence)
            if mixed:
                # llama.cpp applies adapters per context: one decode per LoRA set, the set
                # already applied first (two sets alternating switch once per step, not twice)
                groups = {}
                for q in self._slots:
                    if q is not None:
                        groups.setdefault(q.c.lora_id, []).append(q)
                order = [groups[k] for k in sorted(groups)]
                for gi in range(1, len(order)):
                    if (<_Seq> order[gi][0]).lora == ctx._lora_applied:
                        order.insert(0, order.pop(gi))
                        break
            rc_all = -100
            aborted = False
            for gi, g in enumerate(order):
                head = first if g is None else g[0]
                if (<_Seq> head).lora != ctx._lora_applied:
                    ctx._use_lora((<_Seq> head).lora)
                    self.n_lora_switches += 1
                if g is None:
                    self._active = self._live
                else:
                    self._active.clear()
                    for q in g:
                        self._active.push_back(q.c)
                rc = self._decode_group()
                if ctx._abort.interrupted and rc != 0:
                    # the decode was aborted (nothing of it counts): the batch stays usable
                    ctx._abort.interrupted = 0
                    if gi == 0:
                        raise KeyboardInterrupt
                    for q in g:
                        q.c.batch_idx = -1
                    aborted = True      # (after the chunks of the sets decoded before it)
                    break
                if rc < 0 and rc != -100:
                    for q in self._slots:
                        if q is not None:
                            self._release_slot(q, False)
                    check_decode(rc, b"batch step")
                if rc != -100:
                    rc_all = rc
            self.n_steps += 1
            if rc_all == -100 and not aborted:
                self.n_stalled_steps += 1
            dead = []
            for slot in range(self._n_slots):
                q = self._slots[slot]
                if q is None:
                    continue
                if q.c.finish == FINISH_ERROR:
                    q.c.out.clear()
                    dead.append((q.c.uid, _seq_failure(q.c)))
                elif q.c.batch_idx >= 0 or q.c.finish != FINISH_NONE:
                    self._ready.append((q.c.uid, q.take_out()))
                if q.c.finish != FINISH_NONE:
                    self._release_slot(q)
                    q.c.free_samplers()
            if dead:
                # the other sequences' chunks of this step stay queued for the next step()
                kind = type(dead[0][1]) if all(type(e) is type(dead[0][1]) for _, e in dead) \
                    else LlamaError
                raise kind("; ".join(f"sequence {uid}: {e}" for uid, e in dead))
            if ctx._abort.interrupted or aborted:   # Ctrl-C as the decode finished: after its chunks
                ctx._abort.interrupted = 0
                raise KeyboardInterrupt
            return 1
        finally:
            ctx._release()

    def step(self):
        """Run one decode step; returns the list of (seq_id, chunk) it produced ([] when idle)."""
        self._step()
        out = list(self._ready)
        self._ready.clear()
        return out

    def __iter__(self):
        return self

    def __next__(self):
        while not self._ready:
            if not self._step():
                raise StopIteration
        return self._ready.popleft()

