# Raw declarations of the drafter wrapper (n-gram and draft-model) (llamagen/csrc/lg_spec.h, over llama.cpp's
# common/speculative.h).  No logic here: cimport as a namespace
# (`from llamagen.includes cimport spec as lgspec`).
from libc.stdint cimport int32_t, int64_t, uint32_t
from libcpp.string cimport string
from libcpp.vector cimport vector

from llamagen.includes.llama cimport llama_context, llama_model


cdef extern from "lg_spec.h" namespace "lgspec" nogil:
    cppclass Drafter:
        pass
    Drafter * create(const char * type, uint32_t n_seq, int32_t size_n, int32_t size_m,
                     int32_t min_hits, string & err) noexcept
    Drafter * create_draft(llama_model * draft, llama_context * target, uint32_t n_seq,
                           uint32_t n_ctx, uint32_t n_batch, int32_t n_threads,
                           string & err) noexcept
    void destroy(Drafter * d) noexcept
    void begin(Drafter * d, int32_t seq, const int32_t * prompt, int32_t n_prompt) noexcept
    void want(Drafter * d, int32_t seq, const int32_t * gen, int32_t n_gen, int32_t id_last,
              int32_t n_max) noexcept
    void run(Drafter * d) noexcept
    const vector[int32_t] & result(Drafter * d, int32_t seq) noexcept
    void accept(Drafter * d, int32_t seq, int32_t n_accepted) noexcept
    int64_t caught_up(Drafter * d) noexcept
