# Building llama.cpp sampler chains from SamplingParams.  Included by _core.pyx.
#
# The order is the one llama.cpp's own common/sampling.cpp builds (see LLAMA_CPP_NOTES.md):
#   logit_bias -> penalties -> DRY -> top_n_sigma -> top_k -> typical -> top_p -> min_p -> XTC
#   -> temp_ext -> dist(seed);  mirostat 1/2: logit_bias -> temp -> mirostat.
# The grammar sampler is kept out of the chain: the generation step checks the sampled token
# against it and re-samples with the grammar only when the token is rejected.
#
# Three engines run that chain: llama.cpp's own sampler objects (sampler_impl="llama.cpp"),
# llamagen's own engine (sampler_impl="fast", the default; llamagen/csrc/sampling/), which
# selects the same token for the same logits, parameters, seed and history, much faster, and
# llama.cpp's backend sampling (sampler_impl="backend"): the chain attached to the context runs
# inside llama_decode's graph on the model's output device (the GPU), as far as its samplers
# have device implementations; the host finishes the rest from what the device kept.

from libc.math cimport INFINITY
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
            if last_n < 0 or last_n > n_ctx:
                # -1 = the whole context (llama.cpp would read it as "off"); a longer window
                # sees the same tokens (a sequence never holds more than n_ctx) but llama.cpp would
                # allocate all of it up front
                last_n = n_ctx
            if last_n != 0 and (p.repeat_penalty != 1.0 or p.frequency_penalty != 0.0
                                or p.presence_penalty != 0.0):
                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_penalties(
                    n_vocab, last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty))
            if p.dry_multiplier > 0.0:
                enc = [b.encode("utf-8") for b in p.dry_sequence_breakers]
                for b in enc:
                    breakers.push_back(<const char *> b)
                last_n = p.dry_penalty_last_n
                if last_n < 0 or last_n > n_ctx:
                    # -1, or longer than the context: the context (see _build_chain)
                    last_n = n_ctx
                llama.llama_sampler_chain_add(chain, _init_dry(
                    vocab, p.dry_multiplier, p.dry_base, p.dry_allowed_length, last_n, breakers))
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


cdef llama.llama_sampler * _init_dry(const llama.llama_vocab * vocab, float multiplier, float base,
                                     int32_t allowed_length, int32_t last_n,
                                     vector[const char *] & breakers):
    """llama.cpp's DRY sampler, built without the GIL: it scans the whole vocabulary once per
    sequence breaker (~23 ms each at 262k tokens; SamplingParams allows at most 64 breakers)."""
    cdef llama.llama_sampler * s
    with nogil:
        s = llama.llama_sampler_init_dry(vocab, multiplier, base, allowed_length, last_n,
                                         breakers.data(), breakers.size())
    return s


cdef class _GrammarProto:
    """A built grammar sampler that nothing advances: sequences start from clones of it.  A clone
    copies the rules and stacks; building parses the GBNF and checks it (about a second for a
    2 MB schema grammar), which the engine thread used to do as each sequence started while every
    other stream waited (issue 35).  Freed when its last holder lets go, so a thread cloning it
    keeps it alive past an eviction."""
    cdef llama.llama_sampler * g
    cdef Py_ssize_t size

    def __dealloc__(self):
        if self.g != NULL:
            llama.llama_sampler_free(self.g)
            self.g = NULL


# prototypes kept per model: at most this many, and this many characters of GBNF in all (the
# built rules take a few bytes per character)
_GRAMMARS_KEPT = 64
_GRAMMAR_CHARS_KEPT = 32 << 20


cdef tuple _grammar_key(object p):
    return (p.gbnf, p.grammar_root, p.grammar_lazy, p.grammar_triggers, p.grammar_trigger_tokens,
            p.grammar_prefill, getattr(p, "_unique_spec", None))


