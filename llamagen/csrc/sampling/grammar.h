// The grammar re-sample after a rejected token, and the vocabulary's prefix tree it walks.
// Invariant: the accepted set is exactly the one llama.cpp's grammar sampler marks (a token is
// skipped only when a token whose piece is a prefix of its own was rejected): llama.cpp's token.
#pragma once

#include "chain.h"
#include "engine.h"
#include "select.h"
#include "stage_penalties.h"
#include "types.h"

namespace lgfs {

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

// the same, for candidates already in an array in id order (the grammar re-sample: cand holds
// the grammar-masked logits; it is reused as scratch)
inline llama_token Engine::sample_from_cand(tdata * cand) {
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
inline llama_token Engine::resample_grammar(const float * logits, tdata * cand, llama_sampler * grammar) {
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

// the chain on llama.cpp's grammar-masked array: the accepted candidates with their raw
// logits, every other candidate -inf
inline llama_token Engine::sample_accepted(const float * logits, const std::vector<tdata> & acc,
                                           tdata * cand) {
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
inline llama_token Engine::grammar_trie_walk(const float * logits, tdata * cand, llama_sampler * grammar) {
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
inline llama_token Engine::grammar_best_first(const float * logits, tdata * cand, llama_sampler * grammar) {
    Scratch & S = scratch();
    const size_t n = nv();
    const size_t k = std::min<size_t>((size_t) cfg.top_k, n);
    float * Wm = nullptr;
    auto edit = [&]() -> float * {
        if (Wm == nullptr) {
            Wm = work_copy(S, logits, n);
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

} // namespace lgfs
