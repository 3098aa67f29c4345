// Selection over the raw logits: max/min scans, gathers, top-k, the k-th largest, sorted prefixes.
// Invariant: where equal logits make the order matter, the order is llama.cpp's own
// (std::partial_sort's heap for k <= 128, its 128-bucket sort above), or the caller is told.
#pragma once

#include "ports.h"
#include "simd.h"
#include "types.h"

namespace lgfs {

// FULL-state kernels over a float array W of n logits

struct MaxMin {
    float max;
    float min;
    bool nan;
};

// r with one more value v (a NaN sets r.nan; std::max / std::min keep r's values then)
static inline void max_min_take(MaxMin & r, float v) {
    if (v != v) {
        r.nan = true;
    }
    r.max = std::max(r.max, v);
    r.min = std::min(r.min, v);
}

static MaxMin scan_max_min_scalar(const float * W, size_t n) {
    MaxMin r{W[0], W[0], false};
    for (size_t i = 0; i < n; ++i) {
        max_min_take(r, W[i]);
    }
    return r;
}

#ifdef LGFS_X86
LGFS_AVX512 static MaxMin scan_max_min_avx512(const float * W, size_t n) {
    __m512 mx = _mm512_set1_ps(-INFINITY), mn = _mm512_set1_ps(INFINITY);
    __m512 mx2 = mx, mn2 = mn;
    __mmask16 nan = 0;
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512 a = _mm512_loadu_ps(W + i), b = _mm512_loadu_ps(W + i + 16);
        nan |= _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q);
        mx = _mm512_max_ps(mx, a);
        mn = _mm512_min_ps(mn, a);
        mx2 = _mm512_max_ps(mx2, b);
        mn2 = _mm512_min_ps(mn2, b);
    }
    MaxMin r;
    r.max = _mm512_reduce_max_ps(_mm512_max_ps(mx, mx2));
    r.min = _mm512_reduce_min_ps(_mm512_min_ps(mn, mn2));
    r.nan = nan != 0;
    for (; i < n; ++i) {
        max_min_take(r, W[i]);
    }
    return r;
}
#endif

static inline MaxMin scan_max_min(const float * W, size_t n) {
#ifdef LGFS_X86
    if (cpu_has_avx512()) {
        return scan_max_min_avx512(W, n);
    }
#endif
    return scan_max_min_scalar(W, n);
}

// top-k (k <= 128) exactly as std::partial_sort(data, data + k, data + n, comp) leaves it
static void topk_heap_scalar(const float * W, size_t n, int k, tdata * H) {
    for (int i = 0; i < k; ++i) {
        H[i] = tdata{(llama_token) i, W[i], 0.0f};
    }
    std::make_heap(H, H + k, cmp_logit_desc);
    for (size_t i = k; i < n; ++i) {
        if (W[i] > H[0].logit) {
            H[k] = tdata{(llama_token) i, W[i], 0.0f};
            std::pop_heap(H, H + k + 1, cmp_logit_desc);
        }
    }
    std::sort_heap(H, H + k, cmp_logit_desc);
}