cdef _GrammarProto _grammar_proto(object p, Model model):
    """The model's prototype of ``p``'s grammar (None when it has none), built and kept the first
    time.  Raises GrammarError."""
    cdef _GrammarProto proto
    if p.gbnf is None:
        return None
    key = _grammar_key(p)
    cache = model._grammars
    found = _lru_get(cache, key)
    if found is not None:
        return <_GrammarProto> found
    proto = _GrammarProto()
    proto.g = _build_grammar(p, model._vocab)
    proto.size = len(p.gbnf)
    if proto.size <= _GRAMMAR_CHARS_KEPT:
        _lru_put(cache, key, proto, _GRAMMARS_KEPT, _proto_size, _GRAMMAR_CHARS_KEPT)
    return proto


def _proto_size(_GrammarProto proto):
    return proto.size


cdef llama.llama_sampler * _grammar_for(object p, Model model) except? NULL:
    """A fresh grammar sampler for ``p`` (NULL when it has none): a clone of the model's
    prototype.  Raises GrammarError."""
    cdef llama.llama_sampler * g
    cdef _GrammarProto proto = _grammar_proto(p, model)
    if proto is None:
        return NULL
    with nogil:
        g = llama.llama_sampler_clone(proto.g)
    return g


cdef llama.llama_sampler * _build_grammar(object p, const llama.llama_vocab * vocab) except? NULL:
    """The grammar sampler for ``p.gbnf`` (``grammar``, or the one made of a JSON schema; NULL
    when there is none), built from its text: _grammar_for clones a kept one instead.  Raises
    GrammarError."""
    cdef llama.llama_sampler * g
    cdef llama.llama_sampler * plain
    grammar = p.gbnf
    if grammar is None:
        return NULL
    n_vocab = llama.llama_vocab_n_tokens(vocab)
    problem = _gbnf_check(grammar, n_vocab)
    if problem is not None:
        raise GrammarError(f"the grammar does not parse: {problem}")
    cdef string gs = grammar.encode("utf-8")
    cdef string rs = p.grammar_root.encode("utf-8")
    cdef cbool lazy = p.grammar_lazy
    cdef string printed
    cdef vector[string] patterns
    cdef vector[int] trig_tokens
    cdef vector[int] prefill
    cdef vector[string] no_patterns
    cdef vector[int] no_tokens
    _take_errors()
    # (llama.cpp's parser prints its reason to stderr: captured into the error instead)
    for t in p.grammar_trigger_tokens + p.grammar_prefill:
        if t >= n_vocab:
            raise ValueError(f"grammar_trigger_tokens/grammar_prefill name token {t}, not a token "
                             f"id in [0, {n_vocab})")
    for x in p.grammar_triggers:
        patterns.push_back(x.encode("utf-8"))
    trig_tokens = p.grammar_trigger_tokens
    prefill = p.grammar_prefill
    # a large grammar takes a while to build: other threads (a server's event loop) run meanwhile
    with nogil:
        g = lgschema.grammar_init(vocab, gs.c_str(), rs.c_str(), lazy, patterns, trig_tokens,
                                  prefill, printed)
    if g == NULL:
        said = printed.decode("utf-8", "replace")
        if p.grammar_lazy or p.grammar_prefill:
            # which part llama.cpp refused: the grammar itself, or a trigger regex / the prefill
            printed.clear()
            with nogil:
                plain = lgschema.grammar_init(vocab, gs.c_str(), rs.c_str(), False, no_patterns,
                                              no_tokens, no_tokens, printed)
            if plain != NULL:
                llama.llama_sampler_free(plain)
                raise GrammarError(f"the grammar's trigger patterns or prefill were refused: "
                                   f"{said.strip() or 'unknown error'}")
            said = printed.decode("utf-8", "replace")
        reason = _grammar_reason(said) or _take_errors() or "invalid GBNF"
        logger.error("grammar does not parse: %s", reason)
        raise GrammarError(f"the grammar does not parse: {reason}")
    _take_errors()
    unique = getattr(p, "_unique_spec", None)
    if unique is not None:
        # uniqueItems: a grammar cannot remember earlier items; the wrapper rejects repeats
        spec = unique.encode("utf-8")
        g = lgschema.wrap(g, vocab, spec, printed)
        if g == NULL:
            raise GrammarError(f"uniqueItems: {printed.decode('utf-8', 'replace')}")
    return g


