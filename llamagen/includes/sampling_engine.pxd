# Raw declarations of llamagen's own sampling engine (llamagen/csrc/sampling/, through its api.h).
# No logic here: cimport as a namespace (`from llamagen.includes cimport sampling_engine as fs`).
from libc.stdint cimport int32_t, uint32_t, uint64_t
from libcpp cimport bool as cbool
from libcpp.string cimport string

from llamagen.includes.llama cimport llama_sampler, llama_token, llama_token_data, llama_vocab


cdef extern from "sampling/api.h" nogil:
    cdef cppclass lgfs_trie "lgfs::GrammarTrie":
        pass

    cdef cppclass lgfs_config "lgfs::Config":
        lgfs_config()
        int32_t n_vocab
        int32_t pen_last_n
        float pen_repeat
        float pen_freq
        float pen_present
        llama_sampler * dry
        int32_t dry_last_n
        float top_n_sigma
        int32_t top_k
        float typical_p
        float top_p
        float min_p
        size_t min_keep
        cbool xtc
        float xtc_p
        float xtc_t
        float temp
        int mirostat
        float tau
        float eta
        uint32_t seed
        const lgfs_trie * trie

    cdef cppclass lgfs_stats "lgfs::Stats":
        uint64_t steps
        uint64_t slow
        uint64_t why[8]
        uint64_t grammar_partial
        uint64_t grammar_trie
        uint64_t grammar_full
        uint64_t typical_tail_buckets

    cdef cppclass lgfs_engine "lgfs::Engine":
        lgfs_stats stats
        llama_token sample(const float * logits, llama_token_data * cand)
        llama_token resample_grammar(const float * logits, llama_token_data * cand, llama_sampler * grammar)
        void accept(llama_token tok)
        float mirostat_mu()
        string rng_state() except +
        bint set_rng_state(const string & s) except +

    lgfs_engine * lgfs_new(const lgfs_config & c) except +
    void lgfs_free(lgfs_engine * e)
    lgfs_trie * lgfs_trie_new(const llama_vocab * v) except +
    void lgfs_trie_free(lgfs_trie * t)
    int lgfs_supported()
    int lgfs_expf_mode()
    void lgfs_config_add_bias(lgfs_config & c, llama_token t, float b) except +
    int lgfs_grammar_accept(llama_sampler * grammar, llama_token tok)
