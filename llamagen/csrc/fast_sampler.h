// llamagen's own sampling engine: the same token as llama.cpp's sampler chain, much faster.
//
// The engine emulates the chain that llamagen builds (llamagen/_sampling.pxi, llama.cpp's own
// order): logit_bias -> penalties -> DRY -> top_n_sigma -> top_k -> typical -> top_p -> min_p ->
// XTC -> temperature -> dist, or temperature -> mirostat 1/2.  It never builds the 262k-entry
// candidate array unless it must: while the candidates are still "the whole vocabulary in id
// order" (FULL state) every sampler has an O(n) vectorized path over the raw logits that computes
// the same result as llama.cpp's code:
//
//  * float operations that decide a token are the ones llama.cpp performs, in the same order.
//    Sequential float/double sums over the vocabulary are reproduced bit for bit with an exact
//    "grid" decomposition: while the running sum s stays in one binade, s + x rounds to
//    s + RN_ulp(s)(x), so a block's contribution is an integer sum of per-element roundings (order
//    independent); blocks where the binade changes or a rounding tie occurs run sequentially.
//  * expf is glibc's algorithm (with or without FMA, chosen by a self-test against the libm in
//    the process at start-up), vectorized: bit-identical to the expf llama.cpp calls.
//  * sorts: llama.cpp's top-k is std::partial_sort (a heap select) or its 128-bucket sort; the
//    candidate order among equal logits depends on those algorithms.  top_k <= 128 replays the
//    heap select exactly (skipping elements it would skip, 16 at a time).  Elsewhere the engine
//    sorts only the prefix it needs and checks that the prefix has no equal keys where the order
//    matters; when it has (rare), the step falls back to the exact port below.
//
// Whenever a fast path's precondition does not hold (ties, NaN, huge logits, probabilities that
// can underflow to 0, ...), the candidates are materialized and the step runs through a line-by-
// line port of llama.cpp's implementation (ARRAY state), which is exact by construction.
//
// State (RNGs, mirostat mu, penalty counts) is the engine's own, advanced exactly as llama.cpp's
// samplers advance theirs.  DRY is delegated to llama.cpp's own DRY sampler object, applied to a
// small probe array of the tokens it can penalize.
//
// Exactness claims hold for libstdc++ (the std::sort / std::partial_sort / <random> algorithms
// are the ones llama.cpp was compiled with) and IEEE float without FMA contraction in this
// translation unit; fast_sampler_supported() reports whether this build can make that claim.

#pragma once

#include "llama.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define LGFS_X86 1
#define LGFS_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
#endif

