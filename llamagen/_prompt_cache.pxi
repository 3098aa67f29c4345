# The BatchGenerator's prompt cache: idle slots keep their cells for a later prompt with the same
# prefix (the slot holding the longest one is taken), packed, trimmed to a budget, dropped under
# KV pressure, and moved to the host-RAM tier (_ramcache.pxi) instead of lost.  Module-level
# functions of the batch (they read its attributes).  Included by _core.pyx after _batch.pxi.


cdef bint _drop_idle_caches(BatchGenerator self) noexcept nogil:
    """Free the cells of every idle slot's prompt cache; True if there were any."""
    cdef size_t s
    cdef bint any = False
    for s in range(self._slot_cache.size()):
        if self._slot_cache[s].size() > 0:
            self._ram.save(self._context._ctx, <int32_t> s, self._slot_cache[s], self._slot_lora[s], NULL)
            llama.llama_memory_seq_rm(llama.llama_get_memory(self._context._ctx), <int32_t> s, -1, -1)
            self._slot_cache[s].clear()
            any = True
    return any


cdef void _trim_idle_caches(BatchGenerator self, int32_t newest) noexcept:
    """Drop the least recently released idle caches (never ``newest``) while they hold more
    cells than the budget."""
    cdef int32_t s, old
    cdef int64_t total = 0
    for s in range(self._n_slots):
        total += self._slot_cache[s].size()
    while total > self._cache_budget:
        old = -1
        for s in range(self._n_slots):
            if s != newest and self._slot_cache[s].size() > 0 and (
                    old < 0 or self._slot_stamp[s] < self._slot_stamp[old]):
                old = s
        if old < 0:
            return
        with nogil:
            self._ram.save(self._context._ctx, old, self._slot_cache[old], self._slot_lora[old], NULL)
        llama.llama_memory_seq_rm(llama.llama_get_memory(self._context._ctx), old, -1, -1)
        total -= self._slot_cache[old].size()
        self._slot_cache[old].clear()


cdef inline bint _spare_first(BatchGenerator self, int32_t a, int32_t b) noexcept:
    """Of two free slots with equally useful caches, take ``a`` before ``b``: an empty one
    first (the other cache may serve a later prompt), else the least recently released."""
    cdef bint ea = self._slot_cache[a].size() == 0, eb = self._slot_cache[b].size() == 0
    if ea != eb:
        return ea
    return self._slot_stamp[a] < self._slot_stamp[b]


