// Stage: top-n-sigma: every logit below max - n * std becomes -inf.  Invariant: the sums behind
// the mean and std are llama.cpp's sequential loops over the vocabulary, bit for bit (64 values
// at a time on the running sum's grid while it stays in one binade: exact_sum.h's argument).
#pragma once

#include "engine.h"
#include "exact_sum.h"
#include "ports.h"
#include "select.h"
#include "simd.h"

namespace lgfs {

// top-n-sigma's sums, as llama.cpp's sequential loops compute them (valid = not -inf):
//   sum: float s += W_i;   acc: float acc += pow(W_i - mean, 2) (a double addition, then float)
// 64 at a time on the running value's grid g = ulp(binade): while every partial sum stays in the
// binade, s + x rounds to s + RN_g(x) (acc: to acc + RN_g(RN_g'(x)), g' = the double ulp), so a
// chunk adds the sum of its roundings whatever the order; chunks with a rounding tie, a value too
// large for the grid or a binade change run sequentially.

#ifdef LGFS_X86
LGFS_AVX512 static float sigma_sum_avx512(const float * W, size_t n, size_t & valid) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    float s = 0.0f;
    size_t cnt = 0, i = 0;
    for (; i + 64 <= n; i += 64) {
        __mmask16 vm[4];
        for (int v = 0; v < 4; ++v) {
            vm[v] = _mm512_cmp_ps_mask(_mm512_loadu_ps(W + i + 16 * v), ninf, _CMP_NEQ_UQ);
            cnt += (size_t) __builtin_popcount((unsigned) vm[v]);
        }
        const float as = std::fabs(s);
        if (as >= 0x1p-100f && as < 0x1p100f) {
            const int E = binade_of(as), G = E - 23;
            const __m512 C = _mm512_set1_ps(1.5f * pow2f(G + 23));
            const __m512 big = _mm512_set1_ps(pow2f(G + 22));
            const __m512 half = _mm512_set1_ps(pow2f(G - 1));
            __m512d pos = _mm512_setzero_pd(), neg = _mm512_setzero_pd();
            __mmask16 bad = 0;
            for (int v = 0; v < 4; ++v) {
                const __m512 x = _mm512_maskz_loadu_ps(vm[v], W + i + 16 * v);
                bad |= _mm512_cmp_ps_mask(_mm512_abs_ps(x), big, _CMP_GE_OQ);
                const __m512 r = _mm512_sub_ps(_mm512_add_ps(x, C), C);
                bad |= _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(x, r)), half, _CMP_EQ_OQ);
                const __m512 rp = _mm512_max_ps(r, _mm512_setzero_ps());
                const __m512 rn = _mm512_min_ps(r, _mm512_setzero_ps());
                pos = _mm512_add_pd(pos, _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(rp)),
                    _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(rp), 1)))));
                neg = _mm512_add_pd(neg, _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(rn)),
                    _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(rn), 1)))));
            }
            if (bad == 0) {
                const double P = _mm512_reduce_add_pd(pos), N = _mm512_reduce_add_pd(neg);
                const double lo = (double) s + N, hi = (double) s + P;
                const double b0 = pow2d(E), b1 = pow2d(E + 1);
                const bool inside = s > 0.0f ? (lo >= b0 && hi < b1) : (hi <= -b0 && lo > -b1);
                if (inside) {
                    s = (float) ((double) s + P + N);
                    continue;
                }
            }
        }
        for (int j = 0; j < 64; ++j) {
            if (W[i + j] != -INFINITY) {
                s += W[i + j];
            }
        }
    }
    for (; i < n; ++i) {
        if (W[i] != -INFINITY) {
            s += W[i];
            ++cnt;
        }
    }
    valid = cnt;
    return s;
}