namespace lgfs {

typedef llama_token_data tdata;

#if defined(__GLIBCXX__)
static inline bool fast_sampler_supported() { return true; }
#else
static inline bool fast_sampler_supported() { return false; }
#endif

// ------------------------------------------------------------------------------------------
// thread-local scratch (grows to O(n_vocab) once per thread, never per token)

struct Scratch {
    std::vector<float> work;          // the FULL state's edited logits
    std::vector<int32_t> gidx;        // gathered ids
    std::vector<tdata> pre;           // sorted prefixes
    std::vector<tdata> abuf;          // small ARRAY states
    std::vector<float> f1, f2, f3;
    std::vector<double> d1;
    std::vector<size_t> s1;
    std::vector<int> ibuf;            // port: bucket index
    std::vector<tdata> res;           // port: partial-sort result
    std::vector<tdata> tnew;          // port: typical output
    std::vector<unsigned char> seen;
    std::vector<tdata> probe;
    std::vector<double> chunk_end;
    std::vector<float> masked;        // grammar-masked logits
    std::vector<tdata> gacc;          // grammar: accepted candidates
    std::vector<int32_t> gnext;       // grammar: the next level of the prefix tree
    std::vector<int32_t> wsel;        // typical: the candidates inside the score window
    std::vector<float> tm;            // typical: entropy terms
    std::vector<uint32_t> bcount;     // typical: bucket counts of the entropy tail
    std::vector<int32_t> border;      // typical: tail indices grouped by bucket
    std::vector<float> bval;          // typical: one bucket's terms
    std::vector<tdata> ma;            // mirostat: the head of the distribution
    std::vector<float> mv;            // mirostat: values to sum
};

static inline Scratch & scratch() {
    static thread_local Scratch s;
    return s;
}

struct Arr {                          // mirrors llama_token_data_array
    tdata * data;
    size_t size;
    int64_t selected;
    bool sorted;
};

static inline bool cmp_logit_desc(const tdata & a, const tdata & b) { return a.logit > b.logit; }

// ------------------------------------------------------------------------------------------
// exact ports of llama.cpp's helpers (src/llama-sampler.cpp), allocation-free

static constexpr int   BK_N     = 128;
static constexpr float BK_LOW   = -10.0f;
static constexpr float BK_HIGH  =  10.0f;
static constexpr float BK_SCALE = BK_N / (BK_HIGH - BK_LOW);
static constexpr float BK_INTER = -BK_LOW * BK_SCALE;

static inline int bucket_of(float val) {
    int ib = int(BK_SCALE * val + BK_INTER);
    return std::max(0, std::min(BK_N - 1, ib));
}

// llama_token_data_array_partial_sort
static void port_partial_sort(const Arr & cur, int npartial, std::vector<tdata> & res) {
    static const auto comp = [](const tdata & a, const tdata & b) { return a.logit > b.logit; };
    std::vector<int> & bucket_idx = scratch().ibuf;
    bucket_idx.clear();
    int histo[BK_N] = {0};
    tdata * bucket_ptrs[BK_N];
    bucket_idx.reserve(cur.size);
    for (int i = 0; i < (int) cur.size; ++i) {
        const float val = cur.data[i].logit;
        int ib = int(BK_SCALE * val + BK_INTER);
        ib = std::max(0, std::min(BK_N - 1, ib));
        bucket_idx.push_back(ib);
        ++histo[ib];
    }
    int nhave = 0;
    int ib = BK_N - 1;
    for (; ib >= 0; --ib) {
        nhave += histo[ib];
        if (nhave >= npartial) {
            break;
        }
    }
    res.resize(nhave);
    tdata * ptr = res.data();
    int nptr = 0;
    for (int j = BK_N - 1; j >= ib; --j) {
        bucket_ptrs[nptr++] = ptr;
        ptr += histo[j];
    }
    for (int i = 0; i < (int) cur.size; ++i) {
        int j = bucket_idx[i];
        if (j >= ib) {
            *bucket_ptrs[BK_N - 1 - j]++ = cur.data[i];
        }
    }
    ptr = res.data();
    int ndone = 0;
    for (int j = BK_N - 1; j > ib; --j) {
        std::sort(ptr, ptr + histo[j], comp);
        ptr += histo[j];
        ndone += histo[j];
    }
    std::partial_sort(ptr, ptr + npartial - ndone, ptr + histo[ib], comp);
}

// llama_token_data_array_partial_sort_inplace
static void port_partial_sort_inplace(Arr * cur_p, int npartial) {
    static const auto comp = [](const tdata & a, const tdata & b) { return a.logit > b.logit; };
    if (npartial <= 128) {
        std::partial_sort(cur_p->data, cur_p->data + npartial, cur_p->data + cur_p->size, comp);
        cur_p->size = npartial;
        cur_p->sorted = true;
        return;
    }
    std::vector<tdata> & tmp = scratch().res;
    port_partial_sort(*cur_p, npartial, tmp);
    std::copy(tmp.data(), tmp.data() + npartial, cur_p->data);
    cur_p->size = npartial;
    cur_p->sorted = true;
}

static void port_temp_impl(Arr * cur_p, float temp) {
    if (cur_p->size == 0) {
        return;
    }
    if (temp <= 0.0f) {
        size_t max_i = 0;
        float max_l = cur_p->data[0].logit;
        for (size_t i = 1; i < cur_p->size; ++i) {
            if (cur_p->data[i].logit > max_l) {
                cur_p->data[max_i].logit = -INFINITY;
                max_i = i;
                max_l = cur_p->data[i].logit;
            } else {
                cur_p->data[i].logit = -INFINITY;
            }
        }
        return;
    }
    for (size_t i = 0; i < cur_p->size; ++i) {
        cur_p->data[i].logit /= temp;
    }
}

static void port_softmax_impl(Arr * cur_p, bool do_sort) {
    if (do_sort && !cur_p->sorted) {
        port_partial_sort_inplace(cur_p, (int) cur_p->size);
    }
    float max_l = cur_p->data[0].logit;
    if (!cur_p->sorted) {
        for (size_t i = 1; i < cur_p->size; ++i) {
            max_l = std::max(max_l, cur_p->data[i].logit);
        }
    }
    float cum_sum = 0.0f;
    for (size_t i = 0; i < cur_p->size; ++i) {
        float p = expf(cur_p->data[i].logit - max_l);
        cur_p->data[i].p = p;
        cum_sum += p;
    }
    for (size_t i = 0; i < cur_p->size; ++i) {
        cur_p->data[i].p /= cum_sum;
    }
}

static void port_top_k_impl(Arr * cur_p, int32_t k) {
    if (k <= 0) {
        return;
    }
    k = std::min(k, (int) cur_p->size);
    if (!cur_p->sorted) {
        port_partial_sort_inplace(cur_p, k);
    }
    cur_p->size = k;
}

// std::discrete_distribution<int>(p...)(rng) as libstdc++ implements it (llama_sample_dist)
static int port_sample_discrete(const Arr * cur_p, std::mt19937 & rng) {
    const size_t n = cur_p->size;
    if (n < 2) {
        return 0;
    }
    std::vector<double> & cp = scratch().d1;
    cp.resize(n);
    double sum = 0.0;
    for (size_t i = 0; i < n; ++i) {
        sum = sum + (double) cur_p->data[i].p;
    }
    double acc = 0.0;
    for (size_t i = 0; i < n; ++i) {
        const double q = (double) cur_p->data[i].p / sum;
        acc = (i == 0) ? q : acc + q;
        cp[i] = acc;
    }
    cp[n - 1] = 1.0;
    const double u = std::generate_canonical<double, std::numeric_limits<double>::digits>(rng);
    return (int) (std::lower_bound(cp.begin(), cp.end(), u) - cp.begin());
}

static void port_dist(Arr * cur_p, std::mt19937 & rng) {
    if (cur_p->size == 0) {
        cur_p->selected = -1;
        return;
    }
    cur_p->selected = 0;
    std::uniform_real_distribution<double> dist(0.0f, 1.0f);
    if (cur_p->size == 1) {
        dist(rng);
        cur_p->data[0].p = 1.0f;
        return;
    }
    float max_l = cur_p->data[0].logit;
    if (!cur_p->sorted) {
        for (size_t i = 1; i < cur_p->size; ++i) {
            max_l = std::max(max_l, cur_p->data[i].logit);
        }
    }
    double sum_cum = 0.0f;
    for (size_t i = 0; i < cur_p->size; ++i) {
        float p = expf(cur_p->data[i].logit - max_l);
        cur_p->data[i].p = p;
        sum_cum += p;
    }
    const double rnd = dist(rng);
    double sum_run = 0.0f;
    const double sum_tgt = sum_cum * rnd;
    bool found = false;
    for (size_t i = 0; i < cur_p->size; ++i) {
        if (!found) {
            sum_run += cur_p->data[i].p;
            if (sum_run >= sum_tgt) {
                cur_p->selected = i;
                found = true;
            }
        }
        cur_p->data[i].p /= sum_cum;
    }
    if (!found) {
        cur_p->selected = cur_p->size - 1;
    }
}

static void port_top_p(Arr * cur_p, float p, size_t min_keep) {
    if (p >= 1.0f) {
        return;
    }
    port_softmax_impl(cur_p, false);
    size_t k = cur_p->size;
    tdata * pdata = cur_p->data;
    std::vector<tdata> & buf_sort = scratch().pre;
    if (!cur_p->sorted && cur_p->size > 1024) {
        k = std::min<size_t>(256, cur_p->size);
        port_partial_sort(*cur_p, (int) k, buf_sort);
        pdata = buf_sort.data();
    } else if (!cur_p->sorted) {
        port_partial_sort_inplace(cur_p, (int) k);
    }
    float cum_sum = 0.0f;
    size_t last_idx = cur_p->size;
    for (size_t i = 0; i < cur_p->size; ++i) {
        cum_sum += pdata[i].p;
        if (cum_sum >= p && i + 1 >= min_keep) {
            last_idx = i + 1;
            break;
        }
        if (!cur_p->sorted && i == k - 1) {
            k = cur_p->size;
            port_partial_sort(*cur_p, (int) k, buf_sort);
            pdata = buf_sort.data();
        }
    }
    if (!cur_p->sorted) {
        std::copy(buf_sort.data(), buf_sort.data() + last_idx, cur_p->data);
        cur_p->sorted = true;
    }
    cur_p->size = last_idx;
}

static void port_min_p(Arr * cur_p, float p, size_t min_keep) {
    if (p <= 0.0f || !cur_p->size) {
        return;
    }
    bool min_p_applied = false;
    if (!cur_p->sorted) {
        std::vector<tdata> & filtered = scratch().tnew;
        filtered.clear();
        float max_logit = -FLT_MAX;
        for (size_t i = 0; i < cur_p->size; ++i) {
            max_logit = std::max(max_logit, cur_p->data[i].logit);
        }
        const float min_logit = max_logit + logf(p);
        for (size_t i = 0; i < cur_p->size; ++i) {
            if (cur_p->data[i].logit >= min_logit) {
                filtered.push_back(cur_p->data[i]);
            }
        }
        if (!filtered.empty() && filtered.size() >= min_keep) {
            std::copy(filtered.begin(), filtered.end(), cur_p->data);
            cur_p->size = filtered.size();
            min_p_applied = true;
        }
    }
    if (!min_p_applied) {
        if (!cur_p->sorted) {
            port_partial_sort_inplace(cur_p, (int) cur_p->size);
        }
        const float min_logit = cur_p->data[0].logit + logf(p);
        size_t i = 1;
        for (; i < cur_p->size; ++i) {
            if (cur_p->data[i].logit < min_logit && i >= min_keep) {
                break;
            }
        }
        cur_p->size = i;
    }
}

static void port_typical(Arr * cur_p, float p, size_t min_keep) {
    if (p >= 1.0f) {
        return;
    }
    port_softmax_impl(cur_p, true);
    float entropy = 0.0f;
    for (size_t i = 0; i < cur_p->size; ++i) {
        entropy += -cur_p->data[i].p * logf(cur_p->data[i].p);
    }
    std::vector<float> & shifted_scores = scratch().f1;
    shifted_scores.clear();
    for (size_t i = 0; i < cur_p->size; ++i) {
        float shifted_score = fabsf(-logf(cur_p->data[i].p) - entropy);
        shifted_scores.push_back(shifted_score);
    }
    std::vector<size_t> & indices = scratch().s1;
    indices.resize(cur_p->size);
    std::iota(indices.begin(), indices.end(), 0);
    std::sort(indices.begin(), indices.end(), [&](size_t a, size_t b) {
        return shifted_scores[a] < shifted_scores[b];
    });
    float cum_sum = 0.0f;
    size_t last_idx = indices.size();
    for (size_t i = 0; i < indices.size(); ++i) {
        size_t idx = indices[i];
        cum_sum += cur_p->data[idx].p;
        if (cum_sum > p && (min_keep == 0 || i >= min_keep - 1)) {
            last_idx = i + 1;
            break;
        }
    }
    std::vector<tdata> & cur_p_new = scratch().tnew;
    cur_p_new.clear();
    for (size_t i = 0; i < last_idx; ++i) {
        cur_p_new.push_back(cur_p->data[indices[i]]);
    }
    std::copy(cur_p_new.begin(), cur_p_new.end(), cur_p->data);
    cur_p->size = cur_p_new.size();
    cur_p->sorted = false;
}

static void port_top_n_sigma(Arr * cur_p, float n) {
    if (n <= 0.0f || cur_p->size <= 1) {
        return;
    }
    float max = cur_p->data[0].logit;
    float logits_sum = 0;
    size_t valid_count = 0;
    for (size_t i = 0; i < cur_p->size; ++i) {
        if (cur_p->data[i].logit != -INFINITY) {
            max = std::max(max, cur_p->data[i].logit);
            logits_sum += cur_p->data[i].logit;
            valid_count++;
        }
    }
    float mean = valid_count > 0 ? logits_sum / valid_count : 0;
    float acc = 0;
    for (size_t i = 0; i < cur_p->size; ++i) {
        if (cur_p->data[i].logit != -INFINITY) {
            acc += pow(cur_p->data[i].logit - mean, 2);
        }
    }
    float std = valid_count > 0 ? sqrt(acc / valid_count) : 0;
    for (size_t i = 0; i < cur_p->size; ++i) {
        if (cur_p->data[i].logit < max - (n * std)) {
            cur_p->data[i].logit = -INFINITY;
        }
    }
}

static void port_xtc(Arr * cur_p, float probability, float threshold, size_t min_keep, std::mt19937 & rng) {
    if (probability <= 0.0f || threshold > 0.5f || cur_p->size < 2) {
        return;
    }
    std::uniform_real_distribution<float> distribution(0.0f, 1.0f);
    float chance = distribution(rng);
    if (chance > probability) {
        return;
    }
    port_softmax_impl(cur_p, true);
    int pos_last = 0;
    for (size_t i = 0; i < cur_p->size; ++i) {
        if (cur_p->data[i].p >= threshold) {
            pos_last = i;
        } else {
            break;
        }
    }
    if (cur_p->size - pos_last >= min_keep && pos_last > 0) {
        cur_p->data += pos_last;
        cur_p->size -= pos_last;
    }
}

static void port_mirostat(Arr * cur_p, int32_t n_vocab, float tau, float eta, int32_t m, float & mu,
                          std::mt19937 & rng) {
    port_softmax_impl(cur_p, true);
    float s_hat = 0.0;
    float sum_ti_bi = 0.0;
    float sum_ti_sq = 0.0;
    for (size_t i = 0; i < size_t(m - 1) && i < cur_p->size - 1; ++i) {
        float t_i = logf(float(i + 2) / float(i + 1));
        float b_i = logf(cur_p->data[i].p / cur_p->data[i + 1].p);
        sum_ti_bi += t_i * b_i;
        sum_ti_sq += t_i * t_i;
    }
    s_hat = sum_ti_bi / sum_ti_sq;
    float epsilon_hat = s_hat - 1;
    float k = powf((epsilon_hat * powf(2, mu)) / (1 - powf(n_vocab, -epsilon_hat)), 1 / s_hat);
    port_top_k_impl(cur_p, std::max(int(k), 1));
    port_softmax_impl(cur_p, true);
    const int idx = port_sample_discrete(cur_p, rng);
    cur_p->selected = idx;
    float observed_surprise = -log2f(cur_p->data[idx].p);
    float e = observed_surprise - tau;
    mu = mu - eta * e;
}

static void port_mirostat_v2(Arr * cur_p, float tau, float eta, float & mu, std::mt19937 & rng) {
    port_softmax_impl(cur_p, true);
    cur_p->size = std::distance(cur_p->data, std::find_if(cur_p->data, cur_p->data + cur_p->size,
        [&](const tdata & candidate) { return -log2f(candidate.p) > mu; }));
    if (cur_p->size == 0) {
        cur_p->size = 1;
    }
    port_softmax_impl(cur_p, true);
    const int idx = port_sample_discrete(cur_p, rng);
    cur_p->selected = idx;
    float observed_surprise = -log2f(cur_p->data[idx].p);
    float e = observed_surprise - tau;
    mu = mu - eta * e;
}

// ------------------------------------------------------------------------------------------
// glibc's expf (sysdeps/ieee754/flt-32/e_expf.c, EXP2F_TABLE_BITS = 5), vectorized

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

static inline bool cpu_has_avx512() {
    static const int ok = (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                           __builtin_cpu_supports("fma")) ? 1 : 0;
    return ok != 0;
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

// ------------------------------------------------------------------------------------------
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

// exact s + p[0] + p[1] + ... (sequential, in Acc) for a plain array of floats
template <typename Acc>
static Acc exact_sum(Acc s, const float * p, size_t n) {
    size_t i = 0;
    while (i < n) {
        size_t cnt = std::min<size_t>(64, n - i);
        int G;
        uint64_t units;
        bool ok = Grid<Acc>::of(s, G, units);
        if (ok) {
            bool tie = false, fail = false;
            uint64_t T = 0;
            for (size_t j = 0; j < cnt; ++j) {
                T += grid_units<Acc>(p[i + j], G, tie, fail);
            }
            if (!tie && !fail && units + T < Grid<Acc>::LIMIT) {
                s = Grid<Acc>::make(units + T, G);
                i += cnt;
                continue;
            }
        }
        for (size_t j = 0; j < cnt; ++j) {
            s = s + (Acc) p[i + j];
        }
        i += cnt;
    }
    return s;
}

#ifdef LGFS_X86
// vector grid units for 16 floats (>= 0); float accumulator (int32 lanes)
LGFS_AVX512 static inline __m512i units16_f32(__m512 p, __m512i K0, __mmask16 & bad) {
    const __m512i zero = _mm512_setzero_si512();
    const __m512i one = _mm512_set1_epi32(1);
    __m512i b = _mm512_castps_si512(p);
    __m512i e = _mm512_srli_epi32(b, 23);
    __m512i m = _mm512_and_si512(b, _mm512_set1_epi32(0x7fffff));
    __mmask16 norm = _mm512_cmpgt_epi32_mask(e, zero);
    __m512i M = _mm512_mask_or_epi32(m, norm, m, _mm512_set1_epi32(0x800000));
    __m512i k = _mm512_sub_epi32(K0, _mm512_max_epi32(e, one));
    bad |= _mm512_cmplt_epi32_mask(k, zero) & _mm512_test_epi32_mask(M, M);
    __m512i kc = _mm512_min_epi32(_mm512_max_epi32(k, zero), _mm512_set1_epi32(25));
    __m512i pw = _mm512_sllv_epi32(one, kc);
    __m512i q = _mm512_srlv_epi32(M, kc);
    __m512i rem = _mm512_and_si512(M, _mm512_sub_epi32(pw, one));
    __m512i half = _mm512_srli_epi32(pw, 1);
    __mmask16 up = _mm512_cmpgt_epi32_mask(rem, half);
    bad |= _mm512_cmpeq_epi32_mask(rem, half) & _mm512_cmpgt_epi32_mask(kc, zero);
    return _mm512_mask_add_epi32(q, up, q, one);
}

// double accumulator: two 8-lane int64 halves, summed into acc
LGFS_AVX512 static inline void units16_f64(__m512 p, __m512i K0_64, __m512i & acc, __mmask16 & bad) {
    const __m512i zero32 = _mm512_setzero_si512();
    __m512i b = _mm512_castps_si512(p);
    __m512i e = _mm512_srli_epi32(b, 23);
    __m512i m = _mm512_and_si512(b, _mm512_set1_epi32(0x7fffff));
    __mmask16 norm = _mm512_cmpgt_epi32_mask(e, zero32);
    __m512i M = _mm512_mask_or_epi32(m, norm, m, _mm512_set1_epi32(0x800000));
    __m512i Ee = _mm512_max_epi32(e, _mm512_set1_epi32(1));
    for (int h = 0; h < 2; ++h) {
        __m512i M64 = _mm512_cvtepu32_epi64(h == 0 ? _mm512_castsi512_si256(M) : _mm512_extracti64x4_epi64(M, 1));
        __m512i E64 = _mm512_cvtepi32_epi64(h == 0 ? _mm512_castsi512_si256(Ee) : _mm512_extracti64x4_epi64(Ee, 1));
        const __m512i zero = _mm512_setzero_si512();
        const __m512i one = _mm512_set1_epi64(1);
        __m512i k = _mm512_sub_epi64(K0_64, E64);
        __mmask8 nz = _mm512_test_epi64_mask(M64, M64);
        __mmask8 f = _mm512_cmplt_epi64_mask(k, _mm512_set1_epi64(-29)) & nz;
        __m512i left = _mm512_sllv_epi64(M64, _mm512_min_epi64(_mm512_sub_epi64(zero, k), _mm512_set1_epi64(29)));
        __m512i kc = _mm512_min_epi64(_mm512_max_epi64(k, zero), _mm512_set1_epi64(25));
        __m512i pw = _mm512_sllv_epi64(one, kc);
        __m512i q = _mm512_srlv_epi64(M64, kc);
        __m512i rem = _mm512_and_si512(M64, _mm512_sub_epi64(pw, one));
        __m512i half = _mm512_srli_epi64(pw, 1);
        __mmask8 up = _mm512_cmpgt_epi64_mask(rem, half);
        __mmask8 tie = _mm512_cmpeq_epi64_mask(rem, half) & _mm512_cmpgt_epi64_mask(kc, zero);
        __m512i right = _mm512_mask_add_epi64(q, up, q, one);
        __mmask8 pos = _mm512_cmpgt_epi64_mask(k, zero);
        __m512i u = _mm512_mask_blend_epi64(pos, left, right);
        acc = _mm512_add_epi64(acc, u);
        bad |= (__mmask16) ((uint32_t) (f | tie) << (8 * h));
    }
}
#endif

// ------------------------------------------------------------------------------------------
// FULL-state kernels over a float array W of n logits

struct MaxMin {
    float max;
    float min;
    bool nan;
};

static MaxMin scan_max_min_scalar(const float * W, size_t n) {
    MaxMin r{W[0], W[0], false};
    for (size_t i = 0; i < n; ++i) {
        float v = W[i];
        if (v != v) {
            r.nan = true;
        }
        r.max = std::max(r.max, v);
        r.min = std::min(r.min, v);
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
        float v = W[i];
        if (v != v) {
            r.nan = true;
        }
        r.max = std::max(r.max, v);
        r.min = std::min(r.min, v);
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

// approximate Z = sum exp(W - mx) and S = sum exp(W - mx) * (W - mx) over the whole vocabulary
// (relative error ~1e-4: only to pick where fast typical starts looking); false without AVX-512
#ifdef LGFS_X86
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

// val[i] for the i (in id order) with key[i] < t, stored contiguously in out (room for m + 16)
#ifdef LGFS_X86
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

// s + (the values of v, in any order) as a sequential float sum: possible without knowing the
// order when every value rounds on s's grid without a tie and the sum stays in s's binade
#ifdef LGFS_X86
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

#ifdef LGFS_X86
// sum of v rounded to the grid 2^G (chunks of 16), as long as it stays below room; returns the
// number of values consumed, or -1 on a tie / a value too large
LGFS_AVX512 static size_t order_free_sum_d_avx512(const float * v, size_t m, int G, double room, double & T) {
    const __m512d C = _mm512_set1_pd(std::ldexp(1.5, G + 52));
    const __m512d half = _mm512_set1_pd(std::ldexp(1.0, G - 1));
    const __m512d big = _mm512_set1_pd(std::ldexp(1.0, G + 51));
    const __m512d inv = _mm512_set1_pd(std::ldexp(1.0, -G));
    size_t j = 0;
    T = 0.0;
    for (; j + 16 <= m; j += 16) {
        __m512 p = _mm512_loadu_ps(v + j);
        __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(p));
        __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(p), 1)));
        __mmask8 bad = 0, t0, u0, q0, t1, u1, q1;
        __m512d a = _mm512_add_pd(round8_f64(lo, C, half, big, inv, bad, t0, u0, q0),
                                  round8_f64(hi, C, half, big, inv, bad, t1, u1, q1));
        if (bad | t0 | t1) {
            return (size_t) -1;
        }
        T += _mm512_reduce_add_pd(a);
        if (!(T < room)) {
            return (size_t) -1;
        }
    }
    return j;
}
#endif

