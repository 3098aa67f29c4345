// Stage: mirostat 1 and 2 (after temperature), from the head of the distribution only.
// Invariant: llama.cpp's token and mu: the tail's sums lie within proven bounds, the head is
// summed in sorted order, and a draw those bounds cannot settle runs the exact port.
#pragma once

#include "engine.h"
#include "exact_sum.h"
#include "expf.h"
#include "ports.h"
#include "select.h"
#include "simd.h"

namespace lgfs {

// mirostat: one pass over the whole vocabulary

// What a mirostat step needs from the candidates it keeps (T), when T reaches below the head of
// the distribution: how many there are and sum_i (double) p_i, p_i = expf(x_i - mx) / Z, with
// x = W / t (DIV) or W.  Membership: MODE 0 all; MODE 1 (mirostat 2) !(-log2f(p) > mu), decided
// by two float thresholds on p and, between them, by log2f itself; MODE 2 W > wk.
// min_pass / max_fail (MODE 1): the smallest kept and the largest dropped p (the kept set must be
// a prefix of the sorted order, as llama.cpp's find_if keeps it).
struct MiroPass {
    size_t count = 0;
    size_t tiny = 0;            // kept p < 2^-29 (their double additions may round)
    double sum = 0.0;
    float min_pass = INFINITY;
    float max_fail = -INFINITY;
};

static inline bool miro_keep_scalar(float p, float mu) { return !(-log2f(p) > mu); }

template <int MODE>
static void miro_pass_scalar(const float * W, size_t n, bool div, float t, float mx, float Z, float thr_pass,
                             float thr_fail, float mu, float wk, MiroPass & r) {
    for (size_t i = 0; i < n; ++i) {
        const float x = div ? W[i] / t : W[i];
        const float p = expf(x - mx) / Z;
        bool keep = true;
        if (MODE == 1) {
            keep = p >= thr_pass ? true : (p < thr_fail ? false : miro_keep_scalar(p, mu));
        } else if (MODE == 2) {
            keep = W[i] > wk;
        }
        if (keep) {
            r.count++;
            r.sum += (double) p;
            r.tiny += p < 0x1p-29f;
            r.min_pass = std::min(r.min_pass, p);
        } else {
            r.max_fail = std::max(r.max_fail, p);
        }
    }
}

#ifdef LGFS_X86
template <int MODE, bool FMA, bool DIV>
LGFS_AVX512 static void miro_pass_avx512(const float * W, size_t n, float t, float mx, float Z, float thr_pass,
                                         float thr_fail, float mu, float wk, MiroPass & r) {
    const __m512 vt = _mm512_set1_ps(t), vmx = _mm512_set1_ps(mx), vZ = _mm512_set1_ps(Z);
    const __m512 vtp = _mm512_set1_ps(thr_pass), vtf = _mm512_set1_ps(thr_fail), vwk = _mm512_set1_ps(wk);
    const __m512 vtiny = _mm512_set1_ps(0x1p-29f);
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
    __m512 mnp = _mm512_set1_ps(INFINITY), mxf = _mm512_set1_ps(-INFINITY);
    size_t count = 0, tiny = 0;
    alignas(64) float pb[16];
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 w = _mm512_loadu_ps(W + i);
        const __m512 x = DIV ? _mm512_div_ps(w, vt) : w;
        const __m512 p = _mm512_div_ps(expf16<FMA>(_mm512_sub_ps(x, vmx)), vZ);
        __mmask16 keep = 0xffff;
        if (MODE == 1) {
            keep = _mm512_cmp_ps_mask(p, vtp, _CMP_GE_OQ);
            const __mmask16 drop = _mm512_cmp_ps_mask(p, vtf, _CMP_LT_OQ);
            __mmask16 amb = (__mmask16) ~(keep | drop);
            if (amb) {
                _mm512_store_ps(pb, p);
                while (amb) {
                    const int j = __builtin_ctz((unsigned) amb);
                    amb &= (__mmask16) (amb - 1);
                    if (miro_keep_scalar(pb[j], mu)) {
                        keep |= (__mmask16) (1u << j);
                    }
                }
            }
            mxf = _mm512_mask_max_ps(mxf, (__mmask16) ~keep, mxf, p);
        } else if (MODE == 2) {
            keep = _mm512_cmp_ps_mask(w, vwk, _CMP_GT_OQ);
        }
        mnp = _mm512_mask_min_ps(mnp, keep, mnp, p);
        count += (size_t) __builtin_popcount((unsigned) keep);
        tiny += (size_t) __builtin_popcount((unsigned) (keep & _mm512_cmp_ps_mask(p, vtiny, _CMP_LT_OQ)));
        const __m512 pk = _mm512_maskz_mov_ps(keep, p);
        s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm512_castps512_ps256(pk)));
        s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(pk), 1))));
    }
    r.count += count;
    r.tiny += tiny;
    r.sum += _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
    r.min_pass = std::min(r.min_pass, _mm512_reduce_min_ps(mnp));
    r.max_fail = std::max(r.max_fail, _mm512_reduce_max_ps(mxf));
    if (i < n) {
        miro_pass_scalar<MODE>(W + i, n - i, DIV, t, mx, Z, thr_pass, thr_fail, mu, wk, r);
    }
}
#endif