def _grammar_reason(str printed):
    """The reason in what llama.cpp's grammar parser printed ("parse: error parsing grammar:
    <reason>\n\n<the grammar>")."""
    for line in printed.splitlines():
        if "error parsing grammar:" in line:
            return line.split("error parsing grammar:", 1)[1].strip()
    return printed.strip().splitlines()[0] if printed.strip() else ""


def _json_schema_to_grammar(str text):
    """GBNF of a JSON schema (its JSON text) by llama.cpp's converter; ValueError when it cannot
    convert it exactly (see llamagen.structured)."""
    cdef string src = text.encode("utf-8")
    cdef string grammar, err, warnings
    cdef int rc
    with nogil:
        rc = lgschema.to_grammar(src, grammar, err, warnings)
    if rc != 0:
        raise ValueError(err.decode("utf-8", "replace").replace("JSON schema conversion failed:\n",
                                                                "json_schema cannot be converted: "))
    if warnings.size():
        raise ValueError("json_schema cannot be converted exactly: "
                         + warnings.decode("utf-8", "replace")
                         + " (llama.cpp's converter would accept any string there)")
    return grammar.decode("utf-8")


_structured._install_converter(_json_schema_to_grammar)


# -- llamagen's own engine -------------------------------------------------------------------

def _fast_supported(object p):
    """Can the fast engine run ``p`` token-identically to llama.cpp's chain?  (Dynamic temperature
    is left to llama.cpp's implementation, and so is everything on a C++ library other than
    libstdc++: the engine reproduces libstdc++'s sort and random algorithms.)"""
    cdef float drange = p.dynatemp_range
    if not fs.lgfs_supported():
        return False
    if p.mirostat == 0 and drange > 0.0:
        return False
    return True


def _fast_info():
    """Internal: whether the fast engine is available and which expf its vector kernels use."""
    mode = fs.lgfs_expf_mode()
    return {"supported": bool(fs.lgfs_supported()),
            "expf": {0: "libm (scalar)", 1: "glibc expf, no FMA (vector)",
                     2: "glibc expf, FMA (vector)"}.get(mode, str(mode))}


cdef const fs.lgfs_trie * _trie_for(Model model, object p) except? NULL:
    """The prefix tree that grammar re-samples of ``p`` walk, or NULL: none without a grammar, and
    none for a grammar that may name tokens (<[id]>, <token>: matched by id, not by piece)."""
    grammar = p.gbnf
    if grammar is None or "<" in grammar or p.grammar_lazy:
        return NULL                 # (a lazy grammar allows everything until it wakes)
    return model._grammar_trie()


