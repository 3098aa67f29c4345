# Speculative decoding's shared pieces: the decode-cost curve that sets draft lengths, the
# statistics a sequence reports and the drafters (csrc/lg_spec.cpp over llama.cpp's
# common/speculative.h).  The verification itself is SeqCore.verify (_seq.pxi).  Included by
# _core.pyx after _seq.pxi.

# Decode time by the rows a step decodes: a decayed mean per row count.  A line fitted to it
# misleads where the cost is not linear in the rows (gemma3 Q4_K_M on a 2-core EPYC: 1 row 10 ms,
# 2 rows 20 ms, 8 rows 38 ms, 16 rows 50 ms: each logits row of its 262k-token output matrix costs
# most of a step until the batch is large enough for the multi-row kernels), so a stream that
# only ever tried short drafts would never draft the long ones that pay.
cdef double _CURVE_PRIOR = 0.1             # (CostCurve.costs)
cdef enum:
    MAX_DRAFT_ROWS = 65                     # a single stream's decode: its pending token, 64 drafted

cdef cppclass CostCurve:
    vector[double] w                        # decayed counts of decodes of i rows
    vector[double] t                        # ... and of their times (us)
    vector[int32_t] seen                    # row counts measured, ascending (costs' walk)

    void reset(int32_t max_rows) noexcept nogil:
        this.w.assign(max_rows + 1, 0.0)
        this.t.assign(max_rows + 1, 0.0)
        this.seen.clear()

    void add(int32_t rows, double us) noexcept nogil:
        this.record(rows, us, True)

    void record(int32_t rows, double us, bint clamp_first) noexcept nogil:
        cdef size_t i = 0
        cdef double guess
        cdef int32_t lo, hi, n = <int32_t> this.seen.size()
        if rows <= 0 or rows >= <int32_t> this.w.size():
            return
        if this.w[rows] == 0.0:
            # a size's first decode is often its slowest (gemma3, a fresh context's first 17-row
            # verify: 80-84 ms, later ones 68-71): kept as measured, it would keep that size from
            # being chosen, so never measured again; kept at no more than what the measured
            # sizes say (the line through its neighbours, or past the largest, through the two
            # largest: not costs()'s optimistic prior, which a batch's many sizes would ratchet
            # down, each new size stored at the prior and the next priced from it), the size is
            # tried again and its later decodes set its cost
            if clamp_first and n >= 2 and rows > this.seen[0]:
                hi = this.seen[n - 1]
                if rows < hi:
                    this.costs(rows, 1, &guess)
                else:
                    lo = this.seen[n - 2]
                    guess = this.mean(hi) + (this.mean(hi) - this.mean(lo)) * (rows - hi) / (hi - lo)
                    if guess < this.mean(hi):
                        guess = this.mean(hi)       # (more rows never cost less)
                if guess < us:
                    us = guess
            while i < this.seen.size() and this.seen[i] < rows:
                i += 1
            this.seen.insert(this.seen.begin() + i, rows)
        this.w[rows] = 0.8 * this.w[rows] + 1.0
        this.t[rows] = 0.8 * this.t[rows] + us

    double mean(int32_t rows) noexcept nogil:
        return this.t[rows] / this.w[rows]

    void costs(int32_t first, int32_t n, double * out) noexcept nogil:
        # out[i]: the expected time of a decode of first + i rows: measured where decodes of that
        # size were timed; between two measured sizes the line through them; past the largest,
        # that one plus a prior of a tenth of a one-row decode per row: optimistic (0.1-0.5 was
        # measured on the project's CPUs, docs/speculative.md), so a longer draft is tried and
        # its real cost learned, where a pessimistic prior would never be corrected; below the
        # smallest, the prior scaled to it (nothing measured: units of a one-row decode)
        cdef int32_t i, rows, m, lo, hi
        cdef size_t j = 0
        cdef double one = 1.0
        if this.seen.size() > 0:
            m = this.seen[0]
            one = this.mean(m) / (1.0 + _CURVE_PRIOR * (m - 1))
        for i in range(n):
            rows = first + i
            while j < this.seen.size() and this.seen[j] < rows:
                j += 1
            if j < this.seen.size() and this.seen[j] == rows:
                out[i] = this.mean(rows)
            elif j == 0:
                out[i] = one * (1.0 + _CURVE_PRIOR * (rows - 1))
            elif j == this.seen.size():
                lo = this.seen[j - 1]
                out[i] = this.mean(lo) + _CURVE_PRIOR * one * (rows - lo)
            else:
                lo = this.seen[j - 1]
                hi = this.seen[j]
                out[i] = this.mean(lo) + (this.mean(hi) - this.mean(lo)) * (rows - lo) / (hi - lo)