#ifdef LGFS_X86
LGFS_AVX512 static void topk_heap_avx512(const float * W, size_t n, int k, tdata * H) {
    for (int i = 0; i < k; ++i) {
        H[i] = tdata{(llama_token) i, W[i], 0.0f};
    }
    std::make_heap(H, H + k, cmp_logit_desc);
    size_t i = k;
    for (; i < n && (i & 15); ++i) {
        if (W[i] > H[0].logit) {
            H[k] = tdata{(llama_token) i, W[i], 0.0f};
            std::pop_heap(H, H + k + 1, cmp_logit_desc);
        }
    }
    __m512 th = _mm512_set1_ps(H[0].logit);
    for (; i + 64 <= n; i += 64) {
        __m512 a = _mm512_loadu_ps(W + i), b = _mm512_loadu_ps(W + i + 16);
        __m512 c = _mm512_loadu_ps(W + i + 32), d = _mm512_loadu_ps(W + i + 48);
        uint64_t m = (uint64_t) _mm512_cmp_ps_mask(a, th, _CMP_GT_OQ)
                   | ((uint64_t) _mm512_cmp_ps_mask(b, th, _CMP_GT_OQ) << 16)
                   | ((uint64_t) _mm512_cmp_ps_mask(c, th, _CMP_GT_OQ) << 32)
                   | ((uint64_t) _mm512_cmp_ps_mask(d, th, _CMP_GT_OQ) << 48);
        if (m == 0) {
            continue;
        }
        while (m) {
            int j = __builtin_ctzll(m);
            m &= m - 1;
            size_t idx = i + j;
            if (W[idx] > H[0].logit) {
                H[k] = tdata{(llama_token) idx, W[idx], 0.0f};
                std::pop_heap(H, H + k + 1, cmp_logit_desc);
            }
        }
        th = _mm512_set1_ps(H[0].logit);
    }
    for (; i < n; ++i) {
        if (W[i] > H[0].logit) {
            H[k] = tdata{(llama_token) i, W[i], 0.0f};
            std::pop_heap(H, H + k + 1, cmp_logit_desc);
        }
    }
    std::sort_heap(H, H + k, cmp_logit_desc);
}
#endif

static inline void topk_heap(const float * W, size_t n, int k, tdata * H) {
#ifdef LGFS_X86
    if (cpu_has_avx512()) {
        topk_heap_avx512(W, n, k, H);
        return;
    }
#endif
    topk_heap_scalar(W, n, k, H);
}

// ids i (in id order) with W[i] >= t (GE) or W[i] < t (!GE); out gets room for n + 16 (a
// compressed vector is stored whole)
template <bool GE>
static inline bool gather_keeps(float w, float t) { return GE ? w >= t : w < t; }

#ifdef LGFS_X86
template <bool GE>
LGFS_AVX512 static size_t gather_cmp_avx512(const float * W, size_t n, float t, int32_t * out) {
    size_t cnt = 0, i = 0;
    __m512 th = _mm512_set1_ps(t);
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    for (; i + 16 <= n; i += 16) {
        __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(W + i), th, GE ? _CMP_GE_OQ : _CMP_LT_OQ);
        if (m) {
            _mm512_storeu_si512((void *) (out + cnt), _mm512_maskz_compress_epi32(m, idx));
            cnt += (size_t) __builtin_popcount((unsigned) m);
        }
        idx = _mm512_add_epi32(idx, step);
    }
    for (; i < n; ++i) {
        if (gather_keeps<GE>(W[i], t)) {
            out[cnt++] = (int32_t) i;
        }
    }
    return cnt;
}
#endif

template <bool GE>
static size_t gather_cmp(const float * W, size_t n, float t, std::vector<int32_t> & out) {
    if (out.size() < n + 16) {
        out.resize(n + 16);
    }
#ifdef LGFS_X86
    if (cpu_has_avx512()) {
        return gather_cmp_avx512<GE>(W, n, t, out.data());
    }
#endif
    size_t cnt = 0;
    for (size_t i = 0; i < n; ++i) {
        if (gather_keeps<GE>(W[i], t)) {
            out[cnt++] = (int32_t) i;
        }
    }
    return cnt;
}

static size_t gather_ge(const float * W, size_t n, float t, std::vector<int32_t> & out) {
    return gather_cmp<true>(W, n, t, out);
}

static size_t gather_lt(const float * W, size_t n, float t, std::vector<int32_t> & out) {
    return gather_cmp<false>(W, n, t, out);
}

#ifdef LGFS_X86
// val[i] for the i (in id order) with key[i] < t, stored contiguously in out (room for m + 16)
LGFS_AVX512 static size_t compress_lt_avx512(const float * key, const float * val, size_t m, float t,
                                             float * out) {
    size_t cnt = 0, i = 0;
    __m512 th = _mm512_set1_ps(t);
    for (; i + 16 <= m; i += 16) {
        __mmask16 k = _mm512_cmp_ps_mask(_mm512_loadu_ps(key + i), th, _CMP_LT_OQ);
        _mm512_mask_compressstoreu_ps(out + cnt, k, _mm512_loadu_ps(val + i));
        cnt += (size_t) __builtin_popcount((unsigned) k);
    }
    for (; i < m; ++i) {
        if (key[i] < t) {
            out[cnt++] = val[i];
        }
    }
    return cnt;
}
#endif

