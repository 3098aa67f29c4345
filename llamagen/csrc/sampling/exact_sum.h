// Exact sequential sums: s = s + x in float or double, bit for bit, without adding in order.
// Invariant: while s stays in one binade every addition rounds x to s's ulp grid whatever came
// before, so a block adds as a sum of per-element roundings; ties and binade changes run in order.
#pragma once

#include "simd.h"
#include "types.h"

namespace lgfs {

// exact sequential sums: s = s + x over a sequence, in Acc (float or double), x floats >= 0

template <typename Acc> struct Grid;

template <> struct Grid<float> {
    static constexpr uint64_t LIMIT = 1ULL << 24;
    // s >= 0; grid exponent G and s in grid units
    static inline bool of(float s, int & G, uint64_t & units) {
        int ex;
        if (s == 0.0f) {
            G = -149;
            units = 0;
            return true;
        }
        std::frexp(s, &ex);
        int E = std::max(ex - 1, -126);
        G = E - 23;
        units = (uint64_t) std::ldexp((double) s, -G);
        return true;
    }
    static inline float make(uint64_t units, int G) { return (float) std::ldexp((double) units, G); }
    static constexpr int KMIN = 0;      // p larger than the grid by 2^-KMIN: fail
};

template <> struct Grid<double> {
    static constexpr uint64_t LIMIT = 1ULL << 53;
    static inline bool of(double s, int & G, uint64_t & units) {
        int ex;
        if (s == 0.0) {
            return false;
        }
        std::frexp(s, &ex);
        G = (ex - 1) - 52;
        units = (uint64_t) std::ldexp(s, -G);
        return true;
    }
    static inline double make(uint64_t units, int G) { return std::ldexp((double) units, G); }
    static constexpr int KMIN = -29;
};

// scalar: units of p (float, >= 0) on grid 2^G with round-to-nearest; tie/fail flags
template <typename Acc>
static inline uint64_t grid_units(float p, int G, bool & tie, bool & fail) {
    uint32_t b;
    std::memcpy(&b, &p, 4);
    int e = (int) (b >> 23);
    uint64_t M = b & 0x7fffff;
    if (e > 0) {
        M |= 0x800000;
    }
    int k = (G + 150) - std::max(e, 1);
    if (k <= 0) {
        if (M != 0 && k < Grid<Acc>::KMIN) {
            fail = true;
            return 0;
        }
        return M << (-k);
    }
    if (k > 25) {
        k = 25;
    }
    uint64_t q = M >> k, rem = M & ((1ULL << k) - 1), half = 1ULL << (k - 1);
    if (rem == half) {
        tie = true;
    }
    return q + (rem > half ? 1 : 0);
}

#ifdef LGFS_X86
// One 16-float vector of p (>= 0) rounded to the grid 2^G of the running sum: r = RN(p) as exact
// multiples of 2^G in Acc lanes (fl(fl(p + C) - C), C = 1.5 * 2^(G + mantissa bits)).  Flags a
// p that is not small against the binade (fail) and exact half-way cases (tie: their rounding
// depends on the running sum's last bit).
LGFS_AVX512 static inline __m512 round16_f32(__m512 p, __m512 C, __m512 half, __m512 big, __mmask16 & bad) {
    __m512 r = _mm512_sub_ps(_mm512_add_ps(p, C), C);
    __m512 diff = _mm512_abs_ps(_mm512_sub_ps(p, r));
    bad |= _mm512_cmp_ps_mask(diff, half, _CMP_EQ_OQ) | _mm512_cmp_ps_mask(p, big, _CMP_GE_OQ);
    return r;
}

// double version: half-way cases are resolved afterwards (see full_exp_sum_avx512): tie gets
// their lanes, up the lanes rounded down (p > r), par the parity of r in grid units
LGFS_AVX512 static inline __m512d round8_f64(__m512d p, __m512d C, __m512d half, __m512d big, __m512d inv_g,
                                             __mmask8 & bad, __mmask8 & tie, __mmask8 & up, __mmask8 & par) {
    __m512d r = _mm512_sub_pd(_mm512_add_pd(p, C), C);
    __m512d dif = _mm512_sub_pd(p, r);
    tie = _mm512_cmp_pd_mask(_mm512_abs_pd(dif), half, _CMP_EQ_OQ);
    up = _mm512_cmp_pd_mask(dif, _mm512_setzero_pd(), _CMP_GT_OQ);
    bad |= _mm512_cmp_pd_mask(p, big, _CMP_GE_OQ);
    __m512i q = _mm512_cvtpd_epu64(_mm512_mul_pd(r, inv_g));
    par = _mm512_test_epi64_mask(q, _mm512_set1_epi64(1));
    return r;
}

// s + (the values of v, in any order) as a sequential float sum: possible without knowing the
// order when every value rounds on s's grid without a tie and the sum stays in s's binade
LGFS_AVX512 static bool order_free_sum_avx512(float s, const float * v, size_t m, float & out) {
    int G;
    uint64_t units;
    Grid<float>::of(s, G, units);
    const __m512 C = _mm512_set1_ps((float) std::ldexp(1.5, G + 23));
    const __m512 half = _mm512_set1_ps((float) std::ldexp(1.0, G - 1));
    const __m512 big = _mm512_set1_ps((float) std::ldexp(1.0, G + 22));
    const double lim = std::ldexp(1.0, G + 24);
    double T = 0.0;       // exact: multiples of 2^G far below 2^53 of them
    size_t j = 0;
    for (; j + 64 <= m; j += 64) {
        __mmask16 bad = 0;
        __m512 acc = _mm512_setzero_ps();
        for (int q = 0; q < 4; ++q) {
            acc = _mm512_add_ps(acc, round16_f32(_mm512_loadu_ps(v + j + 16 * q), C, half, big, bad));
        }
        if (bad) {
            return false;
        }
        T += (double) _mm512_reduce_add_ps(acc);    // each chunk's sum is < 2^(G+28): exact
        if ((double) s + T >= lim) {
            return false;
        }
    }
    bool tie = false, fail = false;
    uint64_t Tt = 0;
    for (; j < m; ++j) {
        Tt += grid_units<float>(v[j], G, tie, fail);
    }
    if (tie || fail) {
        return false;
    }
    const double tot = (double) s + T + std::ldexp((double) Tt, G);
    if (tot >= lim) {
        return false;
    }
    out = (float) tot;
    return true;
}

#endif

static bool order_free_sum(float s, const float * v, size_t m, float & out) {
#ifdef LGFS_X86
    if (cpu_has_avx512()) {
        return order_free_sum_avx512(s, v, m, out);
    }
#endif
    int G;
    uint64_t units;
    Grid<float>::of(s, G, units);
    bool tie = false, fail = false;
    uint64_t T = 0;
    for (size_t j = 0; j < m; ++j) {
        T += grid_units<float>(v[j], G, tie, fail);
    }
    if (tie || fail || units + T >= Grid<float>::LIMIT) {
        return false;
    }
    out = Grid<float>::make(units + T, G);
    return true;
}

// s + the values val[j] of every j with key[j] < cut, added one by one in descending order of
// key (llama.cpp's entropy: terms -p log p in descending order of p; equal keys have equal
// values), for 0 < key < 2^-8.  The tail is grouped in buckets of the key's exponent and top 3
// mantissa bits (a counting sort); each bucket, in descending order, is added without knowing
// its inner order when order_free_sum can, else sorted and added one by one.
static float seq_sum_desc_tail(float s, const float * key, const float * val, size_t m, float cut, Scratch & S) {
    const int SHIFT = 20;
    const size_t NB = (size_t) 1 << (31 - SHIFT);
    std::vector<uint32_t> & cnt = S.bcount;
    cnt.assign(NB + 1, 0);
    for (size_t j = 0; j < m; ++j) {
        if (key[j] < cut) {
            uint32_t b;
            std::memcpy(&b, &key[j], 4);
            cnt[(b >> SHIFT) + 1]++;
        }
    }
    size_t total = 0;
    for (size_t b = 1; b <= NB; ++b) {      // cnt[b]: where bucket b starts (ascending key)
        total += cnt[b];
        cnt[b] = (uint32_t) total;
    }
    std::vector<int32_t> & ord = S.border;
    ord.resize(total);
    for (size_t j = 0; j < m; ++j) {
        if (key[j] < cut) {
            uint32_t b;
            std::memcpy(&b, &key[j], 4);
            ord[cnt[b >> SHIFT]++] = (int32_t) j;
        }
    }
    // now cnt[b] is where bucket b ends; walk the buckets from the largest keys down
    std::vector<float> & v = S.bval;
    v.resize(total);
    size_t end = total;
    for (size_t b = NB; b-- > 0 && end > 0;) {
        const size_t beg = (b == 0) ? 0 : cnt[b - 1];
        if (beg == end) {
            continue;
        }
        const size_t nb = end - beg;
        for (size_t i = 0; i < nb; ++i) {
            v[i] = val[ord[beg + i]];
        }
        float out;
        if (s > 0.0f && order_free_sum(s, v.data(), nb, out)) {
            s = out;
        } else {
            int32_t * o = ord.data() + beg;
            std::sort(o, o + nb, [key](int32_t a, int32_t c) { return key[a] > key[c]; });
            for (size_t i = 0; i < nb; ++i) {
                s += val[o[i]];
            }
        }
        end = beg;
    }
    return s;
}

// the sequential float sum of v (values >= 0) in descending order; v is reordered.  The large
// values are sorted and summed in order; the rest is added order-free when possible (see
// order_free_sum), else the sorted part grows (the rounding ties that defeat the order-free sum
// are likeliest among the larger values).
static float desc_seq_sum(float * v, size_t m) {
    static const auto gt = [](float a, float b) { return a > b; };
    float s = 0.0f;
    size_t h = 0;
    for (float cut = 0x1p-9f;; cut *= 0x1p-5f) {
        float * mid = std::partition(v + h, v + m, [cut](float a) { return a >= cut; });
        std::sort(v + h, mid, gt);
        const size_t h2 = (size_t) (mid - v);
        for (size_t i = h; i < h2; ++i) {
            s += v[i];
        }
        h = h2;
        float out;
        if (h == m) {
            return s;
        }
        if (h > 0 && order_free_sum(s, mid, m - h, out)) {
            return out;
        }
        if (cut < 1e-30f) {
            std::sort(mid, v + m, gt);
            for (size_t i = h; i < m; ++i) {
                s += v[i];
            }
            return s;
        }
    }
}

// 2^k as double / float (k within the normal range), the binade exponent of a normal float
static inline double pow2d(int k) {
    const uint64_t b = (uint64_t) (k + 1023) << 52;
    double d;
    std::memcpy(&d, &b, 8);
    return d;
}
static inline float pow2f(int k) {
    const uint32_t b = (uint32_t) (k + 127) << 23;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}
static inline int binade_of(float x) {
    uint32_t b;
    std::memcpy(&b, &x, 4);
    return (int) ((b >> 23) & 0xff) - 127;
}

} // namespace lgfs
