# Raw declarations of the log-probability kernels (llamagen/csrc/lg_logprobs.h).  No logic here:
# cimport as a namespace (`from llamagen.includes cimport logprobs as lglp`).
from libc.stdint cimport int32_t

from llamagen.includes.llama cimport llama_token_data


cdef extern from "lg_logprobs.h" namespace "lglp" nogil:
    const int MAX_TOP
    double log_sum_exp(const float * W, size_t n, float mx) noexcept
    double row(const float * W, int32_t n, int32_t k, int32_t * top_ids, float * top_lps,
               llama_token_data * heap) noexcept
