// Stage: temperature and dist (the draw).  Invariant: the token llama.cpp's dist selects: a
// cumulative sum within a proven bound of llama.cpp's decides unless the target lies too close to
// a boundary; then the exact sequential double sum (exp_sum.h) decides.
#pragma once

#include "engine.h"
#include "exp_sum.h"
#include "expf.h"
#include "ports.h"
#include "select.h"
#include "simd.h"

namespace lgfs {

// dist from approximate sums with a proven error bound.  llama.cpp's running sum s_i (a
// sequential double sum of float e_i in id order) is within i * 2^-53 * s_i of the exact
// prefix sum; the chunked sum here is within (c + 10) * 2^-53 * S of it.  With d bounding
// both, s_i lies in [a_i - d, a_i + d] and the target sum_cum * rnd in [t_lo, t_hi]; walking
// from both ends of a chunk's bound (rounded additions are monotone) gives the first and the
// last index that can be selected.  Equal: that is the token.  Otherwise (rare: the target
// within ~1e-11 of a boundary) the exact sum decides.
static inline bool approx_dist(const float * W, size_t n, bool div, float t, float mx, double rnd,
                               std::vector<double> & ce, llama_token & out) {
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

inline llama_token Engine::step_temp_dist() {
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

} // namespace lgfs
