# Raw declarations of the hidden-state tap for pooled embeddings (llamagen/csrc/lg_embed.h).  No
# logic here: cimport as a namespace (`from llamagen.includes cimport embed as lgembd`).
from libc.stdint cimport int64_t
from libcpp cimport bool as cbool

from llamagen.includes.ggml cimport ggml_tensor


cdef extern from "lg_embed.h" namespace "lgembd" nogil:
    enum:
        POOL_MEAN
        POOL_FIRST
        POOL_LAST

    cdef struct Tap:
        int armed
        int stop
        int got
        int unpooled
        int64_t n_embd
        int64_t n_rows
        float * dst

    cbool tap_cb(ggml_tensor * t, cbool ask, void * user_data) noexcept
    void pool(const float * rows, int64_t n_embd, int64_t first, int64_t n, int how,
              float * out) noexcept
    cbool same_vector(const float * a, const float * b, int64_t n) noexcept