// the same for a double accumulator (dist's / discrete_distribution's sums of float values)
static bool order_free_sum_d(double s, const float * v, size_t m, double & out) {
    int G;
    uint64_t units;
    if (!Grid<double>::of(s, G, units)) {
        return false;
    }
    const double lim = std::ldexp(1.0, G + 53);
    size_t j = 0;
    double T = 0.0;
#ifdef LGFS_X86
    if (cpu_has_avx512()) {
        j = order_free_sum_d_avx512(v, m, G, lim - s, T);
        if (j == (size_t) -1) {
            return false;
        }
    }
#endif
    bool tie = false, fail = false;
    uint64_t Tt = 0;
    for (; j < m; ++j) {
        Tt += grid_units<double>(v[j], G, tie, fail);
        if (Tt >= (1ULL << 54)) {
            return false;
        }
    }
    if (tie || fail) {
        return false;
    }
    const double add = T + std::ldexp((double) Tt, G);
    if (!(add < lim - s)) {
        return false;
    }
    out = s + add;
    return true;
}

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

// ------------------------------------------------------------------------------------------
// top-n-sigma's sums, as llama.cpp's sequential loops compute them (valid = not -inf):
//   sum: float s += W_i;   acc: float acc += pow(W_i - mean, 2) (a double addition, then float)
// 64 at a time on the running value's grid g = ulp(binade): while every partial sum stays in the
// binade, s + x rounds to s + RN_g(x) (acc: to acc + RN_g(RN_g'(x)), g' = the double ulp), so a
// chunk adds the sum of its roundings whatever the order; chunks with a rounding tie, a value too
// large for the grid or a binade change run sequentially.

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

