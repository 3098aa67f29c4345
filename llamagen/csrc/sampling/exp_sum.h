// Sums of p_i = expf(x_i - mx) over the whole vocabulary in id order (x = W or W / temp): exactly
// llama.cpp's sequential float (softmax) and double (dist) sums, on exact_sum.h's grids; and
// approximate ones, used only where a proven bound or a later exact check covers their error.
#pragma once

#include "exact_sum.h"
#include "expf.h"
#include "simd.h"
#include "types.h"

namespace lgfs {

// Sum over the whole vocabulary, in id order, of p_i = expf(x_i - mx) where x_i = W_i / t
// (DIV) or W_i, accumulated as llama.cpp does (float: softmax; double: dist).  If chunk_end is
// given, the running sum after each 64-element chunk is stored there (for the dist walk).
template <typename Acc>
static Acc full_exp_sum_scalar(const float * W, size_t n, bool div, float t, float mx, double * chunk_end) {
    Acc s = 0;
    for (size_t i = 0; i < n; ++i) {
        float x = div ? W[i] / t : W[i];
        float p = expf(x - mx);
        s += p;
        if (chunk_end && ((i & 63) == 63 || i + 1 == n)) {
            chunk_end[i >> 6] = (double) s;
        }
    }
    return s;
}

#ifdef LGFS_X86
template <typename Acc, bool FMA, bool DIV>
LGFS_AVX512 static Acc full_exp_sum_avx512(const float * W, size_t n, float t, float mx, double * chunk_end) {
    const bool F64 = sizeof(Acc) == 8;
    alignas(64) float pbuf[64];
    const __m512 vt = _mm512_set1_ps(t), vmx = _mm512_set1_ps(mx);
    Acc s = 0;
    int G = 0;
    uint64_t units = 0;
    bool grid_ok = false;
    double dskip = -INFINITY;       // chunks whose x - mx are all below this add exactly 0
    double kC = 0, kHalf = 0, kBig = 0, kInv = 0, kLim = 0;
    auto regrid = [&]() {
        grid_ok = Grid<Acc>::of(s, G, units);
        // p < 2^(G-1) rounds to 0 (never a tie); expf(d) <= e^d (1 + 2^-23)
        dskip = grid_ok ? ((double) (G - 1) * 0.69314718055994531 - 1e-3) : -INFINITY;
        if (grid_ok) {
            const int mant = F64 ? 52 : 23;
            kC = std::ldexp(1.5, G + mant);
            kHalf = std::ldexp(1.0, G - 1);
            kBig = std::ldexp(1.0, G + mant - 1);
            kInv = std::ldexp(1.0, -G);
            kLim = std::ldexp(1.0, G + mant + 1);   // the end of s's binade
        }
    };
    regrid();
    size_t i = 0, c = 0;
    for (; i + 64 <= n; i += 64, ++c) {
        __m512 x[4];
        for (int v = 0; v < 4; ++v) {
            x[v] = _mm512_loadu_ps(W + i + 16 * v);
            if (DIV) {
                x[v] = _mm512_div_ps(x[v], vt);
            }
        }
        if (grid_ok && (double) mx + dskip > -3e38) {
            // skip test on x - mx (the float subtraction llama.cpp does), with margin
            const __m512 th = _mm512_set1_ps((float) ((double) mx + dskip));
            __mmask16 any = 0;
            for (int v = 0; v < 4; ++v) {
                any |= _mm512_cmp_ps_mask(x[v], th, _CMP_GE_OQ);
            }
            if (any == 0 && std::isfinite(dskip) && (double) mx + dskip > -3e38) {
                if (chunk_end) {
                    chunk_end[c] = (double) s;
                }
                continue;
            }
        }
        bool ok = grid_ok;
        Acc T = 0;
        if (F64) {
            const __m512d C = _mm512_set1_pd(kC);
            const __m512d half = _mm512_set1_pd(kHalf);
            const __m512d big = _mm512_set1_pd(kBig);
            const __m512d inv_g = _mm512_set1_pd(kInv);
            __m512d acc = _mm512_setzero_pd();
            __mmask8 bad = 0;
            uint64_t tie64 = 0, up64 = 0, par64 = 0;
            for (int v = 0; v < 4; ++v) {
                __m512 p = expf16<FMA>(_mm512_sub_ps(x[v], vmx));
                _mm512_store_ps(pbuf + 16 * v, p);
                if (ok) {
                    __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(p));
                    __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(p), 1)));
                    __mmask8 t0, u0, q0, t1, u1, q1;
                    acc = _mm512_add_pd(acc, round8_f64(lo, C, half, big, inv_g, bad, t0, u0, q0));
                    acc = _mm512_add_pd(acc, round8_f64(hi, C, half, big, inv_g, bad, t1, u1, q1));
                    const int sh = 16 * v;
                    tie64 |= ((uint64_t) t0 | ((uint64_t) t1 << 8)) << sh;
                    up64 |= ((uint64_t) u0 | ((uint64_t) u1 << 8)) << sh;
                    par64 |= ((uint64_t) q0 | ((uint64_t) q1 << 8)) << sh;
                }
            }
            if (ok) {
                ok = bad == 0;
                T = (Acc) _mm512_reduce_add_pd(acc);
            }
            if (ok && tie64) {
                // a half-way case rounds to the even running sum: its direction depends on the
                // parity of the sum before it, i.e. of the units added since the chunk start
                // (or since the previous half-way case, after which the sum is even)
                int pi = (int) (((uint64_t) ((double) s * kInv)) & 1);
                int corr = 0, pos = 0;
                uint64_t tm = tie64;
                while (tm) {
                    const int j = __builtin_ctzll(tm);
                    tm &= tm - 1;
                    const uint64_t range = ((j == 64 ? ~0ULL : ((1ULL << j) - 1))) & ~((pos == 0) ? 0ULL : ((1ULL << pos) - 1));
                    const int par = (pi + __builtin_popcountll(par64 & range)) & 1;
                    if (par) {
                        corr += ((up64 >> j) & 1) ? 1 : -1;
                    }
                    pi = 0;
                    pos = j + 1;
                }
                T = T + (Acc) ((double) corr * (2.0 * kHalf));
            }
        } else {
            const __m512 C = _mm512_set1_ps((float) kC);
            const __m512 half = _mm512_set1_ps((float) kHalf);
            const __m512 big = _mm512_set1_ps((float) kBig);
            __m512 acc = _mm512_setzero_ps();
            __mmask16 bad = 0;
            for (int v = 0; v < 4; ++v) {
                __m512 p = expf16<FMA>(_mm512_sub_ps(x[v], vmx));
                _mm512_store_ps(pbuf + 16 * v, p);
                if (ok) {
                    acc = _mm512_add_ps(acc, round16_f32(p, C, half, big, bad));
                }
            }
            if (ok) {
                ok = bad == 0;
                T = (Acc) _mm512_reduce_add_ps(acc);
            }
        }
        if (ok) {
            const Acc ns = s + T;      // exact when below the binade's end
            if ((double) ns < kLim) {
                s = ns;
                if (chunk_end) {
                    chunk_end[c] = (double) s;
                }
                continue;
            }
        }
        for (int j = 0; j < 64; ++j) {
            s = s + (Acc) pbuf[j];
        }
        regrid();
        if (chunk_end) {
            chunk_end[c] = (double) s;
        }
    }
    for (; i < n; ++i) {
        float x = DIV ? W[i] / t : W[i];
        s = s + (Acc) expf(x - mx);
        if (chunk_end && ((i & 63) == 63 || i + 1 == n)) {
            chunk_end[i >> 6] = (double) s;
        }
    }
    return s;
}
#endif

