# Building llama.cpp sampler chains from SamplingParams.  Included by _core.pyx.
#
# The order is the one llama.cpp's own common/sampling.cpp builds (see LLAMA_CPP_NOTES.md):
#   logit_bias -> penalties -> DRY -> top_n_sigma -> top_k -> typical -> top_p -> min_p -> XTC
#   -> temp_ext -> dist(seed);  mirostat 1/2: logit_bias -> temp -> mirostat.
# The grammar sampler is kept out of the chain: the generation step checks the sampled token
# against it and re-samples with the grammar only when the token is rejected.

from llamagen.sampling import SamplingParams


cdef uint32_t _draw_seed():
    cdef uint32_t s
    while True:
        s = int.from_bytes(_os.urandom(4), "little")
        if s != llama.LLAMA_DEFAULT_SEED:
            return s


cdef llama.llama_sampler * _build_chain(object p, const llama.llama_vocab * vocab, int32_t n_vocab,
                                         int32_t n_ctx, uint32_t seed) except NULL:
    """A new sampler chain for ``p`` (a SamplingParams).  The caller owns it."""
    cdef llama.llama_sampler_chain_params cp = llama.llama_sampler_chain_default_params()
    cdef llama.llama_sampler * chain
    cdef vector[llama.llama_logit_bias] biases
    cdef llama.llama_logit_bias lb
    cdef vector[const char *] breakers
    cdef int32_t last_n
    cdef size_t min_keep = p.min_keep
    cp.no_perf = True
    chain = llama.llama_sampler_chain_init(cp)
    if chain == NULL:
        raise MemoryError()
    try:
        if p.logit_bias:
            for tok, bias in p.logit_bias:
                check_token(tok, n_vocab)
                lb.token = tok
                lb.bias = bias
                biases.push_back(lb)
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_logit_bias(
                n_vocab, <int32_t>biases.size(), biases.data()))
        if p.mirostat == 0:
            last_n = p.repeat_last_n
            if last_n < 0:
                last_n = n_ctx            # -1 = the whole context (llama.cpp would read it as "off")
            if last_n != 0 and (p.repeat_penalty != 1.0 or p.frequency_penalty != 0.0
                                or p.presence_penalty != 0.0):
                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_penalties(
                    n_vocab, last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty))
            if p.dry_multiplier > 0.0:
                enc = [b.encode("utf-8") for b in p.dry_sequence_breakers]
                for b in enc:
                    breakers.push_back(<const char *> b)
                last_n = p.dry_penalty_last_n
                if last_n < 0:
                    last_n = n_ctx
                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_dry(
                    vocab, p.dry_multiplier, p.dry_base, p.dry_allowed_length, last_n,
                    breakers.data(), breakers.size()))
            if p.top_n_sigma > 0.0:
                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_n_sigma(p.top_n_sigma))
            if p.top_k > 0:
                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_k(p.top_k))
            if p.typical_p < 1.0:
                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_typical(p.typical_p, min_keep))
            if p.top_p < 1.0:
                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_p(p.top_p, min_keep))
            if p.min_p > 0.0:
                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_min_p(p.min_p, min_keep))
            if p.xtc_probability > 0.0:
                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_xtc(
                    p.xtc_probability, p.xtc_threshold, min_keep, seed))
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp_ext(
                p.temp, p.dynatemp_range, p.dynatemp_exponent))
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_dist(seed))
        elif p.mirostat == 1:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(p.temp))
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_mirostat(
                n_vocab, seed, p.mirostat_tau, p.mirostat_eta, 100))
        else:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(p.temp))
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_mirostat_v2(
                seed, p.mirostat_tau, p.mirostat_eta))
    except BaseException:
        llama.llama_sampler_free(chain)
        raise
    return chain


cdef llama.llama_sampler * _build_grammar(object p, const llama.llama_vocab * vocab) except? NULL:
    """The grammar sampler for ``p.grammar`` (NULL when there is none).  Raises GrammarError."""
    cdef llama.llama_sampler * g
    if p.grammar is None:
        return NULL
    gb = p.grammar.encode("utf-8")
    rb = p.grammar_root.encode("utf-8")
    _take_errors()
    g = llama.llama_sampler_init_grammar(vocab, gb, rb)
    if g == NULL:
        raise GrammarError(f"the grammar does not parse: {_take_errors() or 'invalid GBNF'}")
    return g
