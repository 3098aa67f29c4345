// Stage: locally typical sampling, from the candidates near the maximum only.  Invariant: every
// candidate left out provably rounds away from Z and the entropy and scores above every kept one;
// tied kept candidates send the step to the exact port (unless the draw misses them).
#pragma once

#include "engine.h"
#include "exact_sum.h"
#include "exp_sum.h"
#include "expf.h"
#include "ports.h"
#include "select.h"

namespace lgfs {

inline void Engine::step_typical() {
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

// bounds on what a candidate with logit below tx can hold: its p (P) and its entropy term
// -p log p (tb, for P < 1/e)
static inline void typical_left_out(float tx, float mx, double Z, double & P, double & tb) {
    const double dd = (double) tx - (double) mx + 1e-6 * (std::fabs(mx) + 1.0);
    P = std::exp(dd) * (1.0 + 0x1p-21) / Z;
    tb = P * (-std::log(P)) * (1.0 + 1e-5);
}

// the smallest depth (in steps of 1/4, more than `depth`) at which every candidate below
// mx - depth has P < 0.3 and an entropy term P * -log(P) under half_ulp, by the bounds used
// in fast_typical; at most depth + span
static inline float typical_depth_for(float depth, float mx, double Z, double half_ulp, float span = 10.0f) {
    for (float d = depth + 0.25f; d < depth + span; d += 0.25f) {
        double P, tb;
        typical_left_out(mx - d, mx, Z, P, tb);
        if (P < 0.3 && tb < half_ulp) {
            return d;
        }
    }
    return depth + span;
}

// typical over the whole vocabulary (llama.cpp: sorted softmax, entropy summed in sorted
// order, shifted scores |-log p - H| sorted, kept while the cumulative p <= typical_p).
// Gathers the candidates within `depth` of the maximum (the rest change neither Z nor the
// entropy, and their scores are above every kept one: checked), sums Z and H in sorted order
// of their values (sorted head, order-free tail), and finds the kept prefix among the
// candidates whose score is below a growing window.
inline bool Engine::fast_typical() {
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

} // namespace lgfs
