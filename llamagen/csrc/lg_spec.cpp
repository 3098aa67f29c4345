#include "lg_spec.h"

#include "common.h"
#include "speculative.h"

#include <exception>

namespace lgspec {

struct Seq {
    llama_tokens hist;        // prompt + generated tokens in the KV cache
    int32_t n_prompt = 0;
    llama_tokens draft;
};

struct Drafter {
    common_params_speculative params;
    common_speculative * spec = nullptr;
    std::vector<Seq> seqs;
    bool any = false;         // want() was called since the last run()
};

Drafter * create(const char * type, uint32_t n_seq, int32_t size_n, int32_t size_m,
                 int32_t min_hits, std::string & err) noexcept {
    try {
        const common_speculative_type t = common_speculative_type_from_name(type);
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
        auto * d = new Drafter();
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
        d->spec = common_speculative_init(d->params, n_seq);
        if (d->spec == nullptr) {
            delete d;
            err = std::string("llama.cpp made no drafter of type '") + type + "'";
            return nullptr;
        }
        d->seqs.resize(n_seq);
        return d;
    } catch (const std::exception & e) {
        err = e.what();
    } catch (...) {
        err = "unknown error creating the drafter";
    }
    return nullptr;
}

void destroy(Drafter * d) noexcept {
    if (d == nullptr) return;
    common_speculative_free(d->spec);
    delete d;
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
    common_speculative_draft(d->spec);
}

const std::vector<int32_t> & result(Drafter * d, int32_t seq) noexcept {
    return d->seqs[seq].draft;
}

void accept(Drafter * d, int32_t seq, int32_t n_accepted) noexcept {
    common_speculative_accept(d->spec, seq, (uint16_t) n_accepted);
}

}  // namespace lgspec
