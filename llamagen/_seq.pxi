# SeqCore: one sequence's sampling and text state, stepped without the GIL by single streams
# (_generation.pxi) and batches (_batch.pxi); its speculative verification; _Seq, its Python
# owner.  Included by _core.pyx.

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

cdef enum:
    SPEC_RUN = 64           # positions in a run of accepted drafts counted apart (SeqCore.spec_h)

_FINISH_NAMES = {FINISH_NONE: None, FINISH_STOP: "stop", FINISH_LENGTH: "length",
                 FINISH_ERROR: "error", FINISH_CANCELLED: "cancelled"}


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
    llama.llama_sampler * rbudget           # thinking budget (SamplingParams.reasoning_budget),
                                            # or only where the thinking block is (grammar_pause)
    bint grammar_pause                      # a lazy grammar sleeps inside the thinking block
    vector[float] masked                    # ... the logits row while it forces its end tag
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
    int32_t lora_id                         # batches: its LoRA set's number (same set, same id)
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
    int32_t n_prompt_lp                     # batches: -1, or prompt logprobs with k alternatives:
    vector[float] plp                       # ... per prompt position p, logp(prompt[p + 1])
    vector[int32_t] plp_ids                 # ... the k most likely ids at p
    vector[float] plp_top                   # ... and their logprobs
    int32_t plp_row                         # ... this step: batch row of position plp_pos
    int32_t plp_pos                         # ... (the first prompt row computed this step)
    int32_t plp_count                       # ... and how many rows
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
    bint spec_exact                         # verify with one-row kernels (Speculative.exact)
    double spec_s                           # decayed counts of drafted tokens accepted and of
    double spec_f                           # drafts cut short: this sequence's acceptance rate
    double spec_ha[SPEC_RUN]                # decayed counts, by position in a run of accepted
    double spec_hr[SPEC_RUN]                # drafts, of drafted tokens accepted and rejected there
    int32_t spec_off                        # the run position this step's draft starts at
    int32_t spec_pause                      # steps left without drafting (adaptive back-off)
    int32_t spec_backoff                    # the next pause's length
    int32_t spec_acc                        # drafted tokens the latest verify() accepted (-1: none)
    bint spec_asked                         # spec_want asked the drafter this step
    int32_t draft_idx                       # batch row of draft[0]
    vector[llama.llama_token] draft         # this step's draft (after the pending token)
    int64_t n_drafted                       # totals: tokens drafted and verified, ...
    int64_t n_accepted                      # ... of those accepted, ...
    int64_t n_verified                      # ... and decodes that verified a draft
    int64_t n_caught_up                     # single streams, draft-simple: lgspec.caught_up

    __init__():
        cdef int32_t i
        this.chain = NULL
        this.fast = NULL
        this.grammar = NULL
        this.rbudget = NULL
        this.grammar_pause = False
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
        this.n_prompt_lp = -1
        this.plp_row = -1
        this.plp_pos = 0
        this.plp_count = 0
        this.drafter = NULL
        this.owns_drafter = False
        this.spec_begun = False
        this.dseq = 0
        this.spec_n_max = 0
        this.spec_n_min = 0
        this.spec_adaptive = True
        this.spec_s = 0.0
        this.spec_f = 0.0
        this.spec_off = 0
        for i in range(SPEC_RUN):
            this.spec_ha[i] = 0.0
            this.spec_hr[i] = 0.0
        this.spec_pause = 0
        this.spec_backoff = 1
        this.spec_acc = -1
        this.spec_asked = False
        this.draft_idx = -1
        this.n_drafted = 0
        this.n_accepted = 0
        this.n_verified = 0
        this.n_caught_up = 0

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
        if this.rbudget != NULL:
            llama.llama_sampler_free(this.rbudget)
            this.rbudget = NULL

    bint thinking() noexcept nogil:
        # inside the thinking block (its start seen, its end not yet), where a lazy grammar
        # sleeps: a tool-call tag the model writes while thinking is not a call
        cdef int state
        if not this.grammar_pause or this.rbudget == NULL:
            return False
        state = lgchat.reasoning_budget_state(this.rbudget)
        return state != 0 and state != 4        # (not IDLE, not DONE)

    llama.llama_token sample(const float * logits, llama.llama_token_data * cand) noexcept nogil:
        # the chain (llama.cpp's objects or llamagen's fast engine), then the grammar check;
        # re-sample with the grammar only on rejection; accept (see _sample_token)
        cdef llama.llama_sampler * g = this.grammar
        if this.thinking():
            g = NULL
        return _sample_token(this.chain, this.fast, g, this.n_vocab, logits, cand, -1)

    const float * forced_row(const float * logits, llama.llama_token_data * cand) noexcept nogil:
        # the thinking budget is spent: its sampler leaves one token finite (the next of the
        # forced end tag); the request's own chain then samples that row, so its windows and
        # random draws go on as llama.cpp's would
        cdef llama.llama_token_data_array arr
        cdef int32_t i
        _whole_vocab(&arr, cand, logits, this.n_vocab)
        llama.llama_sampler_apply(this.rbudget, &arr)
        this.masked.resize(this.n_vocab)
        for i in range(this.n_vocab):
            this.masked[cand[i].id] = cand[i].logit
        return this.masked.data()

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
            if this.rbudget != NULL and lgchat.reasoning_budget_state(this.rbudget) == 2:
                tok = this.sample(this.forced_row(logits, cand), cand)
            else:
                tok = this.sample(logits, cand)
            if this.n_logprobs >= 0 and tok >= 0:
                this.lp.push_back(<float> (<double> logits[tok] - norm))
            if this.rbudget != NULL and tok >= 0:
                llama.llama_sampler_accept(this.rbudget, tok)
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


    int32_t spec_bound() noexcept nogil:
        # the most tokens this step may draft after the pending one (0: none)
        cdef int32_t b
        if this.drafter == NULL or this.pending < 0 or this.finish != FINISH_NONE:
            return 0
        b = this.spec_n_max
        if b > this.max_new - <int32_t> this.tokens.size() - 1:
            b = this.max_new - <int32_t> this.tokens.size() - 1
        if b > this.n_ctx - this.n_past - 1:
            b = this.n_ctx - this.n_past - 1
        return b if b > 0 else 0

    double spec_alpha() noexcept nogil:
        # the chance that a drafted token is accepted, from this sequence's decayed counts
        return (this.spec_s + 1.0) / (this.spec_s + this.spec_f + 2.0)

    double spec_h(int32_t j) noexcept nogil:
        # the chance that drafted token j is accepted when the ones before it were: copied spans
        # have lengths, not a constant rate (gemma3 copying code lines: 8 accepted, the 9th
        # rejected, every time), so the chance is counted by the token's position in the run of
        # accepted drafts (a run goes on across steps while whole drafts are accepted), with the
        # sequence's overall rate as the prior where a position has been seen little
        cdef int32_t p = this.spec_off + j
        if p >= SPEC_RUN:
            p = SPEC_RUN - 1
        return (this.spec_ha[p] + this.spec_alpha()) / (this.spec_ha[p] + this.spec_hr[p] + 1.0)

    int32_t spec_or_probe(int32_t k) noexcept nogil:
        # ``k`` when a draft pays; else drafting pauses, probing with one token after 1, 2, 4,
        # ... 64 steps
        if k > 0:
            return k
        if this.spec_off > 0:
            return 0                              # mid-run: its positions' counts said no
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
            this.spec_off = 0
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
            this.spec_off = 0
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
        this.spec_learn(n, i)

    void spec_learn(int32_t n, int32_t i) noexcept nogil:
        # a verified draft of n tokens of which the first i were accepted
        cdef int32_t j, p
        # acceptance, decayed so that it follows the text (a copied span ends, another begins)
        this.spec_s = 0.8 * this.spec_s + i
        this.spec_f = 0.8 * this.spec_f + (1.0 if i < n else 0.0)
        # a position's counts decay as it is observed (it follows the text) and slowly besides
        # (a stale 'rejected here' is tried again, rarely: each try costs a decode of the draft)
        for j in range(SPEC_RUN):
            this.spec_ha[j] *= 0.97
            this.spec_hr[j] *= 0.97
        for j in range(i + (1 if i < n else 0)):
            p = this.spec_off + j
            if p >= SPEC_RUN:
                p = SPEC_RUN - 1
            this.spec_ha[p] *= 0.8
            this.spec_hr[p] *= 0.8
            if j < i:
                this.spec_ha[p] += 1.0
            else:
                this.spec_hr[p] += 1.0
        # a whole draft accepted: the next one goes on with the run, after the token sampled
        # past it (whose own match is not known)
        this.spec_off = this.spec_off + n + 1 if i == n else 0
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