template <typename Acc>
static Acc full_exp_sum(const float * W, size_t n, bool div, float t, float mx, double * chunk_end) {
#ifdef LGFS_X86
    const int mode = expf_mode();
    if (mode == EXPF_FMA) {
        return div ? full_exp_sum_avx512<Acc, true, true>(W, n, t, mx, chunk_end)
                   : full_exp_sum_avx512<Acc, true, false>(W, n, t, mx, chunk_end);
    }
    if (mode == EXPF_NOFMA) {
        return div ? full_exp_sum_avx512<Acc, false, true>(W, n, t, mx, chunk_end)
                   : full_exp_sum_avx512<Acc, false, false>(W, n, t, mx, chunk_end);
    }
#endif
    return full_exp_sum_scalar<Acc>(W, n, div, t, mx, chunk_end);
}

#ifdef LGFS_X86
// dist over the whole vocabulary, approximately: ce[c] = the sum of e_i = expf(x_i - mx) over the
// chunks 0..c (64 ids each), in double, chunk by chunk; returns the total.  Its distance to
// llama.cpp's sequential double sum at any chunk end is below dist_bound() (see step_temp_dist).
template <bool FMA, bool DIV>
LGFS_AVX512 static double approx_exp_sum_avx512(const float * W, size_t n, float t, float mx, double * ce) {
    const __m512 vt = _mm512_set1_ps(t), vmx = _mm512_set1_ps(mx);
    double s = 0.0;
    size_t i = 0, c = 0;
    for (; i + 64 <= n; i += 64, ++c) {
        __m512d acc[4];
        for (int v = 0; v < 4; ++v) {
            __m512 x = _mm512_loadu_ps(W + i + 16 * v);
            if (DIV) {
                x = _mm512_div_ps(x, vt);
            }
            const __m512 e = expf16<FMA>(_mm512_sub_ps(x, vmx));
            acc[v] = _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(e)),
                                   _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))));
        }
        s += _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(acc[0], acc[1]), _mm512_add_pd(acc[2], acc[3])));
        ce[c] = s;
    }
    for (; i < n; ++i) {
        const float x = DIV ? W[i] / t : W[i];
        s += (double) expf(x - mx);
        if ((i & 63) == 63 || i + 1 == n) {
            ce[i >> 6] = s;
        }
    }
    return s;
}
#endif

