// Log-probabilities of a logits row, as OpenAI and vLLM report them: log_softmax of the raw
// logits (before any sampler), for the chosen token and the k most likely ones.
//
// One row costs a max/top-k scan and one pass of exp: both vectorized (AVX-512 where the CPU has
// it), no allocation, no GIL.  exp runs as 2^t with a degree-6 polynomial (relative error < 3e-7)
// and the sum is kept in double: log Z is within ~1e-6 of a float64 recomputation at a 262k
// vocabulary, where a float accumulator could drift by 1e-4.
#pragma once

#include "fast_sampler.h"     // lgfs::topk_heap, lgfs::scan_max_min, lgfs::cpu_has_avx512

#include <cmath>
#include <cstdint>

namespace lglp {

// the most alternatives per token (OpenAI's top_logprobs limit)
static constexpr int MAX_TOP = 20;

static inline double sum_exp_scalar(const float * W, size_t n, float mx) {
    double z = 0.0;
    for (size_t i = 0; i < n; ++i) {
        z += std::exp((double) W[i] - (double) mx);
    }
    return z;
}

#ifdef LGFS_X86
LGFS_AVX512 static double sum_exp_avx512(const float * W, size_t n, float mx) {
    const __m512 vmx = _mm512_set1_ps(mx), lo = _mm512_set1_ps(-200.0f);   // -inf -> ~0, not NaN
    const __m512 l2e = _mm512_set1_ps(1.44269504f);
    const __m512 c1 = _mm512_set1_ps(0.693147182f), c2 = _mm512_set1_ps(0.240226507f),
                 c3 = _mm512_set1_ps(0.0555041087f), c4 = _mm512_set1_ps(0.00961812911f),
                 c5 = _mm512_set1_ps(0.00133335581f), c6 = _mm512_set1_ps(0.000154035304f);
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512d za = _mm512_setzero_pd(), zb = _mm512_setzero_pd();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 d = _mm512_max_ps(_mm512_sub_ps(_mm512_loadu_ps(W + i), vmx), lo);
        const __m512 t = _mm512_mul_ps(d, l2e);
        const __m512 k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512 f = _mm512_sub_ps(t, k);
        __m512 p = _mm512_fmadd_ps(c6, f, c5);
        p = _mm512_fmadd_ps(p, f, c4);
        p = _mm512_fmadd_ps(p, f, c3);
        p = _mm512_fmadd_ps(p, f, c2);
        p = _mm512_fmadd_ps(p, f, c1);
        p = _mm512_fmadd_ps(p, f, one);
        const __m512 e = _mm512_scalef_ps(p, k);
        za = _mm512_add_pd(za, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
        zb = _mm512_add_pd(zb, _mm512_cvtps_pd(_mm512_extractf32x8_ps(e, 1)));
    }
    double z = _mm512_reduce_add_pd(_mm512_add_pd(za, zb));
    return z + sum_exp_scalar(W + i, n - i, mx);
}
#endif

// log sum_i exp(W_i - mx)
static inline double log_sum_exp(const float * W, size_t n, float mx) {
#ifdef LGFS_X86
    if (lgfs::cpu_has_avx512()) {
        return std::log(sum_exp_avx512(W, n, mx));
    }
#endif
    return std::log(sum_exp_scalar(W, n, mx));
}

// The normaliser of a row (log p_i = W_i - norm) and its k most likely tokens (k <= MAX_TOP),
// most likely first, with their log-probabilities.  ``heap`` has room for MAX_TOP + 1 entries.
static inline double row(const float * W, int32_t n, int32_t k, int32_t * top_ids, float * top_lps,
                         llama_token_data * heap) noexcept {
    float mx;
    if (k > n) {
        k = n;
    }
    if (k > 0) {
        lgfs::topk_heap(W, (size_t) n, k, heap);
        mx = heap[0].logit;
    } else {
        mx = lgfs::scan_max_min(W, (size_t) n).max;
    }
    const double norm = (double) mx + log_sum_exp(W, (size_t) n, mx);
    for (int32_t j = 0; j < k; ++j) {
        top_ids[j] = heap[j].id;
        top_lps[j] = (float) ((double) heap[j].logit - norm);
    }
    return norm;
}

}  // namespace lglp
