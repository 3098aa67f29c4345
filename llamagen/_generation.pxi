# GenerationState: begin / next / end streaming over one context.  Included by _core.pyx.
#
# Each step runs in one nogil block: decode the previous token, sample (chain, then the grammar
# check), accept, end-of-generation check, token -> piece, UTF-8 hold-back, stop-string hold-back.
# Nothing in a step grows with the length of the output: only the held-back bytes (at most a
# partial character plus the longest stop string) are looked at again.

from libc.math cimport INFINITY

cdef enum:
    ENGINE_FAST = 0
    ENGINE_LLAMA_CPP = 1
    ENGINE_BACKEND = 2

_ENGINE_NAMES = {ENGINE_FAST: "fast", ENGINE_LLAMA_CPP: "llama.cpp", ENGINE_BACKEND: "backend"}


cdef enum:
    FINISH_NONE = 0
    FINISH_STOP = 1
    FINISH_LENGTH = 2
    FINISH_ERROR = 3        # the grammar allows no token (GrammarError)
    FINISH_CANCELLED = 4    # end() before the generation finished

_FINISH_NAMES = {FINISH_NONE: None, FINISH_STOP: "stop", FINISH_LENGTH: "length",
                 FINISH_ERROR: "error", FINISH_CANCELLED: "cancelled"}


cdef inline int _utf8_len(unsigned char c) noexcept nogil:
    if c < 0x80:
        return 1
    if 0xC2 <= c <= 0xDF:
        return 2
    if 0xE0 <= c <= 0xEF:
        return 3
    if 0xF0 <= c <= 0xF4:
        return 4
    return 0     # continuation byte or invalid lead


cdef inline bint _utf8_cont_ok(unsigned char lead, Py_ssize_t k, unsigned char c) noexcept nogil:
    """Is ``c`` valid as the k-th byte (k >= 1) of a sequence starting with ``lead``?"""
    if k == 1:
        if lead == 0xE0:
            return 0xA0 <= c <= 0xBF
        if lead == 0xED:
            return 0x80 <= c <= 0x9F
        if lead == 0xF0:
            return 0x90 <= c <= 0xBF
        if lead == 0xF4:
            return 0x80 <= c <= 0x8F
    return 0x80 <= c <= 0xBF


cdef size_t _utf8_take(string & raw, string & out, bint final) noexcept nogil:
    """Move the valid UTF-8 prefix of ``raw`` to ``out``; broken sequences become U+FFFD.

    An incomplete character at the end stays in ``raw`` unless ``final``.  Returns bytes consumed.
    """
    cdef size_t i = 0, n = raw.size(), k
    cdef int need
    cdef unsigned char c
    cdef bint ok
    while i < n:
        c = <unsigned char> raw[i]
        need = _utf8_len(c)
        if need == 1:
            out.push_back(<char> c)
            i += 1
            continue
        if need == 0:
            out.append(b"\xef\xbf\xbd")
            i += 1
            continue
        ok = True
        k = 1
        while k < <size_t> need and i + k < n:
            if not _utf8_cont_ok(c, k, <unsigned char> raw[i + k]):
                ok = False
                break
            k += 1
        if not ok:
            out.append(b"\xef\xbf\xbd")    # the lead byte and what followed it so far
            i += k
            continue
        if k < <size_t> need:               # ran out of bytes: the character may still complete
            if not final:
                break
            out.append(b"\xef\xbf\xbd")
            i = n
            break
        out.append(raw, i, need)
        i += need
    raw.erase(0, i)
    return i


