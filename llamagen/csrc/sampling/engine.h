// The Engine: its configuration and state (RNGs, mirostat's mu, the penalty and DRY windows),
// accept, and the FULL -> ARRAY transitions.  Invariant: every stage leaves the candidates and
// that state as llama.cpp's samplers leave theirs, so every step selects llama.cpp's token.
//
// Engine::sample (the chain's dispatch) is in chain.h, each stage in stage_<name>.h, the grammar
// re-sample in grammar.h; api.h includes them all.
#pragma once

#include "expf.h"
#include "types.h"

#include <cstring>
#include <sstream>
#include <string>

namespace lgfs {

struct GrammarTrie;                     // grammar.h

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

    // logit_bias, penalties, DRY: the samplers that only edit logits (stage_penalties.h)
    template <typename F>
    void apply_edits(F & edit);

    // the token llama.cpp's chain would select for these logits (chain.h)
    llama_token sample(const float * logits, tdata * cand);

    // the grammar re-sample after a rejected token (grammar.h)
    llama_token sample_from_cand(tdata * cand);
    llama_token resample_grammar(const float * logits, tdata * cand, llama_sampler * grammar);

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

    // The random state (the three generators and mirostat's mu) as text, and back: with the
    // accepted tokens replayed, a saved generation goes on with the draws it would have made.
    std::string rng_state() const {
        uint32_t bits;
        std::memcpy(&bits, &mu, sizeof bits);
        std::ostringstream o;
        o << rng_dist << ' ' << rng_xtc << ' ' << rng_miro << ' ' << bits;
        return o.str();
    }
    bool set_rng_state(const std::string & s) {
        std::istringstream i(s);
        std::mt19937 d, x, m;
        uint32_t bits = 0;
        i >> d >> x >> m >> bits;
        if (i.fail()) {
            return false;
        }
        rng_dist = d;
        rng_xtc = x;
        rng_miro = m;
        std::memcpy(&mu, &bits, sizeof bits);
        return true;
    }

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

    // grammar.h
    llama_token sample_accepted(const float * logits, const std::vector<tdata> & acc, tdata * cand);
    llama_token grammar_trie_walk(const float * logits, tdata * cand, llama_sampler * grammar);
    llama_token grammar_best_first(const float * logits, tdata * cand, llama_sampler * grammar);

    // the stages, in the chain's order; each in stage_<name>.h
    template <typename F>
    void apply_dry(F & edit);                              // stage_penalties.h
    template <typename F>
    void step_top_n_sigma(F & edit);                       // stage_top_n_sigma.h
    void step_top_k();                                     // stage_top_k.h
    void step_typical();                                   // stage_typical.h
    bool fast_typical();
    void step_top_p();                                     // stage_top_p_min_p.h
    bool fast_top_p();
    void step_min_p();
    void step_xtc();                                       // stage_xtc.h
    llama_token step_temp_dist();                          // stage_temp_dist.h
    llama_token step_mirostat();                           // stage_mirostat.h
    bool fast_miro(float t, bool div, llama_token & out);
};

} // namespace lgfs