// ------------------------------------------------------------------------------------------
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

// ------------------------------------------------------------------------------------------
// the vocabulary as a prefix tree of token pieces, for grammar re-samples
//
// llama.cpp's grammar accepts a token when the code points of its piece (the bytes
// llama_token_to_piece gives with special = true, decoded from where the grammar's partial UTF-8
// state left off) can continue the text; it matches them one by one, so a token is rejected
// whenever a token whose piece is a proper prefix of its own is rejected (a partial last
// character is accepted whenever a full one it begins is; an invalid byte sequence is rejected
// with everything that extends it).  End-of-generation tokens are decided apart (accepted iff
// the grammar may end) and grammars that name tokens (<[id]>, <token>) match token ids instead:
// the caller attaches no tree to those.  The tree: each token's parent is the token with the
// longest piece that is a proper prefix of its own.

struct GrammarTrie {
    std::vector<int32_t> roots;       // tokens with no parent
    std::vector<int32_t> kid_start;   // kids of t: kids[kid_start[t] .. kid_start[t + 1])
    std::vector<int32_t> kids;
    std::vector<int32_t> eog;         // end-of-generation tokens (no parent, no kids)
};

static GrammarTrie * grammar_trie_new(const llama_vocab * vocab) {
    const int32_t n = llama_vocab_n_tokens(vocab);
    std::vector<std::string> piece(n);
    std::vector<char> buf(256);
    for (int32_t t = 0; t < n; ++t) {
        int32_t len = llama_token_to_piece(vocab, t, buf.data(), (int32_t) buf.size(), 0, true);
        if (len < 0) {
            buf.resize((size_t) -len);
            len = llama_token_to_piece(vocab, t, buf.data(), (int32_t) buf.size(), 0, true);
        }
        piece[t].assign(buf.data(), (size_t) std::max(len, 0));
    }
    GrammarTrie * T = new GrammarTrie();
    std::unordered_map<std::string_view, int32_t> where;
    where.reserve((size_t) n * 2);
    std::vector<int32_t> parent(n, -1);
    std::vector<unsigned char> eog(n, 0);
    for (int32_t t = 0; t < n; ++t) {
        eog[t] = llama_vocab_is_eog(vocab, t) ? 1 : 0;
        if (eog[t]) {
            T->eog.push_back(t);
        } else if (!piece[t].empty()) {
            where.emplace(std::string_view(piece[t]), t);
        }
    }
    std::vector<int32_t> nkids(n + 1, 0);
    for (int32_t t = 0; t < n; ++t) {
        if (eog[t] || piece[t].empty()) {
            continue;                   // the grammar rejects an empty piece: never asked
        }
        const std::string_view sv(piece[t]);
        for (size_t L = sv.size() - 1; L > 0; --L) {
            auto it = where.find(sv.substr(0, L));
            if (it != where.end()) {
                parent[t] = it->second;
                break;
            }
        }
        if (parent[t] < 0) {
            T->roots.push_back(t);
        } else {
            nkids[parent[t]]++;
        }
    }
    T->kid_start.assign(n + 1, 0);
    for (int32_t t = 0; t < n; ++t) {
        T->kid_start[t + 1] = T->kid_start[t] + nkids[t];
    }
    T->kids.resize(T->kid_start[n]);
    std::vector<int32_t> fill(T->kid_start.begin(), T->kid_start.end() - 1);
    for (int32_t t = 0; t < n; ++t) {
        if (parent[t] >= 0) {
            T->kids[fill[parent[t]]++] = t;
        }
    }
    return T;
}

// ------------------------------------------------------------------------------------------
// the engine

struct Config {
    int32_t n_vocab = 0;
    std::vector<llama_logit_bias> bias;
    int32_t pen_last_n = 0;             // 0: no penalties sampler
    float pen_repeat = 1.0f, pen_freq = 0.0f, pen_present = 0.0f;
    llama_sampler * dry = nullptr;      // llama.cpp's DRY sampler (owned), or none
    int32_t dry_last_n = 0;
    float top_n_sigma = -1.0f;
    int32_t top_k = 0;
    float typical_p = 1.0f, top_p = 1.0f, min_p = 0.0f;
    size_t min_keep = 0;
    bool xtc = false;
    float xtc_p = 0.0f, xtc_t = 0.1f;
    float temp = 0.8f;
    int mirostat = 0;
    float tau = 5.0f, eta = 0.1f;
    uint32_t seed = 0;
    const GrammarTrie * trie = nullptr;     // grammar re-samples walk it (not owned)
};

struct Stats {
    uint64_t steps = 0;
    uint64_t slow = 0;                  // steps where some sampler took the exact port
    uint64_t why[8] = {0};              // why: 1 equal logits where the order matters, 5 dist:
                                        // too close to call from bounded sums (exact sums used),
                                        // 2 typical: the draw landed on tied candidates (exact
                                        // port), 3 typical: no fast path (p underflows to 0, no
                                        // unique order, ...), 6 mirostat: the draw lands below the head, 7 mirostat:
                                        // too close to call (both: exact port)
    uint64_t grammar_partial = 0;       // grammar re-samples decided from the best candidates
    uint64_t grammar_trie = 0;          // grammar re-samples that walked the prefix tree
    uint64_t grammar_full = 0;          // grammar re-samples that asked about every candidate
    uint64_t typical_tail_buckets = 0;  // fast typical: entropy tails summed bucket by bucket
};

class Engine {
public:
    explicit Engine(const Config & c)
        : cfg(c), rng_dist(c.seed), rng_xtc(c.seed), rng_miro(c.seed), mu(2.0f * c.tau) {
        if (cfg.pen_last_n > 0) {
            pen_count.assign(cfg.n_vocab, 0);
            pen_pos.assign(cfg.n_vocab, -1);
            pen_ring.assign(cfg.pen_last_n, 0);
        }
        if (cfg.dry != nullptr && cfg.dry_last_n > 0) {
            dry_ring.assign(cfg.dry_last_n, 0);
        }
        (void) expf_mode();
    }
    ~Engine() {
        if (cfg.dry != nullptr) {
            llama_sampler_free(cfg.dry);
        }
    }
    Engine(const Engine &) = delete;
    Engine & operator=(const Engine &) = delete;

    Stats stats;

    // the samplers that only edit logits, in the chain's order: logit_bias, then (without
    // mirostat) penalties and DRY.  edit() returns the writable copy of the logits (made on first
    // use).
    template <typename F>
    void apply_edits(F & edit) {
        const size_t n = nv();
        if (!cfg.bias.empty()) {
            float * w = edit();
            for (const auto & lb : cfg.bias) {
                if (lb.token >= 0 && (size_t) lb.token < n) {
                    w[lb.token] += lb.bias;
                }
            }
        }
        if (cfg.mirostat != 0) {
            return;
        }
        if (cfg.pen_last_n > 0 && !pen_active.empty()) {
            float * w = edit();
            for (llama_token t : pen_active) {
                const int count = pen_count[t];
                if (w[t] <= 0) {
                    w[t] *= cfg.pen_repeat;
                } else {
                    w[t] /= cfg.pen_repeat;
                }
                w[t] -= float(count) * cfg.pen_freq + float(count > 0) * cfg.pen_present;
            }
        }
        if (cfg.dry != nullptr) {
            apply_dry(edit);
        }
    }

