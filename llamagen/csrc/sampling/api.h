// The whole sampling engine, as Cython sees it (llamagen/includes/sampling_engine.pxd): every part
// of llamagen/csrc/sampling/ and the C-style entry points below.  The engine selects the same
// token as llama.cpp's sampler chain; how each part keeps that: docs/sampling-engine.md.
#pragma once

#include "chain.h"
#include "engine.h"
#include "grammar.h"

// C-style entry points for Cython
typedef lgfs::Engine lgfs_engine;
typedef lgfs::Config lgfs_config;

static inline lgfs::Engine * lgfs_new(const lgfs::Config & c) { return new lgfs::Engine(c); }
static inline void lgfs_free(lgfs::Engine * e) { delete e; }
typedef lgfs::GrammarTrie lgfs_trie;
static inline lgfs::GrammarTrie * lgfs_trie_new(const llama_vocab * v) { return lgfs::grammar_trie_new(v); }
static inline void lgfs_trie_free(lgfs::GrammarTrie * t) { delete t; }
static inline int lgfs_supported() { return lgfs::fast_sampler_supported() ? 1 : 0; }
static inline int lgfs_expf_mode() { return lgfs::expf_mode(); }
static inline void lgfs_config_add_bias(lgfs::Config & c, llama_token t, float b) {
    c.bias.push_back(llama_logit_bias{t, b});
}

// llama_sampler_accept on a grammar sampler throws std::runtime_error when the token leaves the
// grammar no way to continue ("Unexpected empty grammar stack"): 0, or -1 instead of the throw
// (which would otherwise cross Cython's noexcept nogil code and abort the process).
static inline int lgfs_grammar_accept(llama_sampler * grammar, llama_token tok) noexcept {
    try {
        llama_sampler_accept(grammar, tok);
        return 0;
    } catch (...) {
        return -1;
    }
}