cdef fs.lgfs_engine * _build_fast(object p, const llama.llama_vocab * vocab, int32_t n_vocab,
                                  int32_t n_ctx, uint32_t seed,
                                  const fs.lgfs_trie * trie) except NULL:
    """The fast engine for ``p`` (a SamplingParams the engine supports).  The caller owns it."""
    cdef fs.lgfs_config c
    cdef vector[const char *] breakers
    cdef int32_t last_n
    cdef float f_rep, f_freq, f_pres
    cdef llama.llama_sampler * dry = NULL
    c.n_vocab = n_vocab
    c.seed = seed
    c.trie = trie
    c.min_keep = p.min_keep
    c.temp = p.temp
    if p.logit_bias:
        for tok, bias in p.logit_bias:
            check_token(tok, n_vocab)
            fs.lgfs_config_add_bias(c, tok, bias)
    if p.mirostat == 0:
        last_n = p.repeat_last_n
        if last_n < 0 or last_n > n_ctx:
            # -1, or longer than the context: the context (see _build_chain)
            last_n = n_ctx
        f_rep = p.repeat_penalty
        f_freq = p.frequency_penalty
        f_pres = p.presence_penalty
        if last_n > 0 and (p.repeat_penalty != 1.0 or p.frequency_penalty != 0.0
                           or p.presence_penalty != 0.0) \
                and not (f_rep == 1.0 and f_freq == 0.0 and f_pres == 0.0):
            c.pen_last_n = last_n
            c.pen_repeat = f_rep
            c.pen_freq = f_freq
            c.pen_present = f_pres
        if p.top_n_sigma > 0.0:
            c.top_n_sigma = p.top_n_sigma
        if p.top_k > 0:
            c.top_k = p.top_k
        if p.typical_p < 1.0:
            c.typical_p = p.typical_p
        if p.top_p < 1.0:
            c.top_p = p.top_p
        if p.min_p > 0.0:
            c.min_p = p.min_p
        if p.xtc_probability > 0.0:
            c.xtc = True
            c.xtc_p = p.xtc_probability
            c.xtc_t = p.xtc_threshold
        if p.dry_multiplier > 0.0:
            # DRY itself is llama.cpp's sampler, applied by the engine to the tokens it can reach
            enc = [b.encode("utf-8") for b in p.dry_sequence_breakers]
            for b in enc:
                breakers.push_back(<const char *> b)
            last_n = p.dry_penalty_last_n
            if last_n < 0 or last_n > n_ctx:
                # -1, or longer than the context: the context (see _build_chain)
                last_n = n_ctx
            dry = _init_dry(vocab, p.dry_multiplier, p.dry_base, p.dry_allowed_length, last_n,
                            breakers)
            if dry == NULL:
                raise MemoryError()
            c.dry = dry
            c.dry_last_n = last_n
    else:
        c.mirostat = p.mirostat
        c.tau = p.mirostat_tau
        c.eta = p.mirostat_eta
    try:
        return fs.lgfs_new(c)
    except BaseException:
        if dry != NULL:
            llama.llama_sampler_free(dry)
        raise


cdef inline void _whole_vocab(llama.llama_token_data_array * arr, llama.llama_token_data * cand,
                              const float * logits, int32_t n_vocab) noexcept nogil:
    """``arr`` = every token in id order with its logit: the candidate array llama.cpp's chain
    and grammar start from."""
    cdef int32_t i
    for i in range(n_vocab):
        cand[i].id = i
        cand[i].logit = logits[i]
        cand[i].p = 0.0
    arr.data = cand
    arr.size = n_vocab
    arr.selected = -1
    arr.sorted = False


cdef enum:
    # _sample_token's answer when the grammar allows no token at all (a rule nothing can match:
    # an empty character class, a token id past the vocabulary, every allowed token banned ...)
    GRAMMAR_DEAD_END = -2
    # _backend_token's answer when the decode left nothing to sample from for that output row
    BACKEND_NO_OUTPUT = -3


def _dead_end_message(n_done):
    return (f"the grammar allows no token after {n_done} generated token(s): a rule that nothing "
            "can match (an empty character class, a token id past the vocabulary, a character "
            "no token contains) or a logit_bias that bans every token the grammar allows")


cdef object _seq_failure(SeqCore * q):
    """The exception for a sequence that ended with FINISH_ERROR."""
    if q.error == BACKEND_NO_OUTPUT:
        return LlamaError(f"backend sampling left no token and no logits after {q.tokens.size()} "
                          "generated token(s) (llama.cpp's sampled outputs were missing)")
    return GrammarError(_dead_end_message(q.tokens.size()))


