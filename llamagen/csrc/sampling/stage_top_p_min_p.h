// Stage: top-p and min-p.  Invariant: top-p keeps llama.cpp's prefix (Z is the exact sequential
// float sum, equal logits in llama.cpp's order); min-p keeps the same set in id order, as
// llama.cpp's unsorted branch does.
#pragma once

#include "engine.h"
#include "exp_sum.h"
#include "ports.h"
#include "select.h"

namespace lgfs {

inline void Engine::step_top_p() {
    if (!st.full) {
        port_top_p(&st.arr, cfg.top_p, cfg.min_keep);
        return;
    }
    if (!fast_top_p()) {
        materialize();
        port_top_p(&st.arr, cfg.top_p, cfg.min_keep);
    }
}

inline bool Engine::fast_top_p() {
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

inline void Engine::step_min_p() {
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

} // namespace lgfs
