# The prompt cache's host-RAM tier (issue 30): an idle slot's cells that must leave the KV cache
# (its budget, a full cache, the slot taken by another prompt) are copied to RAM as llama.cpp's
# sequence state (llama_state_seq_get_data_ext) with the tokens they hold, and copied back
# into a slot when a later prompt begins with those tokens, instead of prefilling them again.
# A hard byte cap, least recently used out first.  Included by _core.pyx before _batch.pxi.

from libc.stdint cimport uint8_t

# an entry shorter than this is not worth a copy: prefilling it is as fast
cdef int32_t _RAM_MIN_TOKENS = 32


cdef cppclass _RamEntry:
    vector[llama.llama_token] tokens        # what the saved cells hold, from position 0
    int32_t lora_id                         # the LoRA set that computed them (BatchGenerator's)
    vector[uint8_t] data                    # llama.cpp's sequence state
    int64_t stamp                           # last saved or restored (LRU)


cdef cppclass RamCache:
    vector[_RamEntry *] entries
    int64_t cap                             # bytes; 0: off
    int64_t used
    int64_t clock
    int64_t n_saved                         # entries written
    int64_t n_restored                      # entries copied back into a slot
    int64_t n_restored_tokens               # ... the prompt tokens they spared a prefill

    __init__():
        this.cap = 0
        this.used = 0
        this.clock = 0
        this.n_saved = 0
        this.n_restored = 0
        this.n_restored_tokens = 0

    __dealloc__():
        this.clear()

    void clear() noexcept nogil:
        cdef size_t i
        for i in range(this.entries.size()):
            del this.entries[i]
        this.entries.clear()
        this.used = 0

    void drop(size_t i) noexcept nogil:
        this.used -= <int64_t> this.entries[i].data.size()
        del this.entries[i]
        this.entries.erase(this.entries.begin() + i)

    void save(llama.llama_context * ctx, int32_t seq, const vector[llama.llama_token] & tokens,
              int32_t lora_id, const _RamEntry * keep) noexcept nogil:
        """Copy sequence ``seq``'s cells (holding ``tokens``) to RAM, unless an entry already
        holds them (or more); an entry they extend is replaced.  ``keep`` (or NULL) is an entry
        about to be restored: never dropped to make room (the save is skipped instead)."""
        cdef size_t i, size, got, room
        cdef int32_t n = <int32_t> tokens.size(), m, L
        cdef _RamEntry * e
        if this.cap <= 0 or n < _RAM_MIN_TOKENS:
            return
        i = 0
        while i < this.entries.size():
            e = this.entries[i]
            m = <int32_t> e.tokens.size()
            if e.lora_id == lora_id:
                L = 0
                while L < n and L < m and e.tokens[L] == tokens[L]:
                    L += 1
                if L == n:                  # already held (this, or more)
                    this.clock += 1
                    e.stamp = this.clock
                    return
                if L == m and e != keep:    # a shorter version: replaced
                    this.drop(i)
                    continue
            i += 1
        size = llama.llama_state_seq_get_size_ext(ctx, seq, 0)
        room = <size_t> this.cap - (keep.data.size() if keep != NULL else 0)
        if size == 0 or <int64_t> size > <int64_t> room:
            return
        while this.used + <int64_t> size > this.cap:
            i = this.oldest(keep)
            if i >= this.entries.size():
                return
            this.drop(i)
        e = new _RamEntry()
        e.data.resize(size)
        got = llama.llama_state_seq_get_data_ext(ctx, e.data.data(), size, seq, 0)
        if got == 0:
            del e
            return
        e.data.resize(got)
        e.tokens = tokens
        e.lora_id = lora_id
        this.clock += 1
        e.stamp = this.clock
        this.used += <int64_t> got
        this.entries.push_back(e)
        this.n_saved += 1

    size_t oldest(const _RamEntry * keep) noexcept nogil:
        cdef size_t i, best = this.entries.size()
        for i in range(this.entries.size()):
            if this.entries[i] != keep and (best == this.entries.size() or
                                            this.entries[i].stamp < this.entries[best].stamp):
                best = i
        return best

    int32_t find(const vector[llama.llama_token] & prompt, int32_t limit, int32_t lora_id,
                 int32_t * prefix) noexcept nogil:
        """The entry sharing the longest prefix with ``prompt`` (at most ``limit`` tokens) under
        ``lora_id``: its index (-1: none), the prefix length in ``prefix``."""
        cdef size_t i
        cdef int32_t L, n, best = -1
        cdef _RamEntry * e
        prefix[0] = 0
        for i in range(this.entries.size()):
            e = this.entries[i]
            if e.lora_id != lora_id:
                continue
            n = min(limit, <int32_t> e.tokens.size())
            L = 0
            while L < n and e.tokens[L] == prompt[L]:
                L += 1
            if L > prefix[0]:
                prefix[0] = L
                best = <int32_t> i
        return best

    int32_t restore(llama.llama_context * ctx, int32_t seq, _RamEntry * e, int32_t keep) noexcept nogil:
        """Copy entry ``e`` into the empty sequence ``seq`` and keep its first ``keep`` cells.
        Returns ``keep``, or 0 when llama.cpp could not place it (no room: the caller prefills)."""
        cdef llama.llama_memory_t mem = llama.llama_get_memory(ctx)
        if llama.llama_state_seq_set_data_ext(ctx, e.data.data(), e.data.size(), seq, 0) == 0:
            llama.llama_memory_seq_rm(mem, seq, -1, -1)
            return 0
        if keep < <int32_t> e.tokens.size() and not llama.llama_memory_seq_rm(mem, seq, keep, -1):
            llama.llama_memory_seq_rm(mem, seq, -1, -1)
            return 0
        this.clock += 1
        e.stamp = this.clock
        this.n_restored += 1
        this.n_restored_tokens += keep
        return keep