static size_t compress_lt(const float * key, const float * val, size_t m, float t, float * out) {
#ifdef LGFS_X86
    if (cpu_has_avx512()) {
        return compress_lt_avx512(key, val, m, t, out);
    }
#endif
    size_t cnt = 0;
    for (size_t i = 0; i < m; ++i) {
        if (key[i] < t) {
            out[cnt++] = val[i];
        }
    }
    return cnt;
}

// the k-th largest (k >= 1) of W (no NaN): a histogram of the top 12 bits of an order-preserving
// key, then a selection inside the bucket that holds it
static float kth_largest(const float * W, size_t n, size_t k, std::vector<float> & buf) {
    auto key = [](float f) {
        uint32_t b;
        std::memcpy(&b, &f, 4);
        return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    };
    std::vector<uint32_t> hist(4096, 0);
    for (size_t i = 0; i < n; ++i) {
        hist[key(W[i]) >> 20]++;
    }
    size_t above = 0;
    int b = 4095;
    for (; b > 0; --b) {
        if (above + hist[b] >= k) {
            break;
        }
        above += hist[b];
    }
    buf.clear();
    for (size_t i = 0; i < n; ++i) {
        if ((int) (key(W[i]) >> 20) == b) {
            buf.push_back(W[i]);
        }
    }
    const size_t r = k - above - 1;
    std::nth_element(buf.begin(), buf.begin() + r, buf.end(), [](float x, float y) { return x > y; });
    return buf[r];
}

// scratch().pre <- at least `need` (or all) of the largest W values, sorted descending
// (order among equal values unspecified).  False if that is not possible cheaply.
static inline bool sorted_prefix_by_value(const float * W, size_t n, size_t need, float lo_hint = NAN) {
    Scratch & S = scratch();
    MaxMin mm = scan_max_min(W, n);
    if (mm.nan || !std::isfinite(mm.max)) {
        return false;
    }
    float t = std::isnan(lo_hint) ? mm.max - 8.0f : lo_hint;
    size_t cnt = 0;
    for (int it = 0; it < 12; ++it) {
        cnt = gather_ge(W, n, t, S.gidx);
        if (cnt >= need || cnt == n) {
            break;
        }
        float span = mm.max - t;
        t = mm.max - std::max(2.0f * span, 1.0f);
        if (it == 11 || t < mm.min) {
            t = -INFINITY;
        }
    }
    if (cnt < std::min(need, n)) {
        cnt = gather_ge(W, n, -INFINITY, S.gidx);
        if (cnt < std::min(need, n)) {
            return false;
        }
    }
    S.pre.resize(cnt);
    for (size_t j = 0; j < cnt; ++j) {
        const int32_t id = S.gidx[j];
        S.pre[j] = tdata{id, W[id], 0.0f};
    }
    if (need < cnt) {
        std::partial_sort(S.pre.begin(), S.pre.begin() + need, S.pre.end(), cmp_logit_desc);
        S.pre.resize(need);
    } else {
        std::sort(S.pre.begin(), S.pre.end(), cmp_logit_desc);
    }
    return true;
}

// all W >= t, sorted descending, into scratch().pre (unordered ties)
static inline size_t gather_sorted(const float * W, size_t n, float t) {
    Scratch & S = scratch();
    size_t cnt = gather_ge(W, n, t, S.gidx);
    S.pre.resize(cnt);
    for (size_t j = 0; j < cnt; ++j) {
        const int32_t id = S.gidx[j];
        S.pre[j] = tdata{id, W[id], 0.0f};
    }
    std::sort(S.pre.begin(), S.pre.end(), cmp_logit_desc);
    return cnt;
}