cdef int32_t _curve_best(CostCurve * c, const double * h, int32_t b) noexcept nogil:
    """The draft length that makes the most tokens per unit of time for one stream,
    (1 + h0 + h0 h1 + ... + h0 ... h(k-1)) / cost(k + 1), with h[j] the chance drafted token j is
    accepted when the ones before it were (0 <= k <= b)."""
    cdef int32_t k, best = 0
    cdef double e = 1.0, p = 1.0, rate, best_rate
    cdef double cost[MAX_DRAFT_ROWS]        # (on the stack: this runs every step)
    if b > MAX_DRAFT_ROWS - 1:
        b = MAX_DRAFT_ROWS - 1
    c.costs(1, b + 1, cost)
    best_rate = 1.0 / cost[0]
    for k in range(1, b + 1):
        p *= h[k - 1]
        e += p
        rate = e / cost[k]
        if rate > best_rate:
            best_rate = rate
            best = k
    return best


cdef cppclass SpecMemory:
    # what a context's latest speculative stream learned, for the next one: decode costs (the
    # hardware's and the model's: kept) and acceptance (the text's: carried at half weight, so
    # that a new text soon has its own)
    CostCurve curve
    double s
    double f
    double ha[SPEC_RUN]
    double hr[SPEC_RUN]
    bint has

    __init__():
        this.has = False
        this.s = 0.0
        this.f = 0.0

    void save(CostCurve * c, SeqCore * q) noexcept nogil:
        this.curve = c[0]
        this.save_rates(q)

    void save_rates(SeqCore * q) noexcept nogil:
        cdef int32_t j
        this.s = q.spec_s
        this.f = q.spec_f
        for j in range(SPEC_RUN):
            this.ha[j] = q.spec_ha[j]
            this.hr[j] = q.spec_hr[j]
        this.has = True

    void load(CostCurve * c, SeqCore * q) noexcept nogil:
        c.reset(MAX_DRAFT_ROWS)
        if this.has and this.curve.w.size() > 0:     # (a batch saves only rates)
            c[0] = this.curve
        this.load_rates(q)

    void load_rates(SeqCore * q) noexcept nogil:
        cdef int32_t j
        if not this.has:
            return
        q.spec_s = 0.5 * this.s
        q.spec_f = 0.5 * this.f
        for j in range(SPEC_RUN):
            q.spec_ha[j] = 0.5 * this.ha[j]
            q.spec_hr[j] = 0.5 * this.hr[j]


cdef class _SpecMemory:
    cdef SpecMemory m


cdef int _SPEC_MEMORIES = 8                 # drafters a context remembers


cdef _SpecMemory _spec_memory(Context ctx, spec):
    """The context's SpecMemory for drafting like ``spec`` (a Speculative): what the latest
    stream that drafted the same way learned.  Each drafter has its own: its acceptance, and a
    step's cost (it includes drafting: a draft model's decodes), are its own (a 4-layer draft
    after the target drafting for itself, accepted 98 %, drafted 5 tokens a step for 48 steps,
    0.20x).  ``ctx._spec_memory``: {key: _SpecMemory}, the latest used last."""
    cdef _SpecMemory m
    key = (spec.type, spec.ngram_n, spec.ngram_m, spec.min_hits,
           None if spec.draft_model is None else id(spec.draft_model))
    if ctx._spec_memory is None:
        ctx._spec_memory = {}
    mems = ctx._spec_memory
    m = mems.pop(key, None)
    if m is None:
        m = _SpecMemory()
        while len(mems) >= _SPEC_MEMORIES:
            del mems[next(iter(mems))]
    mems[key] = m
    return m


cdef int32_t _spec_budget_curve(SeqCore * q, CostCurve * c) noexcept nogil:
    """How many tokens a single stream drafts after its pending one (0: decode the pending token
    alone, or probe)."""
    cdef int32_t j, b = q.spec_bound()
    cdef double h[MAX_DRAFT_ROWS]
    if b <= 0:
        return 0
    if not q.spec_adaptive:
        return b
    if b > MAX_DRAFT_ROWS - 1:
        b = MAX_DRAFT_ROWS - 1
    for j in range(b):
        h[j] = q.spec_h(j)
    return q.spec_or_probe(_curve_best(c, h, b))


cdef struct _Gain:
    double gain                             # the chance this drafted token is accepted
    int32_t at                              # its sequence, an index into the step's list