LGFS_AVX512 static float sigma_acc_avx512(const float * W, size_t n, float mean) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY), vmean = _mm512_set1_ps(mean);
    float acc = 0.0f;
    size_t i = 0;
    auto seq = [&](size_t a, size_t b) {
        for (size_t j = a; j < b; ++j) {
            if (W[j] != -INFINITY) {
                const double d = (double) (W[j] - mean);
                acc = (float) ((double) acc + d * d);
            }
        }
    };
    for (; i + 64 <= n; i += 64) {
        if (acc >= 0x1p-100f && acc < 0x1p100f) {
            const int E = binade_of(acc), G = E - 23, Gd = G - 29;
            const __m512d Cd = _mm512_set1_pd(1.5 * pow2d(Gd + 52));
            const __m512d Cf = _mm512_set1_pd(1.5 * pow2d(G + 52));
            const __m512d big = _mm512_set1_pd(pow2d(G + 22));
            const __m512d half_f = _mm512_set1_pd(pow2d(G - 1));
            __m512d T = _mm512_setzero_pd();
            __mmask8 bad = 0;
            for (int v = 0; v < 4; ++v) {
                const __m512 w = _mm512_loadu_ps(W + i + 16 * v);
                const __mmask16 vm = _mm512_cmp_ps_mask(w, ninf, _CMP_NEQ_UQ);
                const __m512 df = _mm512_maskz_sub_ps(vm, w, vmean);
                for (int h = 0; h < 2; ++h) {
                    const __m512d d = _mm512_cvtps_pd(h == 0 ? _mm512_castps512_ps256(df)
                        : _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(df), 1)));
                    const __m512d sq = _mm512_mul_pd(d, d);
                    bad |= _mm512_cmp_pd_mask(sq, big, _CMP_GE_OQ);
                    // a half-way case here rounds to even units of g': acc, a float, always has
                    // even units on that grid, so this is the rounding of acc + sq too
                    const __m512d r1 = _mm512_sub_pd(_mm512_add_pd(sq, Cd), Cd);
                    const __m512d r2 = _mm512_sub_pd(_mm512_add_pd(r1, Cf), Cf);
                    bad |= _mm512_cmp_pd_mask(_mm512_abs_pd(_mm512_sub_pd(r1, r2)), half_f, _CMP_EQ_OQ);
                    T = _mm512_add_pd(T, r2);
                }
            }
            if (bad == 0) {
                const double t = _mm512_reduce_add_pd(T);
                if ((double) acc + t + pow2d(G) < pow2d(E + 1)) {
                    acc = (float) ((double) acc + t);
                    continue;
                }
            }
        }
        seq(i, i + 64);
    }
    seq(i, n);
    return acc;
}
#endif

template <typename F>
inline void Engine::step_top_n_sigma(F & edit) {
    if (!st.full) {
        port_top_n_sigma(&st.arr, cfg.top_n_sigma);
        return;
    }
    const size_t n = nv();
    if (n <= 1) {
        return;
    }
    // exactly llama.cpp's passes (sequential float sums), over the raw array
    const float * W = st.W;
    float max = W[0];
    float logits_sum = 0;
    size_t valid_count = 0;
    float mean, acc = 0;
#ifdef LGFS_X86
    const MaxMin mm = cpu_has_avx512() ? scan_max_min(W, n) : MaxMin{0.0f, 0.0f, true};
    if (!mm.nan && mm.max < INFINITY) {
        max = mm.max;       // the -inf among W change neither
        logits_sum = sigma_sum_avx512(W, n, valid_count);
        mean = valid_count > 0 ? logits_sum / valid_count : 0;
        acc = sigma_acc_avx512(W, n, mean);
    } else
#endif
    {
        for (size_t i = 0; i < n; ++i) {
            if (W[i] != -INFINITY) {
                max = std::max(max, W[i]);
                logits_sum += W[i];
                valid_count++;
            }
        }
        mean = valid_count > 0 ? logits_sum / valid_count : 0;
        for (size_t i = 0; i < n; ++i) {
            if (W[i] != -INFINITY) {
                const double d = (double) (W[i] - mean);
                acc = (float) ((double) acc + d * d);
            }
        }
    }
    float std = valid_count > 0 ? sqrt(acc / valid_count) : 0;
    const float cut = max - (cfg.top_n_sigma * std);
    float * w = edit();
    for (size_t i = 0; i < n; ++i) {
        if (w[i] < cut) {
            w[i] = -INFINITY;
        }
    }
}

} // namespace lgfs
