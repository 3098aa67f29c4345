// llama.cpp's samplers (src/llama-sampler.cpp), ported line by line and allocation-free: the exact
// path every stage falls back to when a fast path's precondition fails (the ARRAY state).
// Invariant: llama.cpp's float operations in llama.cpp's order, so its candidates and its draws.
#pragma once

#include "types.h"

namespace lgfs {

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

// p_i = expf(logit_i - max) into the candidates, summed in order in S: float for llama.cpp's
// softmax, double for its dist sampler (the max is data[0]'s when the array is sorted)
template <typename S>
static S port_exp_fill(Arr * cur_p) {
    float max_l = cur_p->data[0].logit;
    if (!cur_p->sorted) {
        for (size_t i = 1; i < cur_p->size; ++i) {
            max_l = std::max(max_l, cur_p->data[i].logit);
        }
    }
    S sum = 0;
    for (size_t i = 0; i < cur_p->size; ++i) {
        float p = expf(cur_p->data[i].logit - max_l);
        cur_p->data[i].p = p;
        sum += p;
    }
    return sum;
}

static void port_softmax_impl(Arr * cur_p, bool do_sort) {
    if (do_sort && !cur_p->sorted) {
        port_partial_sort_inplace(cur_p, (int) cur_p->size);
    }
    const float cum_sum = port_exp_fill<float>(cur_p);
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
    const double sum_cum = port_exp_fill<double>(cur_p);
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

} // namespace lgfs