#ifdef LGFS_X86
// approximate Z = sum exp(W - mx) and S = sum exp(W - mx) * (W - mx) over the whole vocabulary
// (relative error ~1e-4: only to pick where fast typical starts looking); false without AVX-512
LGFS_AVX512 static void approx_z_s_avx512(const float * W, size_t n, float mx, double & Z, double & S) {
    const __m512 vmx = _mm512_set1_ps(mx), lo = _mm512_set1_ps(-100.0f);
    const __m512 l2e = _mm512_set1_ps(1.44269504f);
    const __m512 c1 = _mm512_set1_ps(0.693147182f), c2 = _mm512_set1_ps(0.240226507f),
                 c3 = _mm512_set1_ps(0.0555041087f), c4 = _mm512_set1_ps(0.00961812911f),
                 c5 = _mm512_set1_ps(0.00133335581f), c6 = _mm512_set1_ps(0.000154035304f);
    __m512 z = _mm512_setzero_ps(), s = _mm512_setzero_ps();
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
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
        const __m512 e = _mm512_scalef_ps(p, k);
        z = _mm512_add_ps(z, e);
        s = _mm512_fmadd_ps(e, d, s);
    }
    Z = (double) _mm512_reduce_add_ps(z);
    S = (double) _mm512_reduce_add_ps(s);
    for (; i < n; ++i) {
        const float d = std::max(W[i] - mx, -100.0f);
        const double e = std::exp((double) d);
        Z += e;
        S += e * (double) d;
    }
}
#endif

static bool approx_z_s(const float * W, size_t n, float mx, double & Z, double & S) {
#ifdef LGFS_X86
    if (cpu_has_avx512()) {
        approx_z_s_avx512(W, n, mx, Z, S);
        return true;
    }
#endif
    (void) W; (void) n; (void) mx; (void) Z; (void) S;
    return false;
}

} // namespace lgfs