# A many-row step's rows are drafted up to a multiple of 4: ggml-cpu's many-row kernels work in
# tiles of 4 rows and take the rest row by row (the repacked Q4_K gemm; llamafile's sgemm too
# without patch 0009's AVX-512 path: then 9-11 rows cost more than 12, gemma3 Q4_K_M, 2-core
# EPYC, ms: 8 40, 9 52, 11 64, 12 51); and a quarter of the sizes is a quarter of the curve to
# learn (with patch 0009, gemma3 at 8 sequences: 321-343 t/s with the multiple, 316-332 without).
cdef int32_t _ROW_MULTIPLE = 4


cdef bint _gain_gt(const _Gain & a, const _Gain & b) noexcept nogil:
    return a.gain > b.gain


cdef cppclass BatchSpec:
    # a batch's drafting plan: its step-cost curve (the context's: _batch_curve_memory), this
    # step's draft lengths and their scratch
    CostCurve * curve
    vector[int32_t] ks
    vector[_Gain] gains
    vector[double] cost


cdef void _spec_plan_batch(vector[SeqCore *] & seqs, BatchSpec * plan) noexcept nogil:
    """Draft lengths for a batch step: plan.ks[i] for seqs[i] (-1: not drafting).  Every generating
    sequence decodes its pending token; each drafted token adds a row and is worth the chance it
    is accepted.  Drafted tokens are taken best first while the step's expected tokens per unit
    of time grow: (pending rows + accepted drafts) / cost(rows), the cost from the batch's own
    measured curve (a drafted row is dear next to a step's fixed part when few sequences share
    it, and about a row's share of the step when many do)."""
    cdef size_t i
    cdef int32_t j, b, m, best_m = 0, rows = 0
    cdef double tokens = 0.0, p, rate, best_rate
    cdef SeqCore * q
    cdef CostCurve * c = plan.curve
    cdef vector[int32_t] * ks = &plan.ks
    cdef vector[_Gain] * gains = &plan.gains
    cdef vector[double] * cost = &plan.cost
    ks.assign(seqs.size(), -1)
    gains.clear()
    for i in range(seqs.size()):
        q = seqs[i]
        if q.pending < 0:
            continue
        rows += 1
        tokens += 1.0
        if q.drafter == NULL:
            continue
        b = q.spec_bound()
        if b <= 0:
            continue
        ks[0][i] = 0
        p = 1.0
        if not q.spec_adaptive:
            ks[0][i] = b
            rows += b
            for j in range(b):
                p *= q.spec_h(j)
                tokens += p
            continue
        for j in range(b):
            p *= q.spec_h(j)
            gains.push_back(_Gain(p, <int32_t> i))
    if rows == 0:
        return
    sort(gains.begin(), gains.end(), _gain_gt)
    cost.resize(gains.size() + 1)
    c.costs(rows, <int32_t> gains.size() + 1, cost.data())
    best_rate = tokens / cost[0][0]
    for m in range(1, <int32_t> gains.size() + 1):
        tokens += gains[0][m - 1].gain
        if rows >= _ROW_MULTIPLE and (rows + m) % _ROW_MULTIPLE != 0 and m < <int32_t> gains.size():
            continue
        rate = tokens / cost[0][m]
        if rate > best_rate:
            best_rate = rate
            best_m = m
    for m in range(best_m):
        ks[0][gains[0][m].at] += 1


def _spec_plan_step(dict times, list seqs, int max_rows=512):
    """(tests) The draft lengths a batch step picks: ``times`` {rows: step us} measured, ``seqs``
    [(accepted, cut_short, n_max)] per generating sequence (its decayed counts and bound)."""
    cdef BatchSpec plan
    cdef vector[SeqCore *] qs
    cdef SeqCore * q
    cdef _SpecMemory mem = _SpecMemory()
    plan.curve = &mem.m.curve
    plan.curve.reset(max_rows)
    for rows, us in times.items():
        plan.curve.record(rows, us, False)
    try:
        for s, f, n_max in seqs:
            q = new SeqCore()
            qs.push_back(q)
            q.drafter = <lgspec.Drafter *> <size_t> 1    # (never used: the plan only asks whether)
            q.pending = 0
            q.n_past = 0
            q.max_new = 1 << 20
            q.n_ctx = 1 << 20
            q.spec_n_max = n_max
            q.spec_s = s
            q.spec_f = f
        _spec_plan_batch(qs, &plan)
        return list(plan.ks)
    finally:
        for i in range(qs.size()):
            qs[i].drafter = NULL
            del qs[i]


