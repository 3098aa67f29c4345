// Stage: logit bias, repeat/frequency/presence penalties and DRY, the samplers that only edit
// logits.  Invariant: llama.cpp's float edits on the tokens llama.cpp edits (penalties: the
// window's tokens, counted in accept(); DRY: llama.cpp's own DRY object on a probe of them).
#pragma once

#include "engine.h"
#include "types.h"

namespace lgfs {

// the samplers that only edit logits, in the chain's order: logit_bias, then (without
// mirostat) penalties and DRY.  edit() returns the writable copy of the logits (made on first
// use).
template <typename F>
inline void Engine::apply_edits(F & edit) {
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

template <typename F>
inline void Engine::apply_dry(F & edit) {
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

} // namespace lgfs
