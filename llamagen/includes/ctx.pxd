# Raw declarations of the KV-cache upkeep llama.h does not offer (llamagen/csrc/lg_ctx.h).  No
# logic here: cimport as a namespace (`from llamagen.includes cimport ctx as lgctx`).
from libc.stdint cimport int32_t

from llamagen.includes.llama cimport llama_context


cdef extern from "lg_ctx.h" namespace "lgctx" nogil:
    int compact(llama_context * ctx, const int32_t * seqs, int n_seqs, int32_t follow) noexcept
    void set_batch_invariant(llama_context * ctx, bint on) noexcept
    void set_one_row(llama_context * ctx, bint on) noexcept