cdef struct _PromptRow:
    # a prompt-logprob row of a batch step (_logprobs.pxi, _prompt_rows)
    SeqCore * q
    int32_t pos          # the prompt position whose row predicts prompt[pos + 1]
    int32_t batch_idx


cdef class _Seq:
    """Python-side owner of a SeqCore, with the parameters and seed it was built from."""
    cdef SeqCore * c
    cdef readonly object params
    cdef readonly object seed
    cdef tuple lora                         # its LoRA set (_adapters.pxi), resolved when added

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
    if params.prompt_logprobs is not None:
        c.n_prompt_lp = min(<int32_t> params.prompt_logprobs, ctx._n_vocab)
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
    c.grammar = _grammar_for(params, ctx.model)
    # a lazy grammar (a template's tool calls) sleeps while the model thinks: the budget
    # sampler, without a budget, tells where the thinking block is
    c.grammar_pause = c.grammar != NULL and params.grammar_lazy and \
        bool(params.reasoning_start) and bool(params.reasoning_end)
    if params.reasoning_budget is not None or c.grammar_pause:
        c.rbudget = _reasoning_budget(params, ctx._vocab)
    spec = params.speculative
    if spec is not None and c.engine != ENGINE_BACKEND and not c.backend and c.rbudget == NULL:
        c.spec_n_max = spec.n_max
        c.spec_n_min = spec.n_min
        c.spec_adaptive = spec.adaptive
        # (a deterministic context's kernels are batch-invariant already)
        c.spec_exact = spec.exact and not ctx.deterministic
    return q