cdef cppclass SeqCore:
    # One sequence's sampling and text state: sampler chain, grammar, generated tokens, the
    # UTF-8 / stop-string hold-back, and (for batches) its prompt feed and KV slot.  A plain C++
    # object, so single streams and batches step it without the GIL (and batches in parallel).
    llama.llama_sampler * chain             # llama.cpp's chain (sampler_impl "llama.cpp"/"backend")
    fs.lgfs_engine * fast                   # llamagen's engine (sampler_impl="fast"), or NULL
    bint backend                            # sampler_impl="backend": attach the chain to the context
    bint attached                           # ... done: the context owns ``chain`` now and samples
                                            # with it inside llama_decode (see Context._attach)
    int32_t error                           # why finish is FINISH_ERROR (GRAMMAR_DEAD_END, ...)
    int engine                              # ENGINE_*: what chose the tokens (kept after end())
    llama.llama_sampler * grammar
    const llama.llama_vocab * vocab
    int32_t n_vocab
    vector[llama.llama_token] tokens
    vector[llama.llama_token] preserved    # sorted: special tokens whose text is shown
    vector[llama.llama_token] prompt       # batches: the prompt still being fed
    int32_t n_fed                           # batches: prompt tokens already in the KV cache
    int32_t slot                            # batches: the llama seq_id in use (-1: none)
    int32_t batch_idx                       # batches: output row in the current batch (-1: none)
    int32_t fed_now                         # batches: prompt tokens put in the current batch
    int32_t n_cached                        # batches: prompt tokens found in the KV cache (a
                                            # slot's cached prefix or another sequence's copy)
    int64_t uid                             # batches: the id BatchGenerator.add returned
    llama.llama_token pending               # sampled and emitted, not yet decoded (-1: none)
    int32_t n_past                          # this sequence's tokens in the KV cache
    int32_t n_ctx                           # cells available to this sequence
    int32_t max_new
    int32_t n_prompt
    bint ignore_eos
    int finish
    string raw                              # bytes of an unfinished UTF-8 character
    string text                             # valid UTF-8 held back: could start a stop string
    string out                              # the chunk produced by the current step
    vector[string] stops
    int32_t stop_index                      # which of ``stops`` ended the text (-1: none)
    int64_t t_sample_ns      # time spent choosing tokens (ns: a tiny model's step is < 1 us)
    int32_t n_logprobs                      # -1: no logprobs; else alternatives per token (<= 20)
    vector[float] lp                        # per generated token: its logprob
    vector[int32_t] lp_ids                  # ... n_logprobs most likely ids (most likely first)
    vector[float] lp_top                    # ... and their logprobs
    # speculative decoding (SamplingParams.speculative): a drafter proposes what follows the
    # pending token, one decode computes all of it, verify() keeps the drafted tokens only while
    # they equal what this sequence's own sampling picks (see llamagen/speculative.py)
    lgspec.Drafter * drafter                # NULL: no drafting
    bint owns_drafter                       # single streams own theirs; a batch shares one per kind
    bint spec_begun                         # the drafter has seen the prompt
    int32_t dseq                            # this sequence's id in the drafter
    int32_t spec_n_max
    int32_t spec_n_min
    bint spec_adaptive
    double spec_s                           # decayed counts of drafted tokens accepted and of
    double spec_f                           # drafts cut short: this sequence's acceptance rate
    int32_t spec_pause                      # steps left without drafting (adaptive back-off)
    int32_t spec_backoff                    # the next pause's length
    int32_t spec_acc                        # drafted tokens the latest verify() accepted (-1: none)
    bint spec_asked                         # spec_want asked the drafter this step
    int32_t draft_idx                       # batch row of draft[0]
    vector[llama.llama_token] draft         # this step's draft (after the pending token)
    int64_t n_drafted                       # totals: tokens drafted and verified, ...
    int64_t n_accepted                      # ... of those accepted, ...
    int64_t n_verified                      # ... and decodes that verified a draft

    __init__():
        this.chain = NULL
        this.fast = NULL
        this.grammar = NULL
        this.backend = False
        this.attached = False
        this.error = 0
        this.engine = ENGINE_LLAMA_CPP
        this.pending = -1
        this.finish = FINISH_NONE
        this.n_fed = 0
        this.slot = -1
        this.batch_idx = -1
        this.fed_now = 0
        this.n_cached = 0
        this.stop_index = -1
        this.uid = -1
        this.t_sample_ns = 0
        this.n_logprobs = -1
        this.drafter = NULL
        this.owns_drafter = False
        this.spec_begun = False
        this.dseq = 0
        this.spec_n_max = 0
        this.spec_n_min = 0
        this.spec_adaptive = True
        this.spec_s = 0.0
        this.spec_f = 0.0
        this.spec_pause = 0
        this.spec_backoff = 1
        this.spec_acc = -1
        this.spec_asked = False
        this.draft_idx = -1
        this.n_drafted = 0
        this.n_accepted = 0
        this.n_verified = 0

    __dealloc__():
        this.free_samplers()

    void drop_attached() noexcept nogil:
        # forget an attached chain: the context owns it (and frees it when it detaches it)
        if this.attached:
            this.attached = False
            this.chain = NULL

    void free_samplers() noexcept nogil:
        this.drop_attached()
        if this.drafter != NULL and this.owns_drafter:
            lgspec.destroy(this.drafter)
        this.drafter = NULL
        this.draft.clear()
        if this.chain != NULL:
            llama.llama_sampler_free(this.chain)
            this.chain = NULL
        if this.fast != NULL:
            fs.lgfs_free(this.fast)
            this.fast = NULL
        if this.grammar != NULL:
            llama.llama_sampler_free(this.grammar)
            this.grammar = NULL

    llama.llama_token sample(const float * logits, llama.llama_token_data * cand) noexcept nogil:
        # the chain (llama.cpp's objects or llamagen's fast engine), then the grammar check;
        # re-sample with the grammar only on rejection; accept (see _sample_token)
        return _sample_token(this.chain, this.fast, this.grammar, this.n_vocab, logits, cand, -1)

    void attach(bint ok) noexcept nogil:
        # the outcome of Context._attach for this sequence's chain
        this.attached = ok
        if ok:
            this.engine = ENGINE_BACKEND

    void flush() noexcept nogil:
        # move everything held back into the output (the generation is over)
        _utf8_take(this.raw, this.text, True)
        this.out.append(this.text)
        this.text.clear()

    void emit() noexcept nogil:
        # move held text to the output, except what could still begin a stop string
        cdef size_t best = <size_t> -1, pos, j, keep = 0, L, n
        cdef size_t s
        cdef int32_t which = -1
        _utf8_take(this.raw, this.text, False)
        if this.stops.size() == 0:
            this.out.append(this.text)
            this.text.clear()
            return
        for s in range(this.stops.size()):
            pos = this.text.find(this.stops[s])
            if pos != <size_t> -1 and pos < best:
                best = pos
                which = <int32_t> s
        if best != <size_t> -1:
            this.stop_index = which
            this.out.append(this.text, 0, best)
            this.text.clear()
            this.raw.clear()
            this.finish = FINISH_STOP
            return
        # longest suffix of the held text that is a proper prefix of some stop string
        n = this.text.size()
        for s in range(this.stops.size()):
            L = this.stops[s].size()
            j = L - 1 if L - 1 < n else n
            while j > keep:
                if this.text.compare(n - j, j, this.stops[s], 0, j) == 0:
                    keep = j
                    break
                j -= 1
        this.out.append(this.text, 0, n - keep)
        this.text.erase(0, n - keep)

    void consume(llama.llama_context * lctx, int32_t idx, llama.llama_token_data * cand) noexcept nogil:
        # the pending token (if any) has been decoded: sample the next one from output row `idx`
        # of the last decode, produce its text into `out` and decide whether the sequence is
        # finished
        cdef llama.llama_token tok
        cdef char buf[128]
        cdef int32_t n
        cdef bint special
        cdef vector[char] big
        cdef const float * logits
        cdef double norm = 0.0
        cdef size_t at
        cdef llama.llama_token_data heap[lglp.MAX_TOP + 1]
        cdef int64_t t1 = llamagen_monotonic_ns()
        if this.pending >= 0:
            this.n_past += 1
            this.pending = -1
        if this.attached:
            tok = _backend_token(lctx, idx, this.chain, cand)
        else:
            logits = llama.llama_get_logits_ith(lctx, idx)
            if this.n_logprobs >= 0:
                # from the raw row, before the sampler chain (OpenAI's and vLLM's definition)
                at = this.lp_ids.size()
                this.lp_ids.resize(at + this.n_logprobs)
                this.lp_top.resize(at + this.n_logprobs)
                norm = lglp.row(logits, this.n_vocab, this.n_logprobs, this.lp_ids.data() + at,
                                this.lp_top.data() + at, heap)
            tok = this.sample(logits, cand)
            if this.n_logprobs >= 0 and tok >= 0:
                this.lp.push_back(<float> (<double> logits[tok] - norm))
        this.t_sample_ns += llamagen_monotonic_ns() - t1
        if tok < 0:         # GRAMMAR_DEAD_END or BACKEND_NO_OUTPUT
            if this.n_logprobs >= 0:
                this.lp_ids.resize(this.lp.size() * this.n_logprobs)
                this.lp_top.resize(this.lp.size() * this.n_logprobs)
            this.error = tok
            this.finish = FINISH_ERROR
            this.flush()
            return
        this.tokens.push_back(tok)
        if llama.llama_vocab_is_eog(this.vocab, tok) and (
                not this.ignore_eos or
                # ignore_eos goes on past the model's end, but not past a grammar's: one that
                # allows nothing else would make every later token an end token too
                (this.grammar != NULL and _grammar_only_ends(this.grammar, this.vocab, this.n_vocab, cand))):
            this.finish = FINISH_STOP
            this.flush()
            return
        special = not this.preserved.empty() and \
            binary_search(this.preserved.begin(), this.preserved.end(), tok)
        n = llama.llama_token_to_piece(this.vocab, tok, buf, sizeof(buf), 0, special)
        if n >= 0:
            this.raw.append(buf, n)
        else:
            big.resize(-n)
            n = llama.llama_token_to_piece(this.vocab, tok, big.data(), <int32_t> big.size(), 0, special)
            if n > 0:
                this.raw.append(big.data(), n)
        this.emit()
        if this.finish == FINISH_NONE:
            if <int32_t> this.tokens.size() >= this.max_new or this.n_past >= this.n_ctx:
                # out of budget, or no cell left to decode this token into
                this.finish = FINISH_LENGTH
                this.flush()
            else:
                this.pending = tok


    int32_t spec_budget(double r) noexcept nogil:
        # how many tokens to draft after the pending one this step (0: decode it alone).
        # Adaptive: the i-th drafted token pays off when the chance it is accepted, alpha^i,
        # exceeds ``r``, the share of a decode step one more row costs (_spec_cost_ratio): a
        # drafted row that is rejected is wasted, an accepted one saves a step.  When no draft
        # pays, drafting pauses, probing with one token after 1, 2, 4, ... 64 steps.
        cdef int32_t b, k = 0
        cdef double alpha, p
        if this.drafter == NULL or this.pending < 0 or this.finish != FINISH_NONE:
            return 0
        b = this.spec_n_max
        if b > this.max_new - <int32_t> this.tokens.size() - 1:
            b = this.max_new - <int32_t> this.tokens.size() - 1
        if b > this.n_ctx - this.n_past - 1:
            b = this.n_ctx - this.n_past - 1
        if b <= 0:
            return 0
        if not this.spec_adaptive:
            return b
        alpha = (this.spec_s + 1.0) / (this.spec_s + this.spec_f + 2.0)
        p = alpha
        while k < b and p > r:
            k += 1
            p *= alpha
        if k > 0:
            return k
        if this.spec_pause > 0:
            this.spec_pause -= 1
            return 0
        this.spec_pause = this.spec_backoff       # a probe; the next one waits longer unless
        if this.spec_backoff < 64:                # it is accepted (verify resets the back-off)
            this.spec_backoff *= 2
        return 1

    bint spec_want(int32_t budget) noexcept nogil:
        # ask the drafter for this step's draft (made by lgspec.run); False when not asked
        this.draft.clear()
        if budget <= 0:
            return False
        if not this.spec_begun:
            lgspec.begin(this.drafter, this.dseq, this.prompt.data(), <int32_t> this.prompt.size())
            this.spec_begun = True
        # the generated tokens in the KV cache (the pending one, tokens.back(), is not yet)
        lgspec.want(this.drafter, this.dseq, this.tokens.data(), this.n_past - this.n_prompt,
                    this.pending, budget)
        this.spec_asked = True
        return True

    int32_t spec_take() noexcept nogil:
        # the draft lgspec.run made, unless shorter than n_min; returns its length
        cdef const vector[int32_t] * r
        if not this.spec_asked:
            return 0
        this.spec_asked = False
        r = &lgspec.result(this.drafter, this.dseq)
        if <int32_t> r.size() < this.spec_n_min or r.size() == 0:
            this.draft.clear()
            return 0
        this.draft.assign(r.begin(), r.end())
        return <int32_t> this.draft.size()

    void verify(llama.llama_context * lctx, int32_t idx, llama.llama_token_data * cand) noexcept nogil:
        # consume() for the pending token's row, then for each drafted token the sampled token
        # equals: its row's logits were computed from exactly the tokens sampling chose, so each
        # row is sampled as plain decoding would (one RNG draw per emitted token)
        cdef int32_t i = 0, n = <int32_t> this.draft.size()
        this.consume(lctx, idx, cand)
        while this.finish == FINISH_NONE and i < n and this.pending == this.draft[i]:
            this.consume(lctx, this.draft_idx + i, cand)
            i += 1
        this.n_drafted += n
        this.n_accepted += i
        this.n_verified += 1
        this.spec_acc = i
        # acceptance, decayed so that it follows the text (a copied span ends, another begins)
        this.spec_s = 0.8 * this.spec_s + i
        this.spec_f = 0.8 * this.spec_f + (1.0 if i < n else 0.0)
        if i > 0:
            this.spec_backoff = 1
            this.spec_pause = 0

    void spec_settle(llama.llama_context * lctx, int32_t seq) noexcept nogil:
        # after verify (one thread at a time): the rejected draft's cells go, the drafter learns
        # how much was accepted
        if this.spec_acc < 0:
            return
        llama.llama_memory_seq_rm(llama.llama_get_memory(lctx), seq, this.n_past, -1)
        if this.drafter != NULL:
            lgspec.accept(this.drafter, this.dseq, this.spec_acc)
        this.spec_acc = -1
        this.draft.clear()


