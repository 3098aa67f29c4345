// Stage: XTC.  Its coin is drawn first, on a copy of its RNG: when the coin says "keep" nothing
// else is needed (the RNG advances as llama.cpp's does); when it says "cut", the exact port runs.
#pragma once

#include "engine.h"
#include "ports.h"

namespace lgfs {

inline void Engine::step_xtc() {
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

} // namespace lgfs