    // apply: the token llama.cpp's chain would select for these logits (state advanced as the
    // chain's apply advances it).  cand: n_vocab entries of scratch for the exact fallback.
    llama_token sample(const float * logits, tdata * cand) {
        const size_t n = (size_t) cfg.n_vocab;
        Scratch & S = scratch();
        st.slow = false;
        st.full = true;
        st.W = logits;
        st.cand = cand;
        st.arr = Arr{nullptr, 0, -1, false};
        st.tdiv_pending = false;
        st.typ_ties = false;
        float * Wm = nullptr;
        auto edit = [&]() -> float * {
            if (Wm == nullptr) {
                if (S.work.size() < n) {
                    S.work.resize(n);
                }
                Wm = S.work.data();
                std::memcpy(Wm, logits, n * sizeof(float));
                st.W = Wm;
            }
            return Wm;
        };
        apply_edits(edit);
        llama_token tok;
        if (cfg.mirostat == 0) {
            if (cfg.top_n_sigma > 0.0f) {
                step_top_n_sigma(edit);
            }
            if (cfg.top_k > 0) {
                step_top_k();
            }
            if (cfg.typical_p < 1.0f) {
                step_typical();
            }
            if (cfg.top_p < 1.0f) {
                step_top_p();
            }
            if (cfg.min_p > 0.0f) {
                step_min_p();
            }
            if (cfg.xtc) {
                step_xtc();
            }
            tok = step_temp_dist();
        } else {
            tok = step_mirostat();
        }
        stats.steps++;
        if (st.slow) {
            stats.slow++;
        }
        return tok;
    }

    // the same, for candidates already in an array in id order (the grammar re-sample: cand holds
    // the grammar-masked logits; it is reused as scratch)
    llama_token sample_from_cand(tdata * cand) {
        std::vector<float> & m = scratch().masked;
        const size_t n = nv();
        if (m.size() < n) {
            m.resize(n);
        }
        for (size_t i = 0; i < n; ++i) {
            m[i] = cand[i].logit;
        }
        return sample(m.data(), cand);
    }

    // The grammar re-sample (the chain's token was rejected).  llama.cpp asks the grammar about
    // every candidate, sets the rejected to -inf and runs the chain again on the whole array.
    // When top_k is the first filter (only logit edits before it: bias, penalties, DRY), the
    // chain's result depends only on the k best accepted candidates; so the grammar is asked
    // about the best candidates by edited logit, in growing rounds, until k of them are accepted.
    // If those k have distinct values, all above every other candidate's, top_k keeps them in the
    // same order whatever the unasked candidates hold, and the chain runs on an array where the
    // unasked are -inf: the same survivors, the same draw.  When the grammar accepts few of the
    // best candidates, the vocabulary's prefix tree finds exactly the accepted set (see
    // GrammarTrie); without a tree (a grammar that names tokens) every candidate is asked, as
    // llama.cpp does.
    llama_token resample_grammar(const float * logits, tdata * cand, llama_sampler * grammar) {
        if (cfg.mirostat == 0 && cfg.top_n_sigma <= 0.0f && cfg.top_k > 0) {
            const llama_token tok = grammar_best_first(logits, cand, grammar);
            if (tok >= 0) {
                stats.grammar_partial++;
                return tok;
            }
        }
        if (cfg.trie != nullptr) {
            stats.grammar_trie++;
            return grammar_trie_walk(logits, cand, grammar);
        }
        stats.grammar_full++;
        const size_t n = nv();
        for (size_t i = 0; i < n; ++i) {
            cand[i] = tdata{(llama_token) i, logits[i], 0.0f};
        }
        llama_token_data_array arr{cand, n, -1, false};
        llama_sampler_apply(grammar, &arr);
        return sample_from_cand(cand);
    }

    void accept(llama_token tok) {
        if (cfg.pen_last_n > 0) {
            if (pen_count[tok]++ == 0) {
                pen_pos[tok] = (int32_t) pen_active.size();
                pen_active.push_back(tok);
            }
            if (pen_size >= (size_t) cfg.pen_last_n) {
                const llama_token old = pen_ring[pen_first];
                if (--pen_count[old] == 0) {
                    const int32_t pos = pen_pos[old];
                    const llama_token last = pen_active.back();
                    pen_active[pos] = last;
                    pen_pos[last] = pos;
                    pen_active.pop_back();
                    pen_pos[old] = -1;
                }
            }
            // ring_buffer::push_back
            if (pen_size == (size_t) cfg.pen_last_n) {
                pen_first = (pen_first + 1) % cfg.pen_last_n;
            } else {
                pen_size++;
            }
            pen_ring[pen_next] = tok;
            pen_next = (pen_next + 1) % cfg.pen_last_n;
        }
        if (cfg.dry != nullptr) {
            llama_sampler_accept(cfg.dry, tok);
            if (!dry_ring.empty()) {
                if (dry_size == dry_ring.size()) {
                    dry_first = (dry_first + 1) % dry_ring.size();
                } else {
                    dry_size++;
                }
                dry_ring[dry_next] = tok;
                dry_next = (dry_next + 1) % dry_ring.size();
            }
        }
    }

    float mirostat_mu() const { return mu; }

private:
    Config cfg;
    std::mt19937 rng_dist, rng_xtc, rng_miro;
    float mu;
    // penalties: ring buffer of the last pen_last_n tokens and their counts
    std::vector<int32_t> pen_count, pen_pos;
    std::vector<llama_token> pen_active, pen_ring;
    size_t pen_first = 0, pen_next = 0, pen_size = 0;
    // DRY: mirror of its window (the tokens it can penalize)
    std::vector<llama_token> dry_ring;
    std::vector<size_t> typ_amb;        // fast typical: positions of tied kept candidates
    size_t dry_first = 0, dry_next = 0, dry_size = 0;

    struct State {
        bool full;              // candidates = the whole vocabulary in id order, logits W
        const float * W;
        tdata * cand;           // caller's n_vocab scratch (materialized FULL state)
        Arr arr;                // ARRAY state
        bool tdiv_pending;
        bool typ_ties;          // ARRAY from fast typical with tied candidates (typ_amb)
        bool slow;
    } st;

    size_t nv() const { return (size_t) cfg.n_vocab; }

    // leave the FULL state: the candidate array llama.cpp would have at this point
    void materialize() {
        if (!st.full) {
            return;
        }
        const size_t n = nv();
        tdata * c = st.cand;
        const float * W = st.W;
        for (size_t i = 0; i < n; ++i) {
            c[i].id = (llama_token) i;
            c[i].logit = W[i];
            c[i].p = 0.0f;
        }
        st.arr = Arr{c, n, -1, false};
        st.full = false;
        st.slow = true;
    }

    // a small ARRAY state from the engine's buffer
    void set_array(const tdata * src, size_t cnt, bool sorted) {
        std::vector<tdata> & buf = scratch().abuf;
        if (buf.size() < cnt) {
            buf.resize(std::max<size_t>(cnt, 256));
        }
        std::copy(src, src + cnt, buf.data());
        st.arr = Arr{buf.data(), cnt, -1, sorted};
        st.full = false;
    }

    // the chain on llama.cpp's grammar-masked array: the accepted candidates with their raw
    // logits, every other candidate -inf
    llama_token sample_accepted(const float * logits, const std::vector<tdata> & acc, tdata * cand) {
        const size_t n = nv();
        std::vector<float> & mk = scratch().masked;
        if (mk.size() < n) {
            mk.resize(n);
        }
        std::fill(mk.begin(), mk.begin() + n, -INFINITY);
        for (const tdata & t : acc) {
            mk[t.id] = logits[t.id];
        }
        return sample(mk.data(), cand);
    }

    // resample_grammar with the prefix tree: the grammar is asked about the roots and the
    // end-of-generation tokens, then about the kids of every accepted token, level by level;
    // a token not reached has a rejected ancestor.  The accepted set is then exactly llama.cpp's.
    llama_token grammar_trie_walk(const float * logits, tdata * cand, llama_sampler * grammar) {
        Scratch & S = scratch();
        const GrammarTrie & T = *cfg.trie;
        std::vector<tdata> & ask = S.probe;
        std::vector<tdata> & acc = S.gacc;
        std::vector<int32_t> & next = S.gnext;
        acc.clear();
        ask.clear();
        for (int32_t t : T.eog) {
            ask.push_back(tdata{t, 0.0f, 0.0f});
        }
        for (int32_t t : T.roots) {
            ask.push_back(tdata{t, 0.0f, 0.0f});
        }
        while (!ask.empty()) {
            llama_token_data_array a{ask.data(), ask.size(), -1, false};
            llama_sampler_apply(grammar, &a);
            next.clear();
            for (const tdata & t : ask) {
                if (t.logit != -INFINITY) {
                    acc.push_back(t);
                    for (int32_t j = T.kid_start[t.id]; j < T.kid_start[t.id + 1]; ++j) {
                        next.push_back(T.kids[j]);
                    }
                }
            }
            ask.clear();
            for (int32_t t : next) {
                ask.push_back(tdata{t, 0.0f, 0.0f});
            }
        }
        return sample_accepted(logits, acc, cand);
    }