cdef class _Seq:
    """Python-side owner of a SeqCore, with the parameters and seed it was built from."""
    cdef SeqCore * c
    cdef readonly object params
    cdef readonly object seed

    def __cinit__(self):
        self.c = new SeqCore()

    def __dealloc__(self):
        del self.c

    cdef str take_out(self):
        """The produced chunk as str (always valid UTF-8), clearing it."""
        s = PyUnicode_DecodeUTF8(self.c.out.data(), <Py_ssize_t> self.c.out.size(), NULL)
        self.c.out.clear()
        return s


cdef _Seq _new_seq(Context ctx, object params, int32_t n_prompt, int32_t n_ctx):
    """A _Seq with its sampler chain and grammar built for ``params`` (validated SamplingParams)."""
    cdef _Seq q = _Seq.__new__(_Seq)
    cdef SeqCore * c = q.c
    cdef uint32_t seed = _draw_seed() if params.seed is None else <uint32_t> params.seed
    q.seed = seed
    q.params = params
    c.vocab = ctx._vocab
    c.n_vocab = ctx._n_vocab
    c.n_ctx = n_ctx
    c.n_prompt = n_prompt
    c.n_past = n_prompt
    c.max_new = params.max_new_tokens
    c.ignore_eos = params.ignore_eos
    if params.logprobs is not None:
        c.n_logprobs = min(<int32_t> params.logprobs, ctx._n_vocab)
    for s in params.stop:
        c.stops.push_back(s.encode("utf-8"))
    c.preserved = params.preserved_tokens       # sorted and unique (SamplingParams)
    c.tokens.reserve(min(params.max_new_tokens, n_ctx))
    if len(params.logit_bias) >= ctx._n_vocab:
        banned = {t for t, b in params.logit_bias if b == -INFINITY and 0 <= t < ctx._n_vocab}
        if len(banned) == ctx._n_vocab:
            raise ValueError("logit_bias bans every token of the vocabulary (-inf for all "
                             f"{ctx._n_vocab}): nothing could be generated")
    if params.sampler_impl == "fast" and _fast_supported(params):
        c.fast = _build_fast(params, ctx._vocab, ctx._n_vocab, n_ctx, seed, _trie_for(ctx.model, params))
        c.engine = ENGINE_FAST
    else:
        c.chain = _build_chain(params, ctx._vocab, ctx._n_vocab, n_ctx, seed)
        # "backend": the same chain, attached to the context when the sequence starts decoding
        c.backend = params.sampler_impl == "backend"
    c.grammar = _build_grammar(params, ctx._vocab)
    spec = params.speculative
    if spec is not None and c.engine != ENGINE_BACKEND and not c.backend:
        c.spec_n_max = spec.n_max
        c.spec_n_min = spec.n_min
        c.spec_adaptive = spec.adaptive
    return q


