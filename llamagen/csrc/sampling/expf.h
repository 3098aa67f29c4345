// glibc's expf (sysdeps/ieee754/flt-32/e_expf.c, EXP2F_TABLE_BITS = 5), vectorized with AVX-512.
// Invariant: bit-identical to the expf llama.cpp calls: a start-up self-test against this
// process's libm picks the variant (FMA or not) that matches it, or none (EXPF_LIBM: scalar libm).
#pragma once

#include "simd.h"
#include "types.h"

namespace lgfs {

static const uint64_t EXPF_TAB[32] = {
    0x3ff0000000000000ULL, 0x3fefd9b0d3158574ULL, 0x3fefb5586cf9890fULL, 0x3fef9301d0125b51ULL,
    0x3fef72b83c7d517bULL, 0x3fef54873168b9aaULL, 0x3fef387a6e756238ULL, 0x3fef1e9df51fdee1ULL,
    0x3fef06fe0a31b715ULL, 0x3feef1a7373aa9cbULL, 0x3feedea64c123422ULL, 0x3feece086061892dULL,
    0x3feebfdad5362a27ULL, 0x3feeb42b569d4f82ULL, 0x3feeab07dd485429ULL, 0x3feea47eb03a5585ULL,
    0x3feea09e667f3bcdULL, 0x3fee9f75e8ec5f74ULL, 0x3feea11473eb0187ULL, 0x3feea589994cce13ULL,
    0x3feeace5422aa0dbULL, 0x3feeb737b0cdc5e5ULL, 0x3feec49182a3f090ULL, 0x3feed503b23e255dULL,
    0x3feee89f995ad3adULL, 0x3feeff76f2fb5e47ULL, 0x3fef199bdd85529cULL, 0x3fef3720dcef9069ULL,
    0x3fef5818dcfba487ULL, 0x3fef7c97337b9b5fULL, 0x3fefa4afa2a490daULL, 0x3fefd0765b6e4540ULL,
};

static constexpr double EXPF_INVLN2N = 0x1.71547652b82fep+5;
static constexpr double EXPF_SHIFT = 0x1.8p+52;
static constexpr double EXPF_C0 = 0x1.c6af84b912394p-20;
static constexpr double EXPF_C1 = 0x1.ebfce50fac4f3p-13;
static constexpr double EXPF_C2 = 0x1.62e42ff0c52d6p-6;
static constexpr float EXPF_UFLOW0 = -0x1.9fe368p6f;   // below: 0
static constexpr float EXPF_UFLOW1 = -0x1.9d1d9ep6f;   // below: the smallest subnormal

enum { EXPF_LIBM = 0, EXPF_NOFMA = 1, EXPF_FMA = 2 };

#ifdef LGFS_X86
template <bool FMA>
LGFS_AVX512 static inline __m256 expf8(__m256 x) {
    const __m512d invln2n = _mm512_set1_pd(EXPF_INVLN2N);
    const __m512d shift = _mm512_set1_pd(EXPF_SHIFT);
    const __m512d c0 = _mm512_set1_pd(EXPF_C0);
    const __m512d c1 = _mm512_set1_pd(EXPF_C1);
    const __m512d c2 = _mm512_set1_pd(EXPF_C2);
    const __m512d one = _mm512_set1_pd(1.0);
    const __m512i t0 = _mm512_loadu_si512((const void *) (EXPF_TAB + 0));
    const __m512i t1 = _mm512_loadu_si512((const void *) (EXPF_TAB + 8));
    const __m512i t2 = _mm512_loadu_si512((const void *) (EXPF_TAB + 16));
    const __m512i t3 = _mm512_loadu_si512((const void *) (EXPF_TAB + 24));
    __m512d xd = _mm512_cvtps_pd(x);
    __m512d kds, kd, r, z, y;
    if (FMA) {
        kds = _mm512_fmadd_pd(invln2n, xd, shift);
        kd = _mm512_sub_pd(kds, shift);
        r = _mm512_fmsub_pd(invln2n, xd, kd);
        z = _mm512_fmadd_pd(r, c0, c1);
        y = _mm512_fmadd_pd(r, c2, one);
        __m512d r2 = _mm512_mul_pd(r, r);
        y = _mm512_fmadd_pd(z, r2, y);
    } else {
        __m512d zz = _mm512_mul_pd(xd, invln2n);
        kds = _mm512_add_pd(zz, shift);
        kd = _mm512_sub_pd(kds, shift);
        r = _mm512_sub_pd(zz, kd);
        __m512d a = _mm512_add_pd(_mm512_mul_pd(c2, r), one);
        __m512d b = _mm512_add_pd(_mm512_mul_pd(c0, r), c1);
        __m512d r2 = _mm512_mul_pd(r, r);
        y = _mm512_add_pd(_mm512_mul_pd(b, r2), a);
        z = b;
    }
    __m512i ki = _mm512_castpd_si512(kds);
    __m512i idx = _mm512_and_si512(ki, _mm512_set1_epi64(31));
    __m512i lo = _mm512_permutex2var_epi64(t0, idx, t1);
    __m512i hi = _mm512_permutex2var_epi64(t2, idx, t3);
    __mmask8 upper = _mm512_test_epi64_mask(idx, _mm512_set1_epi64(16));
    __m512i tab = _mm512_mask_blend_epi64(upper, lo, hi);
    __m512i t = _mm512_add_epi64(tab, _mm512_slli_epi64(ki, 47));
    y = _mm512_mul_pd(y, _mm512_castsi512_pd(t));
    __m256 res = _mm512_cvtpd_ps(y);
    // |x| >= 88: -inf and x < log(2^-150) give 0, x < log(2^-149) the smallest subnormal
    __mmask8 u0 = _mm256_cmp_ps_mask(x, _mm256_set1_ps(EXPF_UFLOW0), _CMP_LT_OQ);
    __mmask8 u1 = _mm256_cmp_ps_mask(x, _mm256_set1_ps(EXPF_UFLOW1), _CMP_LT_OQ);
    res = _mm256_mask_blend_ps(u1, res, _mm256_castsi256_ps(_mm256_set1_epi32(1)));
    res = _mm256_mask_blend_ps(u0, res, _mm256_setzero_ps());
    return res;
}

template <bool FMA>
LGFS_AVX512 static inline __m512 expf16(__m512 x) {
    __m256 a = expf8<FMA>(_mm512_castps512_ps256(x));
    __m256 b = expf8<FMA>(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(a)),
                                               _mm256_castps_pd(b), 1));
}

