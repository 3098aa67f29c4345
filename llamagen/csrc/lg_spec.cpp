#include "lg_spec.h"

#include "common.h"
#include "speculative.h"

#include <algorithm>
#include <exception>
#include <new>

namespace lgspec {

struct Seq {
    llama_tokens hist;        // prompt + generated tokens in the KV cache
    int32_t n_prompt = 0;
    llama_tokens draft;
    llama_tokens dft;         // draft-simple: the tokens in the draft context's cells
};

struct Drafter {
    common_params_speculative params;
    common_speculative * spec = nullptr;
    std::vector<Seq> seqs;
    bool any = false;         // want() was called since the last run()
    llama_context * ctx_dft = nullptr;      // draft-simple: owned
    uint32_t n_batch = 512;
    int64_t n_caught_up = 0;  // draft-simple: history tokens sync_draft decoded (after the prompt)
};

// ``d`` (its params set) started by llama.cpp for ``n_seq`` sequences; on a refusal or an
// exception ``d`` is freed (its draft context with it) and ``err`` says why
static Drafter * start(Drafter * d, uint32_t n_seq, const std::string & what, std::string & err) noexcept {
    try {
        d->spec = common_speculative_init(d->params, n_seq);
        if (d->spec != nullptr) {
            d->seqs.resize(n_seq);
            return d;
        }
        err = "llama.cpp made no " + what + " drafter";
    } catch (const std::exception & e) {
        err = e.what();
    } catch (...) {
        err = "unknown error creating the " + what + " drafter";
    }
    destroy(d);
    return nullptr;
}

Drafter * create(const char * type, uint32_t n_seq, int32_t size_n, int32_t size_m,
                 int32_t min_hits, std::string & err) noexcept {
    common_speculative_type t = COMMON_SPECULATIVE_TYPE_NONE;
    try {
        t = common_speculative_type_from_name(type);
    } catch (...) {
    }
    switch (t) {
        case COMMON_SPECULATIVE_TYPE_NGRAM_SIMPLE:
        case COMMON_SPECULATIVE_TYPE_NGRAM_MAP_K:
        case COMMON_SPECULATIVE_TYPE_NGRAM_MAP_K4V:
        case COMMON_SPECULATIVE_TYPE_NGRAM_MOD:
        case COMMON_SPECULATIVE_TYPE_NGRAM_CACHE:
            break;
        default:
            err = std::string("unsupported speculative type '") + type + "'";
            return nullptr;
    }
    auto * d = new (std::nothrow) Drafter();
    if (d == nullptr) {
        err = "out of memory creating the drafter";
        return nullptr;
    }
    d->params.types = { t };
    for (auto * m : { &d->params.ngram_simple, &d->params.ngram_map_k, &d->params.ngram_map_k4v }) {
        if (size_n > 0) m->size_n = (uint16_t) size_n;
        if (size_m > 0) m->size_m = (uint16_t) size_m;
        if (min_hits > 0) m->min_hits = (uint16_t) min_hits;
    }
    if (size_n > 0) d->params.ngram_mod.n_match = size_n;
    if (size_m > 0) d->params.ngram_mod.n_max = size_m;
    // our own n_min applies after the draft (Python side); the drafter may propose any length
    d->params.ngram_mod.n_min = 1;
    return start(d, n_seq, std::string("'") + type + "'", err);
}

Drafter * create_draft(llama_model * draft, llama_context * target, uint32_t n_seq,
                       uint32_t n_ctx, uint32_t n_batch, int32_t n_threads,
                       std::string & err) noexcept {
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_batch = n_batch;
    cp.n_ubatch = std::min<uint32_t>(n_batch, 512);
    cp.n_seq_max = n_seq;
    cp.kv_unified = true;         // (the sequences share the cells, as the target's do)
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    cp.no_perf = true;
    llama_context * ctx = llama_init_from_model(draft, cp);
    if (ctx == nullptr) {
        err = "llama.cpp could not make a context for the draft model (memory?)";
        return nullptr;
    }
    auto * d = new (std::nothrow) Drafter();
    if (d == nullptr) {
        llama_free(ctx);
        err = "out of memory creating the drafter";
        return nullptr;
    }
    d->ctx_dft = ctx;
    d->n_batch = n_batch;
    d->params.types = { COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE };
    d->params.draft.ctx_tgt = target;
    d->params.draft.ctx_dft = ctx;
    d->params.draft.n_max = 64;   // (each request's n_max is asked per draft)
    d->params.draft.n_min = 0;    // (our own n_min applies after the draft)
    return start(d, n_seq, "draft-simple", err);
}

void destroy(Drafter * d) noexcept {
    if (d == nullptr) return;
    if (d->spec != nullptr) {
        common_speculative_free(d->spec);
    }
    if (d->ctx_dft != nullptr) {
        llama_free(d->ctx_dft);
    }
    delete d;
}

// draft-simple: the draft context's cells of every sequence about to draft made to hold its
// history (positions 0 .. hist.size() - 1): cut where they differ, decode the rest (all
// sequences in shared batches); false when llama.cpp refuses a decode
static bool sync_draft(Drafter * d) {
    llama_memory_t mem = llama_get_memory(d->ctx_dft);
    std::vector<std::pair<int32_t, int32_t>> todo;     // (seq, first position to decode)
    size_t total = 0;
    for (int32_t s = 0; s < (int32_t) d->seqs.size(); ++s) {
        if (!common_speculative_get_draft_params(d->spec, s).drafting) {
            continue;
        }
        Seq & q = d->seqs[s];
        size_t p = 0;
        const size_t n = std::min(q.dft.size(), q.hist.size());
        while (p < n && q.dft[p] == q.hist[p]) {
            ++p;
        }
        if (p < q.dft.size()) {
            llama_memory_seq_rm(mem, s, (llama_pos) p, -1);
            q.dft.resize(p);
        }
        if (p < q.hist.size()) {
            todo.emplace_back(s, (int32_t) p);
            total += q.hist.size() - p;
            d->n_caught_up += (int64_t) (q.hist.size() - std::max<size_t>(p, q.n_prompt));
        }
    }
    if (total == 0) {
        return true;
    }
    llama_batch b = llama_batch_init((int32_t) d->n_batch, 0, 1);
    bool ok = true;
    for (auto & t : todo) {
        Seq & q = d->seqs[t.first];
        for (size_t i = (size_t) t.second; i < q.hist.size() && ok; ++i) {
            const int32_t k = b.n_tokens++;
            b.token[k] = q.hist[i];
            b.pos[k] = (llama_pos) i;
            b.n_seq_id[k] = 1;
            b.seq_id[k][0] = t.first;
            b.logits[k] = 0;
            if (b.n_tokens == (int32_t) d->n_batch) {
                ok = llama_decode(d->ctx_dft, b) == 0;
                b.n_tokens = 0;
            }
        }
        if (ok) {
            q.dft = q.hist;
        }
    }
    if (ok && b.n_tokens > 0) {
        ok = llama_decode(d->ctx_dft, b) == 0;
    }
    llama_batch_free(b);
    if (!ok) {
        for (auto & t : todo) {     // (unknown what landed: the next sync starts over)
            llama_memory_seq_rm(mem, t.first, 0, -1);
            d->seqs[t.first].dft.clear();
        }
    }
    return ok;
}

void begin(Drafter * d, int32_t seq, const int32_t * prompt, int32_t n_prompt) noexcept {
    Seq & s = d->seqs[seq];
    s.hist.assign(prompt, prompt + n_prompt);
    s.n_prompt = n_prompt;
    s.draft.clear();
    common_speculative_get_draft_params(d->spec, seq).drafting = false;
    common_speculative_begin(d->spec, seq, s.hist);
}

void want(Drafter * d, int32_t seq, const int32_t * gen, int32_t n_gen, int32_t id_last,
          int32_t n_max) noexcept {
    Seq & s = d->seqs[seq];
    // the history grows by what was decoded since the last call (the caller's tokens are the truth)
    const int32_t have = (int32_t) s.hist.size() - s.n_prompt;
    if (have > n_gen) {
        s.hist.resize(s.n_prompt + n_gen);
    } else {
        s.hist.insert(s.hist.end(), gen + have, gen + n_gen);
    }
    s.draft.clear();
    auto & dp = common_speculative_get_draft_params(d->spec, seq);
    dp.drafting = true;
    dp.n_max = n_max;
    dp.pos0 = (llama_pos) s.hist.size();
    dp.id_last = id_last;
    dp.prompt = &s.hist;
    dp.result = &s.draft;
    d->any = true;
}

void run(Drafter * d) noexcept {
    if (!d->any) return;
    d->any = false;
    if (d->ctx_dft == nullptr) {
        common_speculative_draft(d->spec);
        return;
    }
    std::vector<int32_t> wanted;
    for (int32_t s = 0; s < (int32_t) d->seqs.size(); ++s) {
        if (common_speculative_get_draft_params(d->spec, s).drafting) {
            wanted.push_back(s);
        }
    }
    try {
        if (sync_draft(d)) {
            common_speculative_draft(d->spec);
        }
    } catch (...) {
    }
    // drafting decoded the pending token and the draft in the draft context (all of the draft
    // but perhaps its last token: llama.cpp decodes a drafted token only to draft the next one).
    // Keep those cells: the target accepts the pending token and a prefix of the draft, which
    // the next sync then finds decoded (llama-server decodes them again); the rest goes there.
    llama_memory_t mem = llama_get_memory(d->ctx_dft);
    for (int32_t s : wanted) {
        Seq & q = d->seqs[s];
        auto & dp = common_speculative_get_draft_params(d->spec, s);
        if (q.dft.size() == q.hist.size() && dp.pos0 == (llama_pos) q.hist.size()) {
            q.dft.push_back(dp.id_last);
            if (!q.draft.empty()) {
                q.dft.insert(q.dft.end(), q.draft.begin(), q.draft.end() - 1);
            }
        }
        llama_memory_seq_rm(mem, s, (llama_pos) q.dft.size(), -1);
        dp.drafting = false;
    }
}

const std::vector<int32_t> & result(Drafter * d, int32_t seq) noexcept {
    return d->seqs[seq].draft;
}

int64_t caught_up(Drafter * d) noexcept {
    return d->n_caught_up;
}

void accept(Drafter * d, int32_t seq, int32_t n_accepted) noexcept {
    common_speculative_accept(d->spec, seq, (uint16_t) n_accepted);
}

}  // namespace lgspec