cdef struct SpecCost:
    # decode time against rows decoded (t = a + b * rows), fitted over recent decodes with
    # exponentially decaying weights: what one more verified row costs on this hardware (on 2
    # CPU cores a row of SmolLM2 Q4_1 costs about half a one-token decode, of gemma3 Q4_K_M a
    # tenth: measured in docs/speculative.md)
    double w
    double sx
    double sy
    double sxx
    double sxy


cdef inline void _spec_cost_add(SpecCost * c, double rows, double us) noexcept nogil:
    c.w = 0.97 * c.w + 1.0
    c.sx = 0.97 * c.sx + rows
    c.sy = 0.97 * c.sy + us
    c.sxx = 0.97 * c.sxx + rows * rows
    c.sxy = 0.97 * c.sxy + rows * us


cdef inline double _spec_cost_ratio(SpecCost * c, double n_gen) noexcept nogil:
    """b / (b + a / n_gen): the cost of one more row in a step's decode relative to one
    sequence's share of the step (``n_gen`` sequences decode a token in it).  0.3 until decodes
    of more than one size have been timed."""
    cdef double mx, my, var, b, a
    if c.w < 2.0:
        return 0.3
    mx = c.sx / c.w
    my = c.sy / c.w
    var = c.sxx / c.w - mx * mx
    if var < 0.05:
        return 0.3
    b = (c.sxy / c.w - mx * my) / var
    a = my - b * mx
    if b <= 0.0:
        return 0.02
    if a < 0.0:
        a = 0.0
    return b / (b + a / (n_gen if n_gen > 1.0 else 1.0))