cdef llama.llama_token _backend_token(llama.llama_context * lctx, int32_t idx,
                                      llama.llama_sampler * chain,
                                      llama.llama_token_data * cand) noexcept nogil:
    """The token backend sampling chose for output row ``idx``, accepted into ``chain`` (penalty
    history, the RNG's commit).  When the chain has samplers without a device implementation
    (typical, XTC, DRY, mirostat, ...), the device ran the prefix it could and left candidates:
    the rest of the chain runs here on them (llama_sampler_apply skips the device's part), as
    llama.cpp's common_sampler does."""
    cdef llama.llama_token tok = llama.llama_get_sampled_token_ith(lctx, idx)
    cdef llama.llama_token_data_array arr
    cdef const float * lg
    cdef const float * pr
    cdef const llama.llama_token * ids
    cdef uint32_t n, n_ids, i
    if tok == llama.LLAMA_TOKEN_NULL:
        lg = llama.llama_get_sampled_logits_ith(lctx, idx)
        if lg == NULL:
            return BACKEND_NO_OUTPUT
        n = llama.llama_get_sampled_logits_count_ith(lctx, idx)
        # no candidates (count 0): no sampler on the device filtered, row i is token i
        ids = llama.llama_get_sampled_candidates_ith(lctx, idx)
        n_ids = llama.llama_get_sampled_candidates_count_ith(lctx, idx)
        if n_ids == 0:
            ids = NULL
        elif n_ids != n:
            return BACKEND_NO_OUTPUT
        pr = llama.llama_get_sampled_probs_ith(lctx, idx)
        if pr != NULL and llama.llama_get_sampled_probs_count_ith(lctx, idx) != n:
            pr = NULL
        if n == 0:
            return BACKEND_NO_OUTPUT
        for i in range(n):
            cand[i].id = ids[i] if ids != NULL else <llama.llama_token> i
            cand[i].logit = lg[i]
            cand[i].p = pr[i] if pr != NULL else 0.0
        arr.data = cand
        arr.size = n
        arr.selected = -1
        arr.sorted = False
        llama.llama_sampler_apply(chain, &arr)
        if arr.selected < 0 or <size_t> arr.selected >= arr.size:
            return BACKEND_NO_OUTPUT
        tok = arr.data[arr.selected].id
    llama.llama_sampler_accept(chain, tok)
    return tok


cdef inline bint _grammar_allows(llama.llama_sampler * grammar, llama.llama_token tok) noexcept nogil:
    cdef llama.llama_token_data single
    cdef llama.llama_token_data_array one
    single.id = tok
    single.logit = 1.0
    single.p = 0.0
    one.data = &single
    one.size = 1
    one.selected = -1
    one.sorted = False
    llama.llama_sampler_apply(grammar, &one)
    return single.logit != -INFINITY


cdef bint _grammar_only_ends(llama.llama_sampler * grammar, const llama.llama_vocab * vocab,
                             int32_t n_vocab, llama.llama_token_data * cand) noexcept nogil:
    """Whether the grammar allows no token but an end-of-generation one (it is complete and
    cannot go on): one check over the whole vocabulary, in ``cand``'s n_vocab entries."""
    cdef llama.llama_token_data_array arr
    cdef int32_t i
    for i in range(n_vocab):
        cand[i].id = i
        cand[i].logit = 0.0
        cand[i].p = 0.0
    arr.data = cand
    arr.size = n_vocab
    arr.selected = -1
    arr.sorted = False
    llama.llama_sampler_apply(grammar, &arr)
    for i in range(<int32_t> arr.size):
        if arr.data[i].logit != -INFINITY and not llama.llama_vocab_is_eog(vocab, arr.data[i].id):
            return False
    return True


cdef llama.llama_token _sample_token(llama.llama_sampler * chain, fs.lgfs_engine * fast,
                                     llama.llama_sampler * grammar, int32_t n_vocab,
                                     const float * logits, llama.llama_token_data * cand,
                                     llama.llama_token forced) noexcept nogil:
    """One sampling step with either engine: the chain, then the grammar check; re-sample with
    the grammar applied to every candidate only on rejection; accept the token (``forced`` >= 0:
    accept that one instead -- the replay tests drive several samplers along one history).
    GRAMMAR_DEAD_END (nothing accepted) when the grammar allows no token."""
    cdef llama.llama_token_data_array arr
    cdef llama.llama_token tok, acc
    if fast != NULL:
        tok = fast.sample(logits, cand)
    else:
        _whole_vocab(&arr, cand, logits, n_vocab)
        llama.llama_sampler_apply(chain, &arr)
        tok = arr.data[arr.selected].id
    acc = forced if forced >= 0 else tok
    if grammar != NULL:
        if not _grammar_allows(grammar, tok):
            if fast != NULL:
                tok = fast.resample_grammar(logits, cand, grammar)
            else:
                _whole_vocab(&arr, cand, logits, n_vocab)
                llama.llama_sampler_apply(grammar, &arr)
                llama.llama_sampler_apply(chain, &arr)
                tok = arr.data[arr.selected].id
            # re-sampled from the grammar's accepted set: a token it still rejects means that
            # set was empty (llama.cpp's accept would throw and end the process)
            if forced < 0 and not _grammar_allows(grammar, tok):
                return GRAMMAR_DEAD_END
            acc = forced if forced >= 0 else tok
        if fs.lgfs_grammar_accept(grammar, acc) != 0:
            return GRAMMAR_DEAD_END
    if fast != NULL:
        fast.accept(acc)
    else:
        llama.llama_sampler_accept(chain, acc)
    return tok