    // resample_grammar's bounded search: -1 when it cannot decide (nothing consumed then)
    llama_token grammar_best_first(const float * logits, tdata * cand, llama_sampler * grammar) {
        Scratch & S = scratch();
        const size_t n = nv();
        const size_t k = std::min<size_t>((size_t) cfg.top_k, n);
        float * Wm = nullptr;
        auto edit = [&]() -> float * {
            if (Wm == nullptr) {
                if (S.work.size() < n) {
                    S.work.resize(n);
                }
                Wm = S.work.data();
                std::memcpy(Wm, logits, n * sizeof(float));
            }
            return Wm;
        };
        apply_edits(edit);
        const float * W = Wm != nullptr ? Wm : logits;
        const MaxMin mm = scan_max_min(W, n);
        if (mm.nan || !(mm.max > -INFINITY) || mm.max == INFINITY) {
            return -1;
        }
        std::vector<tdata> & acc = S.gacc;
        std::vector<tdata> & ask = S.probe;
        acc.clear();
        float hi = INFINITY;            // every candidate with W >= hi has been asked
        size_t fresh = std::max<size_t>(4 * k, 256), asked = 0;
        // more than this many questions: give up (asking about everyone costs no more)
        const size_t cap = n / 2;
        float d = 8.0f;                 // the first guess: the best few hundred lie within ~8
        bool all = false;
        auto gt = [](const tdata & x, const tdata & y) { return x.logit > y.logit; };
        while (true) {
            // the next round: the `fresh` best candidates not asked yet (ties at the edge too)
            float lo;
            size_t cnt;
            for (;;) {
                lo = d > 0x1p20f ? -INFINITY : mm.max - d;
                cnt = gather_ge(W, n, lo, S.gidx);
                if (cnt >= asked + fresh || lo <= mm.min) {
                    break;
                }
                d *= 2.0f;
            }
            ask.clear();
            for (size_t j = 0; j < cnt; ++j) {
                const int32_t id = S.gidx[j];
                if (W[id] < hi) {
                    ask.push_back(tdata{id, W[id], 0.0f});
                }
            }
            if (ask.size() > fresh) {
                std::nth_element(ask.begin(), ask.begin() + (fresh - 1), ask.end(), gt);
                lo = ask[fresh - 1].logit;
                ask.erase(std::remove_if(ask.begin(), ask.end(),
                                         [lo](const tdata & t) { return t.logit < lo; }),
                          ask.end());
            }
            all = lo <= mm.min;
            if (!all && n >= 8192 && asked + ask.size() > cap) {
                return -1;
            }
            asked += ask.size();
            llama_token_data_array a{ask.data(), ask.size(), -1, false};
            llama_sampler_apply(grammar, &a);
            for (const tdata & t : ask) {
                if (t.logit != -INFINITY) {
                    acc.push_back(t);
                }
            }
            if (acc.size() >= k || all) {
                break;
            }
            if (cfg.trie != nullptr && (acc.size() * 4 < k || asked > 256)) {
                return -1;              // the grammar accepts few of the best: walk the tree
            }
            hi = lo;
            fresh = asked * 4;
        }
        if (!all) {
            // the k best accepted: distinct values, the k-th above the next accepted one (the
            // unasked are below lo <= the k-th)
            const size_t m = std::min(acc.size(), k + 1);
            std::partial_sort(acc.begin(), acc.begin() + m, acc.end(), gt);
            for (size_t j = 1; j < m; ++j) {
                if (!(acc[j - 1].logit > acc[j].logit)) {
                    return -1;
                }
            }
        }
        // every asked-and-rejected or unasked candidate -inf, the accepted with their raw logits:
        // the chain (edits included) sees the same top k as on llama.cpp's masked array (and,
        // when every finite candidate was asked, the same edited array)
        return sample_accepted(logits, acc, cand);
    }

    template <typename F>
    void apply_dry(F & edit) {
        if (dry_size == 0) {
            llama_token_data_array a{nullptr, 0, -1, false};
            llama_sampler_apply(cfg.dry, &a);
            return;
        }
        Scratch & S = scratch();
        if (S.seen.size() < nv()) {
            S.seen.assign(nv(), 0);
        }
        S.probe.clear();
        float * w = edit();
        for (size_t j = 0; j < dry_size; ++j) {
            const llama_token t = dry_ring[(dry_first + j) % dry_ring.size()];
            if (!S.seen[t]) {
                S.seen[t] = 1;
                S.probe.push_back(tdata{t, w[t], 0.0f});
            }
        }
        llama_token_data_array a{S.probe.data(), S.probe.size(), -1, false};
        llama_sampler_apply(cfg.dry, &a);
        for (const tdata & d : S.probe) {
            w[d.id] = d.logit;
            S.seen[d.id] = 0;
        }
    }