cdef object _spec_stats(SeqCore * c):
    if c.spec_n_max <= 0:
        return None
    return {"drafted": c.n_drafted, "accepted": c.n_accepted,
            "acceptance_rate": <double> c.n_accepted / c.n_drafted if c.n_drafted else None,
            "verify_steps": c.n_verified}


cdef lgspec.Drafter * _new_drafter(spec, uint32_t n_seq) except NULL:
    """A drafter of ``spec``'s kind (a validated llamagen.Speculative) for ``n_seq`` sequences."""
    cdef string err
    cdef lgspec.Drafter * d
    cdef bytes kind_b = spec.type.encode()
    cdef const char * kind = kind_b
    cdef int32_t size_n = spec.ngram_n, size_m = spec.ngram_m, hits = spec.min_hits
    with nogil:         # (ngram-mod fills a 16 MB table)
        d = lgspec.create(kind, n_seq, size_n, size_m, hits, err)
    if d == NULL:
        raise invalid(ValueError, "speculative.type", err.decode("utf-8", "replace"))
    return d


cdef class GenerationState:
    """One streaming generation over a Context: ``for chunk in state`` or gen_next(state).

    Created by :func:`gen_begin`.  Each ``__next__`` does one decode + sample step without the
    GIL and returns the new text (valid UTF-8; may be empty while bytes are held back).  The
    step that finishes also flushes what was held back; ``end()`` flushes the rest after an early
    stop and frees the sampler.  A newer gen_begin on the same context makes this state stale.
    """
    cdef Context _context
    cdef _Seq _seq
    cdef SeqCore * _core                    # self._seq.c
    cdef uint64_t _epoch
    cdef llama.llama_context * _lctx
    cdef vector[llama.llama_token_data] _cand
    cdef bint _ended
    cdef int64_t _t_prefill_us
    cdef int64_t _t_gen_us
    cdef Py_ssize_t _chunk_from             # tokens before the latest step (chunk_logprobs)
    cdef llama.llama_batch _sbatch          # speculative steps: the pending token and its draft
    cdef bint _has_sbatch
    cdef SpecCost _cost                     # speculative steps: decode time against rows

    def __cinit__(self):
        self._lctx = NULL
        self._ended = False
        self._has_sbatch = False
        memset(&self._cost, 0, sizeof(SpecCost))
        # a placeholder until gen_begin sets the real one: an instance made without gen_begin
        # (GenerationState.__new__) raises instead of touching NULL
        self._seq = _Seq.__new__(_Seq)
        self._core = self._seq.c

    def __init__(self):
        raise TypeError("use llamagen.gen_begin(ctx, prompt, ...) to start a generation")

    def __dealloc__(self):
        if self._has_sbatch:
            llama.llama_batch_free(self._sbatch)
            self._has_sbatch = False

    cdef void _free_samplers(self) noexcept:
        if self._seq is not None:
            self._seq.c.free_samplers()

    # -- the step (no GIL) -------------------------------------------------------------------

    cdef int _step(self) noexcept nogil:
        cdef SeqCore * q = self._core
        """One token (or, speculating, the pending token and the accepted part of its draft).
        Returns 0, or llama_decode's non-zero code (the state then stops)."""
        cdef int32_t rc, k = 0, j
        cdef int64_t t0 = llama.llama_time_us(), td = 0
        cdef llama.llama_batch * b = &self._sbatch
        q.out.clear()
        if q.pending >= 0:
            if q.spec_want(q.spec_budget(_spec_cost_ratio(&self._cost, 1.0))):
                lgspec.run(q.drafter)
                k = q.spec_take()
            if k == 0:
                if q.drafter != NULL:
                    td = llama.llama_time_us()
                rc = llama.llama_decode(self._lctx, llama.llama_batch_get_one(&q.pending, 1))
                if q.drafter != NULL:
                    llama.llama_synchronize(self._lctx)
                    _spec_cost_add(&self._cost, 1, llama.llama_time_us() - td)
            else:
                for j in range(k + 1):
                    b.token[j] = q.pending if j == 0 else q.draft[j - 1]
                    b.pos[j] = q.n_past + j
                    b.n_seq_id[j] = 1
                    b.seq_id[j][0] = 0
                    b.logits[j] = 1
                b.n_tokens = k + 1
                td = llama.llama_time_us()
                rc = llama.llama_decode(self._lctx, b[0])
                llama.llama_synchronize(self._lctx)
                _spec_cost_add(&self._cost, k + 1, llama.llama_time_us() - td)
            if rc != 0:
                q.draft.clear()
                q.finish = FINISH_LENGTH if rc == 1 else FINISH_STOP
                q.flush()
                self._t_gen_us += llama.llama_time_us() - t0
                return rc
        if k == 0:
            q.consume(self._lctx, -1, self._cand.data())
        else:
            q.draft_idx = 1
            q.verify(self._lctx, 0, self._cand.data())
            q.spec_settle(self._lctx, 0)
        self._t_gen_us += llama.llama_time_us() - t0
        return 0

    # -- Python API --------------------------------------------------------------------------

    cdef int _enter(self) except -1:
        """Lock the context and check that this state may step.  Returns 1 if finished."""
        if self._context is None:
            raise LlamaError("this GenerationState was not started: use llamagen.gen_begin()")
        if self._ended or self._core.finish != FINISH_NONE:
            return 1                        # (even once the context is closed)
        self._context._acquire()
        if self._core.finish != FINISH_NONE or self._ended:
            self._context._release()
            return 1
        if self._epoch != self._context._epoch:
            self._context._release()
            raise StaleStateError(
                "this generation is no longer active: a newer gen_begin (or clear/close) on its "
                "context replaced it")
        return 0

    cdef object _next_chunk(self):
        """The next chunk as str, or None when the generation is over."""
        cdef int rc
        if self._enter():
            return None
        self._chunk_from = <Py_ssize_t> self._core.tokens.size()
        try:
            with nogil:
                rc = self._step()
        finally:
            self._context._release()
        if rc != 0:
            check_decode(rc, b"generation step")
        if self._core.finish == FINISH_ERROR:
            self._core.out.clear()
            raise _seq_failure(self._core)
        return self._seq.take_out()

    def __iter__(self):
        return self

    def __next__(self):
        chunk = self._next_chunk()
        if chunk is None:
            raise StopIteration
        return chunk

    def next(self):
        """The next chunk (str), or None once the generation has finished."""
        return self._next_chunk()

    cdef _run_all(self):
        """Run to the end without the GIL (used by generate()); returns the whole text."""
        cdef string acc
        cdef int rc = 0
        cdef SeqCore * q = self._core
        if self._enter():
            return ""
        self._context._abort.armed = 1
        self._context._abort.interrupted = 0
        try:
            with nogil:
                while q.finish == FINISH_NONE:
                    rc = self._step()
                    acc.append(q.out)
                    if rc != 0 or self._context._abort.interrupted:
                        break
                q.out.clear()
        finally:
            self._context._abort.armed = 0
            self._context._release()
        if self._context._abort.interrupted:
            self._context._abort.interrupted = 0
            raise KeyboardInterrupt
        if rc != 0:
            check_decode(rc, b"generation")
        if q.finish == FINISH_ERROR:
            raise _seq_failure(q)
        return PyUnicode_DecodeUTF8(acc.data(), <Py_ssize_t> acc.size(), NULL)

    def end(self):
        """Finish: flush held-back text (returned as str) and free the sampler.  Idempotent."""
        if self._ended:
            return ""
        if self._context is not None:
            # wait for a step running in another thread: it uses the samplers freed here
            self._context._acquire_any()
        try:
            if self._ended:
                return ""
            self._ended = True
            if self._core.finish == FINISH_NONE:
                self._core.finish = FINISH_CANCELLED      # ended early, by the caller
            # what only stepping needs goes now (n_vocab candidates: 3 MB at 262k)
            self._cand.clear()
            self._cand.shrink_to_fit()
            self._core.out.clear()
            self._core.flush()
            if self._core.attached and self._context is not None and self._epoch == self._context._epoch:
                self._context._detach(0)        # the context stops sampling for this state
            self._free_samplers()
            return self._seq.take_out()
        finally:
            if self._context is not None:
                self._context._release()

    def close(self):
        self.end()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.end()

    # -- introspection -----------------------------------------------------------------------

    @property
    def params(self):
        return self._seq.params

    @property
    def seed(self):
        """The seed used (drawn from fresh entropy when params.seed is None)."""
        return self._seq.seed

    @property
    def n_prompt_tokens(self):
        return self._core.n_prompt

    @property
    def tokens(self):
        """Generated token ids so far."""
        return list(self._core.tokens)

    @property
    def n_tokens(self):
        return self._core.tokens.size()

    @property
    def logprobs(self):
        """TokenLogprobs of the generated tokens so far (``logprobs=k`` in the parameters), or
        None when logprobs are off."""
        if self._core.n_logprobs < 0:
            return None
        return _seq_logprobs(self._context.model, self._core, 0, -1)

    @property
    def chunk_logprobs(self):
        """TokenLogprobs of the tokens the latest step sampled (the chunk it returned may hold
        their text back, see __next__); None when logprobs are off."""
        if self._core.n_logprobs < 0:
            return None
        return _seq_logprobs(self._context.model, self._core, self._chunk_from, -1)

    @property
    def finish_reason(self):
        """"stop" (end of generation or stop string), "length" (max_new_tokens or context full),
        "error" (the grammar allowed no token: the step raised GrammarError), "cancelled"
        (end() before it finished) or None while running."""
        return _FINISH_NAMES[self._core.finish]

    @property
    def finished(self):
        return self._core.finish != FINISH_NONE or self._ended

    @property
    def sampler_engine(self):
        """What chooses the tokens: "fast" (llamagen's engine), "llama.cpp" (llama.cpp's sampler
        chain on the host) or "backend" (llama.cpp's chain inside the decode graph, on the
        model's output device).  sampler_impl="backend" runs as "llama.cpp" where llama.cpp
        cannot attach the chain to the context."""
        return _ENGINE_NAMES[self._core.engine]

    @property
    def speculative_stats(self):
        """Speculative decoding so far: drafted tokens, accepted ones, acceptance_rate and the
        decodes that verified a draft (None when the parameters have no ``speculative``)."""
        return _spec_stats(self._core)

    @property
    def timings(self):
        """prefill_ms; decode_ms (all steps: decode + sampling + detokenizing); sample_ms (the
        sampling part of it); n_tokens; tokens_per_second."""
        n = self._core.tokens.size()
        gen_s = self._t_gen_us / 1e6
        n_prompt = self._core.n_prompt
        return {
            "prefill_ms": self._t_prefill_us / 1e3,
            "decode_ms": self._t_gen_us / 1e3,
            "sample_ms": self._core.t_sample_ns / 1e6,
            "n_prompt_tokens": n_prompt,
            "n_tokens": n,
            "prefill_tokens_per_second": (n_prompt / (self._t_prefill_us / 1e6)
                                          if self._t_prefill_us > 0 else None),
            "tokens_per_second": n / gen_s if gen_s > 0 else None,
        }

    def __repr__(self):
        return (f"<llamagen.GenerationState tokens={self._core.tokens.size()} "
                f"finish_reason={self.finish_reason!r}>")