cdef class _ReplaySampler:
    """Internal (tests, benchmarks): one engine's sampler state for ``params``, stepped on given
    logits.  ``step(logits, forced=-1)`` samples exactly as a generation step does (chain, grammar
    check, re-sample on rejection) and accepts ``forced`` (>= 0) or the chosen token."""
    cdef llama.llama_sampler * chain
    cdef llama.llama_sampler * grammar
    cdef fs.lgfs_engine * fast
    cdef int32_t n_vocab
    cdef vector[llama.llama_token_data] cand
    cdef readonly list chosen
    cdef readonly object params
    cdef readonly str impl
    cdef readonly object model

    def __cinit__(self):
        self.chain = NULL
        self.grammar = NULL
        self.fast = NULL

    def __init__(self, Context ctx not None, params, impl=None):
        cdef int32_t n_ctx
        if not isinstance(params, SamplingParams):
            raise TypeError("params must be a llamagen.SamplingParams")
        if params.seed is None:
            raise ValueError("a replay needs a fixed seed")
        ctx._check()
        impl = params.sampler_impl if impl is None else impl
        n_ctx = llama.llama_n_ctx_seq(ctx._ctx)
        self.n_vocab = ctx._n_vocab
        self.model = ctx.model
        if impl == "fast":
            if not _fast_supported(params):
                raise ValueError("the fast engine does not run this configuration")
            self.fast = _build_fast(params, ctx._vocab, ctx._n_vocab, n_ctx, <uint32_t> params.seed,
                                    _trie_for(ctx.model, params))
        elif impl == "llama.cpp":
            self.chain = _build_chain(params, ctx._vocab, ctx._n_vocab, n_ctx, <uint32_t> params.seed)
        else:
            raise ValueError(f"impl must be 'fast' or 'llama.cpp', got {impl!r}")
        self.grammar = _grammar_for(params, ctx.model)
        self.cand.resize(ctx._n_vocab)
        self.chosen = []
        self.params = params
        self.impl = impl

    def __dealloc__(self):
        if self.chain != NULL:
            llama.llama_sampler_free(self.chain)
        if self.grammar != NULL:
            llama.llama_sampler_free(self.grammar)
        if self.fast != NULL:
            fs.lgfs_free(self.fast)

    cdef llama.llama_token step_ptr(self, const float * logits, llama.llama_token forced) except *:
        cdef llama.llama_token tok
        with nogil:
            tok = _sample_token(self.chain, self.fast, self.grammar, self.n_vocab, logits,
                                self.cand.data(), forced)
        if tok == GRAMMAR_DEAD_END:
            raise GrammarError(_dead_end_message(len(self.chosen)))
        self.chosen.append(tok)
        return tok

    def step(self, const float[::1] logits not None, int forced=-1):
        if logits.shape[0] != self.n_vocab:
            raise ValueError(f"expected {self.n_vocab} logits, got {logits.shape[0]}")
        if forced >= self.n_vocab:
            raise ValueError("forced token out of range")
        return self.step_ptr(&logits[0], forced)

    @property
    def slow_steps(self):
        """Steps where the fast engine fell back to its exact port of llama.cpp's code."""
        return None if self.fast == NULL else self.fast.stats.slow

    @property
    def slow_reasons(self):
        """Internal diagnostics: counts of fast-path fallbacks by reason (see Stats in csrc/sampling/engine.h)."""
        if self.fast == NULL:
            return None
        return [self.fast.stats.why[i] for i in range(8)]

    @property
    def grammar_resamples(self):
        """The fast engine's grammar re-samples after a rejected token: (decided from the best
        candidates, by walking the vocabulary's prefix tree, by asking about every candidate)."""
        if self.fast == NULL:
            return None
        return (self.fast.stats.grammar_partial, self.fast.stats.grammar_trie,
                self.fast.stats.grammar_full)

    @property
    def typical_tail_buckets(self):
        """Fast typical-p steps whose entropy tail crossed a binade and was summed bucket by
        bucket (internal: lets the tests prove that path ran)."""
        return None if self.fast == NULL else self.fast.stats.typical_tail_buckets

    @property
    def mirostat_mu(self):
        return None if self.fast == NULL else self.fast.mirostat_mu()