template <int MODE>
static void miro_pass(const float * W, size_t n, bool div, float t, float mx, float Z, float thr_pass,
                      float thr_fail, float mu, float wk, MiroPass & r) {
#ifdef LGFS_X86
    const int mode = expf_mode();
    if (mode == EXPF_FMA) {
        div ? miro_pass_avx512<MODE, true, true>(W, n, t, mx, Z, thr_pass, thr_fail, mu, wk, r)
            : miro_pass_avx512<MODE, true, false>(W, n, t, mx, Z, thr_pass, thr_fail, mu, wk, r);
        return;
    }
    if (mode == EXPF_NOFMA) {
        div ? miro_pass_avx512<MODE, false, true>(W, n, t, mx, Z, thr_pass, thr_fail, mu, wk, r)
            : miro_pass_avx512<MODE, false, false>(W, n, t, mx, Z, thr_pass, thr_fail, mu, wk, r);
        return;
    }
#endif
    miro_pass_scalar<MODE>(W, n, div, t, mx, Z, thr_pass, thr_fail, mu, wk, r);
}

// mirostat 1/2 over the whole vocabulary, x = W / t (div) or W.  llama.cpp sorts all n
// candidates, softmaxes them (float sum Z in sorted order), keeps a prefix T (mirostat 2: p
// not below 2^-mu; mirostat 1: the top k), softmaxes T again (Z2) and draws with
// discrete_distribution (a double sum of T's p, then cumulative p / sum in sorted order).
//  * float sums starting at the maximum (e = 1) ignore every e < 2^-24: Z and Z2 need only
//    the head A of the distribution (e >= 2^-24), summed in sorted order of their values;
//  * T beyond A: Z2 = Z, and one vectorized pass counts T and sums its p (any order): the
//    sum's exact sequential value lies within a proven bound of it, and the draw walks the
//    sorted head with both ends of that bound: equal indices decide the token (the index is
//    monotone in the sum);
//  * only the head is sorted, only as far as the draw reaches; equal logits at the drawn
//    position get llama.cpp's exact order.
inline bool Engine::fast_miro(float t, bool div, llama_token & out) {
    const size_t n = nv();
    const float * W = st.W;
    MaxMin mm = scan_max_min(W, n);
    if (mm.nan || !std::isfinite(mm.max) || std::fabs(mm.max) > 1e8f || n < 2) {
        return false;
    }
    Scratch & S = scratch();
    const float mx = div ? mm.max / t : mm.max;
    // A: e = expf(x - mx) >= 2^-24 (ln 2^-24 = -16.6355)
    const double tx = (double) mx - 16.7;
    const double tw = div ? tx * (double) t : tx;
    const size_t cnt = gather_ge(W, n, (float) (tw - 1e-5 * (std::fabs(tw) + 1.0)), S.gidx);
    std::vector<tdata> & A = S.ma;
    std::vector<float> & d = S.f1;
    std::vector<float> & e = S.f2;
    A.resize(cnt);
    d.resize(cnt);
    e.resize(cnt);
    for (size_t j = 0; j < cnt; ++j) {
        const int32_t id = S.gidx[j];
        const float x = div ? W[id] / t : W[id];
        A[j] = tdata{id, x, 0.0f};
        d[j] = x - mx;
    }
    expf_batch(d.data(), e.data(), cnt);
    size_t a = 0;
    for (size_t j = 0; j < cnt; ++j) {
        if (e[j] >= 0x1p-24f) {
            A[a] = A[j];
            A[a].p = e[j];
            ++a;
        }
    }
    A.resize(a);
    if (a == 0) {
        return false;
    }
    std::vector<float> & v = S.mv;
    v.resize(a);
    for (size_t j = 0; j < a; ++j) {
        v[j] = A[j].p;
    }
    const float Z = desc_seq_sum(v.data(), a);

    size_t tsize = 0;           // |T|
    bool in_A = false;          // T lies within A (then T = the tsize largest of A)
    MiroPass pr;                // T beyond A
    if (cfg.mirostat == 2) {
        size_t keep = 0;
        float minp = INFINITY, maxf = -INFINITY;
        for (size_t j = 0; j < a; ++j) {
            const float p = A[j].p / Z;
            if (miro_keep_scalar(p, mu)) {
                ++keep;
                minp = std::min(minp, p);
            } else {
                maxf = std::max(maxf, p);
            }
        }
        if (keep > 0 && maxf >= minp) {
            return false;       // not a prefix of the sorted order
        }
        if (keep < a) {
            in_A = true;
            tsize = keep == 0 ? 1 : keep;
        } else {
            const float thr_pass = std::nextafter((float) std::exp2(-(double) mu + 1e-3), INFINITY);
            const float thr_fail = std::nextafter((float) std::exp2(-(double) mu - 1e-3), 0.0f);
            miro_pass<1>(W, n, div, t, mx, Z, thr_pass, thr_fail, mu, 0.0f, pr);
            if (pr.count < a || !(pr.max_fail < pr.min_pass)) {
                return false;
            }
            tsize = pr.count;
        }
    } else {
        // s_hat from the 100 most probable (values only: ties do not matter)
        const int32_t m_ = 100;
        const size_t ntop = std::min<size_t>((size_t) m_, n);
        std::vector<float> & top = S.f3;
        top.resize(ntop);
        if (a >= ntop) {
            for (size_t j = 0; j < a; ++j) {
                v[j] = A[j].p;
            }
            std::partial_sort(v.begin(), v.begin() + ntop, v.begin() + a, [](float x, float y) { return x > y; });
            for (size_t j = 0; j < ntop; ++j) {
                top[j] = v[j] / Z;
            }
        } else {
            std::vector<tdata> & H = S.res;
            H.resize(ntop + 1);
            topk_heap(W, n, (int) ntop, H.data());
            for (size_t j = 0; j < ntop; ++j) {
                const float x = div ? H[j].logit / t : H[j].logit;
                top[j] = expf(x - mx) / Z;
            }
        }
        float sum_ti_bi = 0.0;
        float sum_ti_sq = 0.0;
        for (size_t i = 0; i < size_t(m_ - 1) && i < n - 1; ++i) {
            float t_i = logf(float(i + 2) / float(i + 1));
            float b_i = logf(top[i] / top[i + 1]);
            sum_ti_bi += t_i * b_i;
            sum_ti_sq += t_i * t_i;
        }
        const float s_hat = sum_ti_bi / sum_ti_sq;
        float epsilon_hat = s_hat - 1;
        float k = powf((epsilon_hat * powf(2, mu)) / (1 - powf(cfg.n_vocab, -epsilon_hat)), 1 / s_hat);
        const size_t ksz = std::min<size_t>((size_t) std::max(int(k), 1), n);
        if (ksz <= a) {
            in_A = true;
            tsize = ksz;
        } else if (ksz >= n) {
            miro_pass<0>(W, n, div, t, mx, Z, 0.0f, 0.0f, mu, 0.0f, pr);
            tsize = n;
        } else {
            // the top ksz: every W above the ksz-th largest, and copies of it
            const float wk = kth_largest(W, n, ksz, S.f3);
            miro_pass<2>(W, n, div, t, mx, Z, 0.0f, 0.0f, mu, wk, pr);
            if (pr.count < a || pr.count > ksz) {
                return false;
            }
            const float pk = expf((div ? wk / t : wk) - mx) / Z;
            const size_t copies = ksz - pr.count;
            pr.sum += (double) copies * (double) pk;
            pr.tiny += pk < 0x1p-29f ? copies : 0;
            pr.count = ksz;
            tsize = ksz;
        }
    }

    // T's second softmax and the draw's sum
    float Z2 = Z;
    double sum = pr.sum;
    size_t tiny = pr.tiny;
    if (in_A) {
        for (size_t j = 0; j < a; ++j) {
            v[j] = A[j].p;
        }
        if (tsize < a) {
            std::nth_element(v.begin(), v.begin() + (tsize - 1), v.begin() + a, [](float x, float y) { return x > y; });
        }
        Z2 = desc_seq_sum(v.data(), tsize);
        sum = 0.0;
        tiny = 0;
        for (size_t j = 0; j < tsize; ++j) {
            const float p2 = v[j] / Z2;
            sum += (double) p2;
            tiny += p2 < 0x1p-29f;
        }
    }

    // walk the sorted head
    std::vector<tdata> & pre = S.pre;
    const size_t LT = std::min(tsize, a);
    size_t idx = 0;
    std::mt19937 peek = rng_miro;
    if (tsize < 2) {
        pre.assign(A.begin(), A.end());
        std::partial_sort(pre.begin(), pre.begin() + 1, pre.end(), cmp_logit_desc);
    } else {
        const double delta = ((double) tsize * 1.01 * std::max(sum, 1.0) + 2.0 * (double) tiny) * 0x1p-53;
        const double slo = std::nextafter(sum - delta, 0.0), shi = std::nextafter(sum + delta, INFINITY);
        const double u = std::generate_canonical<double, std::numeric_limits<double>::digits>(peek);
        size_t H = std::min<size_t>(LT, 32);
        for (;;) {
            pre.assign(A.begin(), A.end());
            std::partial_sort(pre.begin(), pre.begin() + H, pre.end(), cmp_logit_desc);
            double acc_l = 0.0, acc_h = 0.0;
            size_t il = SIZE_MAX, ih = SIZE_MAX;
            for (size_t i = 0; i < H; ++i) {
                const float p2 = pre[i].p / Z2;
                const double ql = (double) p2 / slo;
                const double qh = (double) p2 / shi;
                acc_l = (i == 0) ? ql : acc_l + ql;
                acc_h = (i == 0) ? qh : acc_h + qh;
                const bool last = i + 1 == tsize;
                if (il == SIZE_MAX && !((last ? 1.0 : acc_l) < u)) {
                    il = i;
                }
                if (!((last ? 1.0 : acc_h) < u)) {
                    ih = i;
                    break;
                }
            }
            if (ih == SIZE_MAX) {
                if (H < LT) {
                    H = std::min(LT, H * 8);
                    continue;
                }
                stats.why[6]++;     // the draw lands below the head
                return false;
            }
            if (il != ih) {
                stats.why[7]++;     // too close to call
                return false;
            }
            idx = ih;
            break;
        }
    }
    // equal logits at the drawn position: llama.cpp's order decides the token
    size_t eq = 0;
    for (size_t j = 0; j < a; ++j) {
        eq += A[j].logit == pre[idx].logit;
    }
    if (eq > 1) {
        stats.why[1]++;
        if (!fix_tie_order(pre, idx + 1, W, n, div, t, n)) {
            return false;
        }
    }
    if (tsize >= 2) {
        rng_miro = peek;
    }
    const float p_idx = pre[idx].p / Z2;
    float observed_surprise = -log2f(p_idx);
    float ee = observed_surprise - cfg.tau;
    mu = mu - cfg.eta * ee;
    out = pre[idx].id;
    return true;
}

inline llama_token Engine::step_mirostat() {
    const float temp = cfg.temp;
    const bool temp_empty = (temp == 1.0f);
    if (temp_empty || temp > 0.0f) {
        llama_token tok;
        if (fast_miro(temp_empty ? 1.0f : temp, !temp_empty, tok)) {
            return tok;
        }
    }
    materialize();
    if (!temp_empty) {
        port_temp_impl(&st.arr, temp);
    }
    if (cfg.mirostat == 1) {
        port_mirostat(&st.arr, cfg.n_vocab, cfg.tau, cfg.eta, 100, mu, rng_miro);
    } else {
        port_mirostat_v2(&st.arr, cfg.tau, cfg.eta, mu, rng_miro);
    }
    return st.arr.data[st.arr.selected].id;
}

} // namespace lgfs