cdef int _prefill(Context ctx, vector[llama.llama_token] & toks, SeqCore * q,
                  int32_t keep=0) except -1:
    """Clear the KV cache and decode the prompt in n_batch chunks (GIL released, Ctrl-C aware).
    ``keep`` > 0: the cache already holds the first ``keep`` prompt tokens (the previous
    generation's prompt, see _generate_n): everything after them is removed and only the rest is
    decoded.  A backend-sampling ``q`` gets its chain attached to sequence 0 before the last chunk
    (the one whose last token is sampled): earlier chunks sample nothing and draw no random
    numbers."""
    cdef int32_t n_batch = llama.llama_n_batch(ctx._ctx)
    cdef int32_t i = keep, n, total = <int32_t> toks.size(), rc = 0
    cdef llama.llama_memory_t mem = llama.llama_get_memory(ctx._ctx)
    ctx._abort.armed = 1
    ctx._abort.interrupted = 0
    ctx._abort.last_us = llamagen_monotonic_us()
    try:
        with nogil:
            if i <= 0 or i >= total or not llama.llama_memory_seq_rm(mem, 0, i, -1):
                # (a memory that cannot cut a sequence in the middle starts over)
                llama.llama_memory_clear(mem, True)
                i = 0
            while i < total:
                n = total - i
                if n > n_batch:
                    n = n_batch
                if i + n == total and q.backend and not q.attached:
                    q.attach(ctx._attach(0, q.chain))
                rc = llama.llama_decode(ctx._ctx, llama.llama_batch_get_one(toks.data() + i, n))
                if rc != 0:
                    break
                i += n
    finally:
        ctx._abort.armed = 0
    if rc != 0 or ctx._abort.interrupted:
        with nogil:
            llama.llama_memory_clear(mem, True)
        if ctx._abort.interrupted:
            ctx._abort.interrupted = 0
            raise KeyboardInterrupt
        check_decode(rc, b"prompt prefill")
    return 0