def _spec_runs(list verified, dict times=None, int bound=16):
    """(tests) A sequence's acceptance model after ``verified`` [(drafted, accepted)] outcomes, in
    order (a whole draft accepted carries its run on to the next): the run position the next
    draft starts at, the chance of acceptance of each of its ``bound`` tokens, and the length a
    single stream drafts there given ``times`` {rows: decode us} (None: not asked)."""
    cdef SeqCore q
    cdef CostCurve c
    cdef vector[double] h
    cdef int32_t j, k = -1
    for n, i in verified:
        q.spec_learn(n, i)
    for j in range(bound):
        h.push_back(q.spec_h(j))
    if times is not None:
        c.reset(MAX_DRAFT_ROWS)
        for rows, us in times.items():
            c.record(rows, us, False)
        k = _curve_best(&c, h.data(), bound)
    return q.spec_off, list(h), k


def _spec_plan(dict times, double alpha, int bound, dict firsts=None):
    """(tests) The draft length a single stream picks: ``times`` {rows: decode us} measured,
    ``alpha`` its acceptance rate, ``bound`` the most it may draft; and the curve's estimates
    for 1..bound + 1 rows.  ``firsts``: then decodes of sizes not measured before, as a stream's
    steps add them (CostCurve.add)."""
    cdef CostCurve c
    cdef vector[double] out
    cdef vector[double] h = vector[double](max(bound, 1), alpha)
    c.reset(MAX_DRAFT_ROWS)
    for rows, us in times.items():
        c.record(rows, us, False)
    for rows, us in (firsts or {}).items():
        c.add(rows, us)
    out.resize(bound + 1)
    c.costs(1, bound + 1, out.data())
    return _curve_best(&c, h.data(), bound), list(out)


cdef object _spec_stats(SeqCore * c):
    if c.spec_n_max <= 0:
        return None
    return {"drafted": c.n_drafted, "accepted": c.n_accepted,
            "acceptance_rate": <double> c.n_accepted / c.n_drafted if c.n_drafted else None,
            "verify_steps": c.n_verified}


cdef lgspec.Drafter * _new_drafter(spec, uint32_t n_seq, Context ctx) except NULL:
    """A drafter of ``spec``'s kind (a validated llamagen.Speculative) for ``n_seq`` sequences of
    ``ctx`` (draft-simple: a context of its own on the draft model, as large as ``ctx``)."""
    cdef string err
    cdef lgspec.Drafter * d
    cdef bytes kind_b = spec.type.encode()
    cdef const char * kind = kind_b
    cdef int32_t size_n = spec.ngram_n, size_m = spec.ngram_m, hits = spec.min_hits
    cdef Model dm
    cdef uint32_t n_ctx, n_batch
    cdef int32_t n_threads
    if spec.type == "draft-simple":
        dm = _draft_model(spec, ctx)
        n_ctx = llama.llama_n_ctx(ctx._ctx)
        n_batch = llama.llama_n_batch(ctx._ctx)
        n_threads = llama.llama_n_threads(ctx._ctx)
        _take_errors()
        with nogil:
            d = lgspec.create_draft(dm._model, ctx._ctx, n_seq, n_ctx, n_batch, n_threads, err)
        if d == NULL:
            raise invalid(ValueError, "speculative.draft_model",
                          f"speculative.draft_model: {err.decode('utf-8', 'replace')}"
                          f"{(' (' + _take_errors() + ')') if _take_errors() else ''}")
        return d
    with nogil:         # (ngram-mod fills a 16 MB table)
        d = lgspec.create(kind, n_seq, size_n, size_m, hits, err)
    if d == NULL:
        raise invalid(ValueError, "speculative.type", err.decode("utf-8", "replace"))
    return d


cdef Model _draft_model(spec, Context ctx):
    """``spec.draft_model``, checked against ``ctx``'s model before llama.cpp sees it."""
    dm = spec.draft_model
    if not isinstance(dm, Model):
        raise invalid(TypeError, "speculative.draft_model", "speculative.draft_model must be a "
                      f"llamagen.Model (the draft), got {type(dm).__name__}")
    cdef Model m = <Model> dm
    if m._model == NULL:
        raise invalid(ValueError, "speculative.draft_model", "speculative.draft_model is closed")
    cdef const llama.llama_vocab * dv = llama.llama_model_get_vocab(m._model)
    if llama.llama_vocab_n_tokens(dv) != ctx._n_vocab:
        raise invalid(ValueError, "speculative.draft_model",
                      f"speculative.draft_model has a vocabulary of {llama.llama_vocab_n_tokens(dv)} "
                      f"tokens, the model {ctx._n_vocab}: a draft must share the target's vocabulary")
    return m
