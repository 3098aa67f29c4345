// Speculative drafting through llama.cpp's own common/speculative.h (n-gram drafters).  The
// verification -- one decode of the pending token and its draft, each position sampled by the
// request's own chain -- stays in the Cython core; this unit only keeps each sequence's token
// history for the drafter and hands back drafts.  Kept out of the Cython output so common's
// headers do not slow its compilation.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

struct llama_context;
struct llama_model;

namespace lgspec {

struct Drafter;

// A drafter for ``n_seq`` sequences (seq ids 0..n_seq-1).  ``type`` is one of llama.cpp's n-gram
// type names ("ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache");
// ``size_n`` / ``size_m`` / ``min_hits`` the n-gram sizes (0: llama.cpp's default).  NULL with
// ``err`` set when llama.cpp refuses.
Drafter * create(const char * type, uint32_t n_seq, int32_t size_n, int32_t size_m,
                 int32_t min_hits, std::string & err) noexcept;
// A draft-model drafter (llama.cpp's draft-simple) for ``n_seq`` sequences: a context of its own
// on ``draft`` (``n_ctx`` cells shared by the sequences, ``n_batch``, ``n_threads``), kept
// holding each sequence's history (the tokens in the target's KV cache) by run(), which decodes
// what the history gained since and removes what it lost, then lets llama.cpp draft.
// ``target``: only to check that the vocabularies agree.  NULL with ``err`` set on a refusal.
Drafter * create_draft(llama_model * draft, llama_context * target, uint32_t n_seq,
                       uint32_t n_ctx, uint32_t n_batch, int32_t n_threads,
                       std::string & err) noexcept;
void destroy(Drafter * d) noexcept;

// A new generation on ``seq``: its prompt (the tokens in the KV cache before the first sampled one).
void begin(Drafter * d, int32_t seq, const int32_t * prompt, int32_t n_prompt) noexcept;

// Ask for a draft of at most ``n_max`` tokens for ``seq``: ``gen`` / ``n_gen`` are the generated
// tokens whose KV cells are written (the history after the prompt), ``id_last`` the sampled token
// about to be decoded.  Drafts of every asked sequence are made by one run().
void want(Drafter * d, int32_t seq, const int32_t * gen, int32_t n_gen, int32_t id_last,
          int32_t n_max) noexcept;
void run(Drafter * d) noexcept;
// The draft run() made for ``seq`` (empty when it found none); cleared by the next want().
const std::vector<int32_t> & result(Drafter * d, int32_t seq) noexcept;

// draft-simple: generated tokens the draft context had to decode to catch up with the histories
// (those drafting left decoded are kept); 0 for n-gram drafters.  For tests and benchmarks.
int64_t caught_up(Drafter * d) noexcept;

// ``n_accepted`` tokens of ``seq``'s last draft were accepted (the drafter adapts).
void accept(Drafter * d, int32_t seq, int32_t n_accepted) noexcept;

}  // namespace lgspec