cdef vector[llama.llama_token] _prompt_tokens(Context ctx, prompt, bint add_special,
                                             bint parse_special, int32_t n_ctx) except *:
    """Tokenize (or check) a prompt and make sure it leaves room for one new token.  User code
    may run here (a token object's __index__) and may close the context: callers check it again
    (under its lock) before any C call that needs it."""
    cdef vector[llama.llama_token] toks
    prompt = _check_prompt(prompt)         # TypeError for what is neither text nor token ids
    if isinstance(prompt, (str, bytes)):
        ctx._check()
        ctx.model._pin()                   # tokenizing releases the GIL: keep the vocabulary
        try:
            toks = _tokenize(ctx._vocab, prompt, add_special, parse_special)
        finally:
            ctx.model._release_user()
    else:
        _fill_tokens(toks, prompt, ctx._n_vocab)
    if toks.size() == 0:
        raise ValueError("the prompt is empty (no tokens to condition on)")
    if <int32_t> toks.size() >= n_ctx:
        # the same error the engine raises for it (a ValueError, as before)
        raise PromptTooLongError(toks.size(), n_ctx,
                                 f"the prompt has {toks.size()} tokens but the context holds "
                                 f"{n_ctx}: it must leave room for at least one new token (use a "
                                 "larger n_ctx)")
    return toks