    template <typename F>
    void step_top_n_sigma(F & edit) {
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

    void step_top_k() {
        const int32_t k0 = cfg.top_k;
        if (!st.full) {
            port_top_k_impl(&st.arr, k0);
            return;
        }
        const size_t n = nv();
        const int k = std::min(k0, (int) n);
        if (k <= 128 && (size_t) k < n) {
            std::vector<tdata> & buf = scratch().abuf;
            if (buf.size() < (size_t) k + 1) {
                buf.resize(std::max<size_t>(k + 1, 256));
            }
            topk_heap(st.W, n, k, buf.data());
            st.arr = Arr{buf.data(), (size_t) k, -1, true};
            st.full = false;
            return;
        }
        if ((size_t) k < n && k > 128) {
            // llama.cpp's bucket sort, first k: unique unless equal logits straddle the cut or
            // sit inside the prefix; otherwise the exact port
            if (sorted_prefix_by_value(st.W, n, (size_t) k + 1)) {
                std::vector<tdata> & pre = scratch().pre;
                bool tie = false;
                for (int i = 0; i < k && i + 1 < (int) pre.size(); ++i) {
                    if (pre[i].logit == pre[i + 1].logit) {
                        tie = true;
                        break;
                    }
                }
                if (tie) {
                    stats.why[1]++;
                    tie = !fix_tie_order(pre, (size_t) k, st.W, n, false, 1.0f, (size_t) k);
                }
                if (!tie) {
                    set_array(pre.data(), (size_t) k, true);
                    return;
                }
            }
        }
        materialize();
        port_top_k_impl(&st.arr, k0);
    }

    // scratch().pre <- at least `need` (or all) of the largest W values, sorted descending
    // (order among equal values unspecified).  False if that is not possible cheaply.
    bool sorted_prefix_by_value(const float * W, size_t n, size_t need, float lo_hint = NAN) {
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
    size_t gather_sorted(const float * W, size_t n, float t) {
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
    bool exact_bucket_order(const float * W, size_t n, bool div, float t, float x_last, size_t npartial,
                            std::vector<tdata> & out) {
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
    bool fix_tie_order(std::vector<tdata> & pre, size_t len, const float * W, size_t n, bool div, float t,
                       size_t npartial) {
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

    void step_top_p() {
        if (!st.full) {
            port_top_p(&st.arr, cfg.top_p, cfg.min_keep);
            return;
        }
        if (!fast_top_p()) {
            materialize();
            port_top_p(&st.arr, cfg.top_p, cfg.min_keep);
        }
    }

    bool fast_top_p() {
        const size_t n = nv();
        const float * W = st.W;
        MaxMin mm = scan_max_min(W, n);
        if (mm.nan || !std::isfinite(mm.max) || mm.max > 1e8f) {
            return false;
        }
        const float mx = mm.max;      // softmax_impl(unsorted): max over the array
        const float Z = full_exp_sum<float>(W, n, false, 0.0f, mx, nullptr);
        Scratch & S = scratch();
        float depth = 12.0f;
        for (int attempt = 0; attempt < 4; ++attempt) {
            const float t = (attempt == 3) ? -INFINITY : mx - depth;
            const size_t cnt = gather_sorted(W, n, t);
            std::vector<tdata> & pre = S.pre;
            float cum = 0.0f;
            size_t last = 0;
            for (size_t i = 0; i < cnt; ++i) {
                const float p = expf(pre[i].logit - mx) / Z;
                pre[i].p = p;
                cum += p;
                if (cum >= cfg.top_p && i + 1 >= cfg.min_keep) {
                    last = i + 1;
                    break;
                }
            }
            if (last == 0) {
                if (cnt == n) {
                    return false;   // never reached: the port handles the degenerate case
                }
                depth *= 2.0f;
                continue;
            }
            // equal logits in the kept prefix or at its end: llama.cpp's own order for them (the
            // 256-partial sort, or the full sort once the sum went past 256)
            bool tie = false;
            for (size_t i = 0; i < last && i + 1 < cnt; ++i) {
                if (pre[i].logit == pre[i + 1].logit) {
                    tie = true;
                    break;
                }
            }
            if (tie) {
                stats.why[1]++;
                const size_t npart = (n > 1024 && last <= 256) ? 256 : n;
                const size_t len = std::min(cnt, last + 1);
                if (!fix_tie_order(pre, len, W, n, false, 1.0f, npart)) {
                    return false;
                }
            }
            if (last == cnt && cnt < n) {
                // the next element lies below t: strictly smaller, no tie possible
            }
            set_array(pre.data(), last, true);
            return true;
        }
        return false;
    }

    void step_min_p() {
        if (!st.full) {
            port_min_p(&st.arr, cfg.min_p, cfg.min_keep);
            return;
        }
        const size_t n = nv();
        const float * W = st.W;
        MaxMin mm = scan_max_min(W, n);
        if (!mm.nan) {
            const float max_logit = std::max(-FLT_MAX, mm.max);
            const float min_logit = max_logit + logf(cfg.min_p);
            Scratch & S = scratch();
            const size_t cnt = gather_ge(W, n, min_logit, S.gidx);
            if (cnt > 0 && cnt >= cfg.min_keep) {
                std::vector<tdata> & buf = S.abuf;
                if (buf.size() < cnt) {
                    buf.resize(std::max<size_t>(cnt, 256));
                }
                for (size_t j = 0; j < cnt; ++j) {
                    const int32_t id = S.gidx[j];
                    buf[j] = tdata{id, W[id], 0.0f};
                }
                st.arr = Arr{buf.data(), cnt, -1, false};
                st.full = false;
                return;
            }
        }
        materialize();
        port_min_p(&st.arr, cfg.min_p, cfg.min_keep);
    }

    void step_typical() {
        if (!st.full) {
            port_typical(&st.arr, cfg.typical_p, cfg.min_keep);
            return;
        }
        if (!fast_typical()) {
            stats.why[3]++;
            materialize();
            port_typical(&st.arr, cfg.typical_p, cfg.min_keep);
        }
    }

    // typical over the whole vocabulary (llama.cpp: sorted softmax, entropy summed in sorted
    // order, shifted scores |-log p - H| sorted, kept while the cumulative p <= typical_p).
    // Gathers the candidates within `depth` of the maximum (the rest change neither Z nor the
    // entropy, and their scores are above every kept one: checked), sums Z and H in sorted order
    // of their values (sorted head, order-free tail), and finds the kept prefix among the
    // candidates whose score is below a growing window.
    // bounds on what a candidate with logit below tx can hold: its p (P) and its entropy term
    // -p log p (tb, for P < 1/e)
    static void typical_left_out(float tx, float mx, double Z, double & P, double & tb) {
        const double dd = (double) tx - (double) mx + 1e-6 * (std::fabs(mx) + 1.0);
        P = std::exp(dd) * (1.0 + 0x1p-21) / Z;
        tb = P * (-std::log(P)) * (1.0 + 1e-5);
    }

    // the smallest depth (in steps of 1/4, more than `depth`) at which every candidate below
    // mx - depth has P < 0.3 and an entropy term P * -log(P) under half_ulp, by the bounds used
    // in fast_typical; at most depth + span
    static float typical_depth_for(float depth, float mx, double Z, double half_ulp, float span = 10.0f) {
        for (float d = depth + 0.25f; d < depth + span; d += 0.25f) {
            double P, tb;
            typical_left_out(mx - d, mx, Z, P, tb);
            if (P < 0.3 && tb < half_ulp) {
                return d;
            }
        }
        return depth + span;
    }

    bool fast_typical() {
        const size_t n = nv();
        const float * W = st.W;
        MaxMin mm = scan_max_min(W, n);
        // every p > 0 (a p == 0 makes llama.cpp's entropy NaN: exact port): the smallest is
        // expf(min - max) / Z with Z <= n
        if (mm.nan || !std::isfinite(mm.max) || mm.max > 1e8f || !std::isfinite(mm.min)
                || !(expf(mm.min - mm.max) / (float) n > 0.0f)) {
            return false;
        }
        const float mx = mm.max;
        Scratch & S = scratch();
        std::vector<float> & d = S.f1;
        std::vector<float> & p = S.f2;
        std::vector<float> & lg = S.f3;
        std::vector<float> & v = S.mv;
        std::vector<tdata> & pt = S.pre;
        std::vector<tdata> & cand = S.ma;
        // where to start: deep enough that, by an approximate Z and entropy (within a few
        // percent), the terms left out round away (checked exactly below; deeper if not)
        float next_depth = 20.0f;
        double aZ, aS;
        if (approx_z_s(W, n, mx, aZ, aS) && aZ >= 1.0 && std::isfinite(aS)) {
            const double aH = std::log(aZ) - aS / aZ;
            if (aH > 1e-3 && std::isfinite(aH)) {
                const float h = (float) (aH * 0.98);
                next_depth = typical_depth_for(4.0f, mx, aZ * 0.98, (double) pow2f(binade_of(h) - 24), 60.0f);
            }
        }
        for (;;) {
            const float depth = next_depth;
            next_depth = depth + 10.0f;
            const float tx = mx - depth;
            const bool all = !(tx > mm.min);
            const size_t m = gather_ge(W, n, all ? -INFINITY : tx, S.gidx);
            const int32_t * ids = S.gidx.data();
            d.resize(m);
            p.resize(m);
            lg.resize(m);
            v.resize(m);
            for (size_t j = 0; j < m; ++j) {
                d[j] = W[ids[j]] - mx;
            }
            expf_batch(d.data(), p.data(), m);
            size_t mz = 0;
            for (size_t j = 0; j < m; ++j) {
                v[mz] = p[j];
                mz += p[j] >= 0x1p-24f;     // the others add exactly 0 to a sum >= 1
            }
            const float Z = desc_seq_sum(v.data(), mz);
            std::vector<float> & tm = S.tm;
            tm.resize(m);
            for (size_t j = 0; j < m; ++j) {
                p[j] = p[j] / Z;
            }
            for (size_t j = 0; j < m; ++j) {
                lg[j] = logf(p[j]);
            }
            for (size_t j = 0; j < m; ++j) {
                tm[j] = -p[j] * lg[j];
            }
            // entropy: terms in descending order of p (equal p, equal terms): the head
            // (p >= 2^-10) sorted, the tail order-free when provably so, else bucket by bucket
            const float cut = 0x1p-10f;
            const size_t nh = gather_ge(p.data(), m, cut, S.wsel);
            pt.resize(nh);
            for (size_t i = 0; i < nh; ++i) {
                const int32_t j = S.wsel[i];
                pt[i] = tdata{j, p[j], tm[j]};
            }
            std::sort(pt.begin(), pt.end(), cmp_logit_desc);
            float H = 0.0f;
            for (size_t i = 0; i < nh; ++i) {
                H += pt[i].p;
            }
            if (nh < m) {
                const size_t nt = compress_lt(p.data(), tm.data(), m, cut, v.data());
                float out;
                if (H > 0.0f && order_free_sum(H, v.data(), nt, out)) {
                    H = out;
                } else {
                    H = seq_sum_desc_tail(H, p.data(), tm.data(), m, cut, S);
                    stats.typical_tail_buckets++;
                }
            }
            double LB = INFINITY;   // every score outside the gathered set is at least LB
            if (!all) {
                double P, tb;
                typical_left_out(tx, mx, (double) Z, P, tb);
                if (!(H > 0.0f)) {
                    return false;
                }
                const double half_ulp = (double) pow2f(binade_of(H) - 24);
                if (!(P < 0.3 && tb < half_ulp)) {
                    // the entropy may reach deeper: gather down to where a term provably
                    // rounds away (H only grows with more terms, so the bound stays valid; the
                    // count of candidates grows ~exponentially with depth: no coarser step)
                    next_depth = typical_depth_for(depth, mx, Z, half_ulp);
                    continue;
                }
                LB = (-std::log(P)) * (1.0 - 1e-6) - (double) H - 1e-4;
            }
            // the kept prefix among the candidates whose score is below w
            size_t last = 0;
            bool deeper = false;
            float * scp = d.data();           // d is free now: the scores
            const float * lgp = lg.data();
            for (size_t j = 0; j < m; ++j) {
                scp[j] = fabsf(-lgp[j] - H);
            }
            if (cand.size() < m) {
                cand.resize(m);
            }
            tdata * cd = cand.data();
            size_t nc = 0;
            auto by_score = [](const tdata & x, const tdata & y) {
                return x.logit < y.logit || (x.logit == y.logit && x.id < y.id);
            };
            for (float w = 0.125f;; w *= 4.0f) {
                nc = gather_lt(scp, m, w, S.wsel);
                for (size_t i = 0; i < nc; ++i) {
                    const int32_t j = S.wsel[i];
                    cd[i] = tdata{(llama_token) j, scp[j], 0.0f};
                }
                // sorted as far as needed: the kept prefix and the next one
                size_t ns = std::min<size_t>(nc, 64);
                std::partial_sort(cd, cd + ns, cd + nc, by_score);
                float cum = 0.0f;
                last = 0;
                for (size_t i = 0; i < nc; ++i) {
                    if (i + 1 >= ns && ns < nc) {
                        std::sort(cd + ns, cd + nc, by_score);
                        ns = nc;
                    }
                    cum += p[cd[i].id];
                    if (cum > cfg.typical_p && (cfg.min_keep == 0 || i >= cfg.min_keep - 1)) {
                        last = i + 1;
                        break;
                    }
                }
                if (last != 0) {
                    break;
                }
                if (nc == m) {
                    if (all) {
                        return false;
                    }
                    deeper = true;
                    break;
                }
                if (!std::isfinite(w)) {
                    return false;
                }
            }
            if (deeper) {
                continue;
            }
            // unique order: strictly increasing scores over the kept prefix and the next one (a
            // next one outside the window scores at least w), all below the scores outside
            // -- except equal scores of equal logits when only temp -> dist follows: those add the
            // same values to every sum, so their order matters only if the draw lands on one
            // of them (step_temp_dist then re-runs the step through the exact port)
            const bool relaxed = cfg.top_p >= 1.0f && cfg.min_p <= 0.0f && !cfg.xtc;
            typ_amb.clear();
            for (size_t i = 0; i + 1 < nc && i < last; ++i) {
                if (!(cd[i].logit < cd[i + 1].logit)) {
                    const int32_t a = ids[cd[i].id], b = ids[cd[i + 1].id];
                    if (!(relaxed && cd[i].logit == cd[i + 1].logit && W[a] == W[b])) {
                        return false;
                    }
                    typ_amb.push_back(i);
                    if (i + 1 < last) {
                        typ_amb.push_back(i + 1);
                    }
                }
            }
            if (!((double) cd[last - 1].logit < LB)) {
                continue;
            }
            st.typ_ties = !typ_amb.empty();
            std::vector<tdata> & buf = S.abuf;
            if (buf.size() < last) {
                buf.resize(std::max<size_t>(last, 256));
            }
            for (size_t i = 0; i < last; ++i) {
                const size_t j = (size_t) cd[i].id;
                buf[i] = tdata{ids[j], W[ids[j]], p[j]};
            }
            st.arr = Arr{buf.data(), last, -1, false};
            st.full = false;
            return true;
        }
        return false;
    }

    void step_xtc() {
        if (!st.full) {
            port_xtc(&st.arr, cfg.xtc_p, cfg.xtc_t, cfg.min_keep, rng_xtc);
            return;
        }
        if (cfg.xtc_p <= 0.0f || cfg.xtc_t > 0.5f || nv() < 2) {
            return;
        }
        // the coin is drawn first; only when it says "cut" does XTC need the sorted softmax
        std::mt19937 probe = rng_xtc;
        std::uniform_real_distribution<float> distribution(0.0f, 1.0f);
        float chance = distribution(probe);
        if (chance > cfg.xtc_p) {
            rng_xtc = probe;
            return;
        }
        materialize();
        port_xtc(&st.arr, cfg.xtc_p, cfg.xtc_t, cfg.min_keep, rng_xtc);
    }

    // dist from approximate sums with a proven error bound.  llama.cpp's running sum s_i (a
    // sequential double sum of float e_i in id order) is within i * 2^-53 * s_i of the exact
    // prefix sum; the chunked sum here is within (c + 10) * 2^-53 * S of it.  With d bounding
    // both, s_i lies in [a_i - d, a_i + d] and the target sum_cum * rnd in [t_lo, t_hi]; walking
    // from both ends of a chunk's bound (rounded additions are monotone) gives the first and the
    // last index that can be selected.  Equal: that is the token.  Otherwise (rare: the target
    // within ~1e-11 of a boundary) the exact sum decides.
    bool approx_dist(const float * W, size_t n, bool div, float t, float mx, double rnd, std::vector<double> & ce,
                     llama_token & out) {
#ifdef LGFS_X86
        const int mode = expf_mode();
        if (mode == EXPF_LIBM) {
            return false;
        }
        double S;
        if (mode == EXPF_FMA) {
            S = div ? approx_exp_sum_avx512<true, true>(W, n, t, mx, ce.data())
                    : approx_exp_sum_avx512<true, false>(W, n, t, mx, ce.data());
        } else {
            S = div ? approx_exp_sum_avx512<false, true>(W, n, t, mx, ce.data())
                    : approx_exp_sum_avx512<false, false>(W, n, t, mx, ce.data());
        }
        if (!std::isfinite(S) || S <= 0.0) {
            return false;
        }
        const size_t nc = ce.size();
        const double d = ((double) n + 4.0 * (double) nc + 64.0) * 0x1p-53 * S * 1.01;
        const double t_lo = std::nextafter(S - d, 0.0) * rnd;
        const double t_hi = std::nextafter(S + d, INFINITY) * rnd;
        size_t c = 0;
        while (c < nc && ce[c] + d < t_lo) {
            ++c;
        }
        if (c == nc) {
            return false;
        }
        double s_lo = (c == 0) ? 0.0 : std::nextafter(ce[c - 1] - d, -INFINITY);
        double s_hi = (c == 0) ? 0.0 : std::nextafter(ce[c - 1] + d, INFINITY);
        if (c == 0) {
            s_lo = 0.0;
            s_hi = 0.0;
        }
        size_t first = SIZE_MAX;
        for (size_t i = c * 64; i < n; ++i) {
            const float x = div ? W[i] / t : W[i];
            const double e = (double) expf(x - mx);
            s_lo += e;
            s_hi += e;
            if (first == SIZE_MAX && s_hi >= t_lo) {
                first = i;
            }
            if (s_lo >= t_hi) {
                if (first != i) {
                    return false;
                }
                out = (llama_token) i;
                return true;
            }
            if (first != SIZE_MAX && i > first) {
                return false;       // two candidates: too close to call
            }
        }
        return false;
#else
        (void) W; (void) n; (void) div; (void) t; (void) mx; (void) rnd; (void) ce; (void) out;
        return false;
#endif
    }

    llama_token step_temp_dist() {
        const float temp = cfg.temp;
        const bool temp_empty = (temp == 1.0f);
        if (!st.full && st.typ_ties) {
            // fast typical kept candidates with equal logits in an order of its own: the draw
            // stands unless it lands on one of them; then the step is re-run exactly
            const std::mt19937 saved = rng_dist;
            if (!temp_empty) {
                port_temp_impl(&st.arr, temp);
            }
            port_dist(&st.arr, rng_dist);
            const size_t sel = (size_t) st.arr.selected;
            if (std::find(typ_amb.begin(), typ_amb.end(), sel) == typ_amb.end()) {
                return st.arr.data[sel].id;
            }
            stats.why[2]++;
            rng_dist = saved;
            st.typ_ties = false;
            st.full = true;             // st.W: the logits typical-p saw
            materialize();
            port_typical(&st.arr, cfg.typical_p, cfg.min_keep);
        }
        if (!st.full) {
            if (!temp_empty) {
                port_temp_impl(&st.arr, temp);
            }
            port_dist(&st.arr, rng_dist);
            return st.arr.data[st.arr.selected].id;
        }
        const size_t n = nv();
        const float * W = st.W;
        MaxMin mm = scan_max_min(W, n);
        if (mm.nan || !std::isfinite(mm.max)) {
            materialize();
            if (!temp_empty) {
                port_temp_impl(&st.arr, temp);
            }
            port_dist(&st.arr, rng_dist);
            return st.arr.data[st.arr.selected].id;
        }
        std::uniform_real_distribution<double> dist(0.0f, 1.0f);
        if (!temp_empty && temp <= 0.0f) {
            // greedy: temp keeps the first maximum, every other logit becomes -inf
            size_t m = 0;
            for (size_t i = 0; i < n; ++i) {
                if (W[i] == mm.max) {
                    m = i;
                    break;
                }
            }
            const double rnd = dist(rng_dist);
            const double sum_tgt = 1.0 * rnd;
            // running sum: 0 before m, 1 from m on
            return (llama_token) ((0.0 >= sum_tgt) ? 0 : m);
        }
        const bool div = !temp_empty;
        const float mx = div ? mm.max / temp : mm.max;
        std::vector<double> & ce = scratch().chunk_end;
        ce.resize((n + 63) / 64);
        const double rnd = dist(rng_dist);
        llama_token tok;
        if (approx_dist(W, n, div, temp, mx, rnd, ce, tok)) {
            return tok;
        }
        stats.why[5]++;
        const double sum_cum = full_exp_sum<double>(W, n, div, temp, mx, ce.data());
        const double sum_tgt = sum_cum * rnd;
        size_t c = 0;
        const size_t nc = ce.size();
        while (c < nc && !(ce[c] >= sum_tgt)) {
            ++c;
        }
        if (c == nc) {
            return (llama_token) (n - 1);
        }
        double s = (c == 0) ? 0.0 : ce[c - 1];
        const size_t end = std::min(n, (c + 1) * 64);
        for (size_t i = c * 64; i < end; ++i) {
            const float x = div ? W[i] / temp : W[i];
            s += expf(x - mx);
            if (s >= sum_tgt) {
                return (llama_token) i;
            }
        }
        return (llama_token) (end - 1);   // unreachable: ce[c] >= sum_tgt
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
    bool fast_miro(float t, bool div, llama_token & out) {
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

    llama_token step_mirostat() {
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
};

} // namespace lgfs

// C-style entry points for Cython
typedef lgfs::Engine lgfs_engine;
typedef lgfs::Config lgfs_config;

static inline lgfs::Engine * lgfs_new(const lgfs::Config & c) { return new lgfs::Engine(c); }
static inline void lgfs_free(lgfs::Engine * e) { delete e; }
typedef lgfs::GrammarTrie lgfs_trie;
static inline lgfs::GrammarTrie * lgfs_trie_new(const llama_vocab * v) { return lgfs::grammar_trie_new(v); }
static inline void lgfs_trie_free(lgfs::GrammarTrie * t) { delete t; }
static inline int lgfs_supported() { return lgfs::fast_sampler_supported() ? 1 : 0; }
static inline int lgfs_expf_mode() { return lgfs::expf_mode(); }
static inline void lgfs_config_add_bias(lgfs::Config & c, llama_token t, float b) {
    c.bias.push_back(llama_logit_bias{t, b});
}

// llama_sampler_accept on a grammar sampler throws std::runtime_error when the token leaves the
// grammar no way to continue ("Unexpected empty grammar stack"): 0, or -1 instead of the throw
// (which would otherwise cross Cython's noexcept nogil code and abort the process).
static inline int lgfs_grammar_accept(llama_sampler * grammar, llama_token tok) noexcept {
    try {
        llama_sampler_accept(grammar, tok);
        return 0;
    } catch (...) {
        return -1;
    }
}
