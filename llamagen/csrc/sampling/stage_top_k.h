// Stage: top-k.  Invariant: llama.cpp's k candidates in llama.cpp's order: k <= 128 replays
// std::partial_sort's heap selection; a larger k sorts a prefix and, where equal logits meet,
// takes llama.cpp's bucket-sort order, or runs the exact port.
#pragma once

#include "engine.h"
#include "ports.h"
#include "select.h"

namespace lgfs {

inline void Engine::step_top_k() {
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

} // namespace lgfs