def _gen_begin(Context ctx not None, prompt, params, bint add_special=True, bint parse_special=True):
    """Start a generation (see llamagen.gen_begin).  ``params`` is a validated SamplingParams."""
    cdef vector[llama.llama_token] toks
    if not isinstance(params, SamplingParams):
        raise TypeError("params must be a llamagen.SamplingParams")
    ctx._check_generative()
    toks = _prompt_tokens(ctx, prompt, add_special, parse_special, llama.llama_n_ctx_seq(ctx._ctx))
    return _start(ctx, toks, params, 0, 0)


cdef GenerationState _start(Context ctx, vector[llama.llama_token] & toks, params, int32_t keep,
                            uint64_t keep_epoch):
    """A GenerationState for prompt ``toks``; ``keep`` > 0: the cache holds its first ``keep``
    tokens, unless something took the context over since epoch ``keep_epoch``."""
    cdef GenerationState st = GenerationState.__new__(GenerationState)
    cdef int64_t t0
    cdef int32_t n_ctx
    # the lock from the "is it open?" check to the last C call: another thread's close() waits
    ctx._acquire()
    try:
        n_ctx = llama.llama_n_ctx_seq(ctx._ctx)
        st._seq = _new_seq(ctx, params, <int32_t> toks.size(), n_ctx)
        st._core = st._seq.c
        st._context = ctx
        st._lctx = ctx._ctx
        st._cand.resize(ctx._n_vocab)
        if st._core.spec_n_max > 0:
            st._core.drafter = _new_drafter(params.speculative, 1)
            st._core.owns_drafter = True
            st._core.prompt = toks          # (what the drafter begins with)
            st._sbatch = llama.llama_batch_init(st._core.spec_n_max + 1, 0, 1)
            st._has_sbatch = True
        if ctx._epoch != keep_epoch:
            keep = 0
        ctx._take_over()
        st._epoch = ctx._epoch
        t0 = llama.llama_time_us()
        _prefill(ctx, toks, st._core, keep)
        st._t_prefill_us = llama.llama_time_us() - t0
    finally:
        ctx._release()
    return st


def _generate(Context ctx not None, prompt, params, bint add_special=True, bint parse_special=True):
    """Whole generation in one call (see llamagen.generate): text identical to the stream."""
    cdef GenerationState st = _gen_begin(ctx, prompt, params, add_special, parse_special)
    try:
        text = st._run_all()
        return text + st.end(), st
    finally:
        st._free_samplers()


def _generate_n(Context ctx not None, prompt, list params, bint add_special=True,
                bint parse_special=True):
    """One generation per SamplingParams in ``params``, one after another on sequence 0, the
    prompt prefilled once: each later one keeps the prompt's cells but its last token, which is
    decoded again for its logits.  [(text, state)]."""
    cdef vector[llama.llama_token] toks
    cdef GenerationState st
    cdef uint64_t epoch = 0
    ctx._check_generative()
    toks = _prompt_tokens(ctx, prompt, add_special, parse_special, llama.llama_n_ctx_seq(ctx._ctx))
    out = []
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise TypeError("params must be llamagen.SamplingParams")
        st = _start(ctx, toks, p, <int32_t> toks.size() - 1 if i > 0 else 0, epoch)
        try:
            text = st._run_all()
            out.append((text + st.end(), st))
        finally:
            st._free_samplers()
        epoch = ctx._epoch
    return out