cdef llama.llama_sampler * _reasoning_budget(params, const llama.llama_vocab * vocab) except NULL:
    """The thinking-budget sampler of ``params`` (llama.cpp's common/reasoning-budget.h)."""
    cdef vector[int] start = params.reasoning_start
    cdef vector[int] forced = params.reasoning_forced or params.reasoning_end[0]
    cdef int budget = params.reasoning_budget if params.reasoning_budget is not None else INT32_MAX
    cdef vector[int] ends, lens
    cdef string err
    cdef llama.llama_sampler * r
    for e in params.reasoning_end:
        lens.push_back(len(e))
        for t in e:
            ends.push_back(t)
    r = lgchat.reasoning_budget_new(vocab, start.data(), <int> start.size(), ends.data(),
                                    lens.data(), <int> lens.size(), forced.data(),
                                    <int> forced.size(), budget, err)
    if r == NULL:
        raise invalid(ValueError, "reasoning_budget", err.decode("utf-8", "replace"))
    return r


cdef void _reasoning_prime(SeqCore * c, const vector[llama.llama_token] & prompt, params) noexcept:
    """A template that opens the thinking block in its generation prompt: the budget starts
    counting there (its start tag, the last in the prompt and not closed after it, is shown to
    the budget sampler; the tokens after the tag are not counted, only generated ones are)."""
    cdef size_t n = prompt.size()
    if c.rbudget == NULL:
        return
    tail = [prompt[i] for i in range(n - min(n, <size_t> 256), n)]
    start = list(params.reasoning_start)
    ends = [list(e) for e in params.reasoning_end]
    k = len(start)
    for i in range(len(tail) - k, -1, -1):
        if tail[i:i + k] != start:
            continue
        after = tail[i + k:]
        for e in ends:
            for j in range(len(after)):
                if after[j:j + len(e)] == e:
                    return              # closed again in the prompt
        for t in start:
            llama.llama_sampler_accept(c.rbudget, t)
        return