template <bool FMA>
LGFS_AVX512 static bool expf_selftest_variant() {
    // a deterministic spread of inputs over the range the engine uses (<= 0), plus edges
    uint32_t st = 12345u;
    alignas(64) float in[16], out[16];
    for (int it = 0; it < 40000; ++it) {
        for (int j = 0; j < 16; ++j) {
            st = st * 1664525u + 1013904223u;
            float v;
            if (it < 32000) {
                v = -(float) ((st >> 8) * (1.0 / 16777216.0)) * 110.0f;
            } else {
                v = -(float) ((st >> 8) * (1.0 / 16777216.0)) * 2.0f;
            }
            in[j] = v;
        }
        if (it == 0) {
            in[0] = 0.0f; in[1] = -0.0f; in[2] = -INFINITY; in[3] = EXPF_UFLOW0; in[4] = EXPF_UFLOW1;
            in[5] = -88.0f; in[6] = -87.9f; in[7] = -103.5f; in[8] = -1e-30f; in[9] = -104.5f;
            in[10] = std::nextafter(EXPF_UFLOW1, 0.0f); in[11] = std::nextafter(EXPF_UFLOW0, 0.0f);
        }
        _mm512_storeu_ps(out, expf16<FMA>(_mm512_loadu_ps(in)));
        for (int j = 0; j < 16; ++j) {
            const float ref = ::expf(in[j]);
            uint32_t a, b;
            std::memcpy(&a, &ref, 4);
            std::memcpy(&b, &out[j], 4);
            if (a != b) {
                return false;
            }
        }
    }
    return true;
}
#endif

// which expf the vector kernels use: EXPF_FMA / EXPF_NOFMA (bit-identical to the libm one in this
// process) or EXPF_LIBM (no vector kernels: scalar paths)
static inline int expf_mode() {
    static const int mode = []() {
#ifdef LGFS_X86
        if (!cpu_has_avx512()) {
            return (int) EXPF_LIBM;
        }
        if (expf_selftest_variant<true>()) {
            return (int) EXPF_FMA;
        }
        if (expf_selftest_variant<false>()) {
            return (int) EXPF_NOFMA;
        }
#endif
        return (int) EXPF_LIBM;
    }();
    return mode;
}

#ifdef LGFS_X86
// expf of many floats, bit-identical to libm's
template <bool FMA>
LGFS_AVX512 static void expf_batch_avx512(const float * d, float * out, size_t m) {
    size_t i = 0;
    for (; i + 16 <= m; i += 16) {
        _mm512_storeu_ps(out + i, expf16<FMA>(_mm512_loadu_ps(d + i)));
    }
    for (; i < m; ++i) {
        out[i] = expf(d[i]);
    }
}
#endif

static void expf_batch(const float * d, float * out, size_t m) {
#ifdef LGFS_X86
    const int mode = expf_mode();
    if (mode == EXPF_FMA) {
        expf_batch_avx512<true>(d, out, m);
        return;
    }
    if (mode == EXPF_NOFMA) {
        expf_batch_avx512<false>(d, out, m);
        return;
    }
#endif
    for (size_t i = 0; i < m; ++i) {
        out[i] = expf(d[i]);
    }
}

} // namespace lgfs