def _replay_run(Context ctx not None, prompt, driver_params, samplers, int n_steps,
                bint stop_at_eog=True, logits_out=None):
    """Internal: generate ``n_steps`` tokens from ``prompt`` with ``driver_params`` (llama.cpp's
    engine) and, at every step, let each _ReplaySampler in ``samplers`` sample from the same
    logits and accept the driver's token (same logits, same history).  Returns the driver's
    tokens; each sampler's choices are in its ``chosen``.  ``logits_out``: a list to append each
    step's logits to (bytes of float32)."""
    cdef _ReplaySampler driver = _ReplaySampler(ctx, driver_params, "llama.cpp")
    cdef _ReplaySampler s
    cdef vector[llama.llama_token] toks
    cdef int32_t n_batch, i, n, total, rc = 0, n_ctx
    cdef llama.llama_token tok
    cdef const float * logits
    cdef list out = []
    for s in samplers:
        if s.n_vocab != ctx._n_vocab:
            raise ValueError("a sampler was built for another vocabulary")
    ctx._check()
    n_ctx = llama.llama_n_ctx_seq(ctx._ctx)
    if isinstance(prompt, (str, bytes)):
        toks = _tokenize(ctx._vocab, prompt, True, True)
    else:
        toks = prompt
    total = <int32_t> toks.size()
    if total == 0 or total >= n_ctx:
        raise ValueError("bad prompt length for this context")
    ctx._acquire()
    try:
        ctx._take_over()
        ctx._use_lora(ctx._lora_default)
        n_batch = llama.llama_n_batch(ctx._ctx)
        llama.llama_memory_clear(llama.llama_get_memory(ctx._ctx), True)
        i = 0
        while i < total:
            n = min(total - i, n_batch)
            rc = llama.llama_decode(ctx._ctx, llama.llama_batch_get_one(toks.data() + i, n))
            if rc != 0:
                check_decode(rc, b"replay prefill")
            i += n
        for i in range(n_steps):
            logits = llama.llama_get_logits_ith(ctx._ctx, -1)
            if logits_out is not None:
                logits_out.append(PyBytes_FromStringAndSize(<const char *> logits,
                                                            ctx._n_vocab * sizeof(float)))
            tok = driver.step_ptr(logits, -1)
            for s in samplers:
                s.step_ptr(logits, tok)
            out.append(tok)
            if stop_at_eog and llama.llama_vocab_is_eog(ctx._vocab, tok):
                break
            if total + i + 1 >= n_ctx:
                break
            rc = llama.llama_decode(ctx._ctx, llama.llama_batch_get_one(&tok, 1))
            if rc != 0:
                check_decode(rc, b"replay step")
    finally:
        llama.llama_memory_clear(llama.llama_get_memory(ctx._ctx), True)
        ctx._release()
    return out


def _check_grammar(Model model not None, params):
    """Raise GrammarError now if ``params.grammar`` does not parse for ``model``'s vocabulary
    (what starting a sequence would raise), so a server can refuse the request up front.  The
    grammar built here is kept: its sequences start from clones of it."""
    model._check()
    if params.gbnf is None:
        return
    model._pin()
    try:
        _grammar_proto(params, model)
    finally:
        model._release_user()
