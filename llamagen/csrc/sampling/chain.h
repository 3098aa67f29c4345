// The chain: Engine::sample runs the stages in llama.cpp's order on the raw logits (FULL state).
// Invariant: a stage leaves FULL only for the candidate array llama.cpp would hold at that
// point (ARRAY state); from then on every later stage runs on that array as llama.cpp does.
#pragma once

#include "engine.h"
#include "stage_penalties.h"
#include "stage_top_n_sigma.h"
#include "stage_top_k.h"
#include "stage_typical.h"
#include "stage_top_p_min_p.h"
#include "stage_xtc.h"
#include "stage_temp_dist.h"
#include "stage_mirostat.h"
#include "types.h"

namespace lgfs {

// apply: the token llama.cpp's chain would select for these logits (state advanced as the
// chain's apply advances it).  cand: n_vocab entries of scratch for the exact fallback.
inline llama_token Engine::sample(const float * logits, tdata * cand) {
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
            Wm = work_copy(S, logits, n);
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

} // namespace lgfs