// llama.cpp's exact candidate order for the top of the vocabulary when equal logits make it
// matter: llama_token_data_array_partial_sort(cur, npartial) buckets the logits (128 buckets
// over [-10, 10]), std::sorts every bucket above the one where npartial is reached and
// std::partial_sorts that one; the order inside a bucket depends on all of its elements (in
// id order).  Writes to `out` the exact sorted order of every element whose bucket is at
// least the bucket of x_last (x = W or W / t); false if that cannot be done.
static inline bool exact_bucket_order(const float * W, size_t n, bool div, float t, float x_last,
                                      size_t npartial, std::vector<tdata> & out) {
    if (!(std::fabs(x_last) < 1e8f)) {
        return false;
    }
    const int bL = bucket_of(x_last);
    Scratch & S = scratch();
    size_t cnt;
    if (bL == 0) {
        cnt = gather_ge(W, n, -INFINITY, S.gidx);
    } else {
        const double edge = ((double) bL - (double) BK_INTER) / (double) BK_SCALE - 0.01;
        const double tw = div ? edge * (double) t : edge;
        cnt = gather_ge(W, n, (float) (tw - 1e-5 * (std::fabs(tw) + 1.0)), S.gidx);
    }
    int histo[BK_N] = {0};
    std::vector<tdata> & tmp = S.tnew;
    tmp.clear();
    std::vector<int> & bidx = S.ibuf;
    bidx.clear();
    for (size_t j = 0; j < cnt; ++j) {
        const int32_t id = S.gidx[j];
        const float x = div ? W[id] / t : W[id];
        const int b = bucket_of(x);
        if (b >= bL) {
            tmp.push_back(tdata{id, x, 0.0f});
            bidx.push_back(b);
            ++histo[b];
        }
    }
    const size_t m = tmp.size();
    // llama.cpp's ib for npartial (known only if it lies within the gathered buckets)
    int ib = -1;
    size_t nhave = 0;
    for (int j = BK_N - 1; j >= bL; --j) {
        nhave += histo[j];
        if (nhave >= npartial) {
            ib = j;
            break;
        }
    }
    if (ib < 0 && m == n) {
        return false;   // cannot happen (npartial <= n)
    }
    out.resize(m);
    tdata * ptrs[BK_N];
    tdata * ptr = out.data();
    for (int j = BK_N - 1; j >= bL; --j) {
        ptrs[j] = ptr;
        ptr += histo[j];
    }
    for (size_t j = 0; j < m; ++j) {
        *ptrs[bidx[j]]++ = tmp[j];
    }
    ptr = out.data();
    size_t ndone = 0;
    for (int j = BK_N - 1; j >= bL; --j) {
        if (j == ib) {
            std::partial_sort(ptr, ptr + (npartial - ndone), ptr + histo[j], cmp_logit_desc);
            out.resize(npartial);
            return true;
        }
        std::sort(ptr, ptr + histo[j], cmp_logit_desc);
        ptr += histo[j];
        ndone += histo[j];
    }
    return true;
}

// replace pre[0..len) by llama.cpp's exact order (same multiset of values, so sums and
// probabilities computed from pre stay valid); npartial as in exact_bucket_order
static inline bool fix_tie_order(std::vector<tdata> & pre, size_t len, const float * W, size_t n,
                                 bool div, float t, size_t npartial) {
    if (len == 0) {
        return true;
    }
    if (npartial <= 128 || n <= 128) {
        return false;   // llama.cpp uses std::partial_sort over the whole array there
    }
    std::vector<tdata> & ex = scratch().res;
    if (!exact_bucket_order(W, n, div, t, pre[len - 1].logit, npartial, ex) || ex.size() < len) {
        return false;
    }
    for (size_t i = 0; i < len; ++i) {
        if (ex[i].logit != pre[i].logit) {
            return false;   // not the same sequence of values: give up (exact port)
        }
        const float p = pre[i].p;
        pre[i] = ex[i];
        pre[i].p = p;
    }
    return true;
}

} // namespace lgfs