cdef int32_t _take_slot(BatchGenerator self, SeqCore * q) noexcept:
    """A free slot for ``q`` (lock held): the one whose cached tokens share the longest prefix
    with its prompt (that prefix is kept, the rest of the slot's cells removed), else an empty
    one, else the least recently released.  -1 when none is free.  A prefix shorter than
    min(16, half the prompt) does not count: a shared BOS is not worth another's cache."""
    cdef int32_t slot, best = -1, best_len = -1, L, limit, n, worth
    cdef llama.llama_memory_t mem = llama.llama_get_memory(self._context._ctx)
    limit = <int32_t> q.prompt.size() - 1          # at least one token left to decode
    if q.n_prompt_lp >= 0:
        limit = 0           # prompt logprobs: every prompt row is computed
    worth = min(16, (limit + 2) // 2)
    for slot in range(self._n_slots):
        if self._slots[slot] is not None:
            continue
        n = min(limit, <int32_t> self._slot_cache[slot].size())
        if self._slot_lora[slot] != q.lora_id:
            n = 0           # (cells computed with other adapters)
        L = 0
        while L < n and self._slot_cache[slot][L] == q.prompt[L]:
            L += 1
        if L < worth:
            L = 0
        if L > best_len or (L == best_len and _spare_first(self, slot, best)):
            best, best_len = slot, L
    if best < 0:
        return -1
    if self._keep_cache:
        self.n_cache_queries += q.prompt.size()
    if self._ram.cap > 0:
        best_len = _from_ram(self, q, best, best_len, limit, worth)
    if best_len > 0 and llama.llama_memory_seq_rm(mem, best, best_len, -1):
        self._slot_cache[best].resize(best_len)
    else:
        # (a memory that cannot cut a sequence in the middle keeps nothing)
        llama.llama_memory_seq_rm(mem, best, -1, -1)
        self._slot_cache[best].clear()
        best_len = 0
    if self._keep_cache and all(x is None for x in self._slots):
        best_len = _pack_idle(self, best, best_len)
    if best_len > 0:
        q.n_fed = best_len
        q.n_cached = best_len
        self.n_cache_hits += best_len
    self._slot_cache[best].clear()
    return best


cdef int32_t _from_ram(BatchGenerator self, SeqCore * q, int32_t slot, int32_t best_len, int32_t limit,
                       int32_t worth) noexcept:
    """The RAM tier for the prompt about to take ``slot``: what the slot's cache would lose
    goes to RAM, and an entry sharing a longer prefix with the prompt comes back into the
    slot.  Returns the prefix the slot now holds."""
    cdef llama.llama_context * lctx = self._context._ctx
    cdef int32_t idx, L = 0, got
    cdef _RamEntry * e = NULL
    with nogil:
        idx = self._ram.find(q.prompt, limit, q.lora_id, &L)
        if idx >= 0 and L >= worth and L > best_len:
            e = self._ram.entries[idx]
        if <int32_t> self._slot_cache[slot].size() - best_len >= _RAM_MIN_TOKENS:
            self._ram.save(lctx, slot, self._slot_cache[slot], self._slot_lora[slot], e)
        if e == NULL:
            return best_len
        llama.llama_memory_seq_rm(llama.llama_get_memory(lctx), slot, -1, -1)
        got = self._ram.restore(lctx, slot, e, L)
    self._slot_cache[slot].assign(q.prompt.begin(), q.prompt.begin() + got)
    self._slot_lora[slot] = q.lora_id
    return got


cdef int32_t _pack_idle(BatchGenerator self, int32_t best, int32_t best_len) noexcept:
    """Before a sequence starts in an idle batch: pack the idle caches' cells from cell 0,
    ``best``'s kept prefix last, so the new sequence's cells follow its prefix in order (see
    lgctx::compact).  Returns the prefix length still cached (0 if packing failed)."""
    cdef vector[int32_t] order
    cdef int32_t s, follow
    cdef int rc
    for s in range(self._n_slots):
        if s != best and self._slot_cache[s].size() > 0:
            order.push_back(s)
    if best_len > 0:
        order.push_back(best)
    if order.size() == 0:
        return best_len
    follow = best if best_len > 0 else -1
    with nogil:         # (copies every idle cache's K/V rows: tens of ms for thousands of cells)
        rc = lgctx.compact(self._context._ctx, order.data(), <int> order.size(), follow)
    if rc < 0:
        # the memory was cleared: forget every cache (the answers stay right, only slower)
        for s in range(self._n_slots):
            self._slot_cache[s].clear()
        return 0
    if rc == 0:
        self.n_compactions += 1
    return best_len


# -- one slot's cache to and from a file (llama-server's /slots/{id}?action=save|restore|erase) --

cdef int32_t _idle_slot(BatchGenerator self, slot) except -1:
    """(lock held) ``slot`` checked: a slot of this batch, idle, the batch not stale."""
    cdef int32_t s = _check_int("slot", slot, 0, self._n_slots - 1,
                                f"a slot from 0 to {self._n_slots - 1}")
    if self._epoch != self._context._epoch:
        raise StaleStateError("this batch is no longer active")
    if self._slots[s] is not None:
        raise invalid(ValueError, "slot", f"slot {s} is busy (a sequence is running in it)")
    return s


def _slot_save(BatchGenerator self, slot, path):
    cdef bytes pb = _os.fsencode(path)
    cdef const char * p = pb
    cdef int32_t s
    cdef size_t n
    self._initialised()
    self._context._acquire()
    try:
        s = _idle_slot(self, slot)
        with nogil:
            n = llama.llama_state_seq_save_file(self._context._ctx, p, s, self._slot_cache[s].data(),
                                                self._slot_cache[s].size())
        if n == 0:
            raise LlamaError(f"could not save slot {s} to {path!r}: {_take_errors() or 'I/O error'}")
        return self._slot_cache[s].size(), n
    finally:
        self._context._release()


def _slot_restore(BatchGenerator self, slot, path):
    cdef bytes pb = _os.fsencode(path)
    cdef const char * p = pb
    cdef int32_t s
    cdef size_t n, count = 0
    cdef vector[llama.llama_token] toks
    if not _os.path.isfile(pb):
        raise FileNotFoundError(2, "slot file not found", path)
    self._initialised()
    self._context._acquire()
    try:
        s = _idle_slot(self, slot)
        toks.resize(self._n_ctx_seq)
        _drop_slot(self, s)
        _take_errors()
        with nogil:
            n = llama.llama_state_seq_load_file(self._context._ctx, p, s, toks.data(), toks.size(),
                                                &count)
        if n == 0:
            llama.llama_memory_seq_rm(llama.llama_get_memory(self._context._ctx), s, -1, -1)
            raise LlamaError(f"could not restore slot {s} from {path!r}: not a state of this model "
                             f"and context, or no room ({_take_errors() or 'llama.cpp refused it'})")
        for i in range(count):
            if not 0 <= toks[i] < self._context._n_vocab:
                llama.llama_memory_seq_rm(llama.llama_get_memory(self._context._ctx), s, -1, -1)
                raise LlamaError(f"{path!r} holds token ids outside this model's vocabulary")
        toks.resize(count)
        self._slot_cache[s] = toks
        self._slot_lora[s] = self._lora_id(self._context._lora_default)
        self._slot_stamp[s] = self.n_steps
        return count, n
    finally:
        self._context._release()


cdef int32_t _drop_slot(BatchGenerator self, int32_t s) noexcept:
    """(lock held) Forget idle slot ``s``'s cache (not to RAM): its cell count."""
    cdef int32_t n = <int32_t> self._slot_cache[s].size()
    llama.llama_memory_seq_rm(llama.llama_get_memory(self._context._ctx), s, -1, -1)
    self._slot_cache[s].clear()
    return n


def _slot_erase(BatchGenerator self, slot):
    self._initialised()
    self._context._acquire()
    try:
        return _drop_slot(self, _idle_slot(self, slot))
    finally:
        self._context._release()
