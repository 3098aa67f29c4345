# Speculative decoding's shared pieces: the decode-cost model that sets draft lengths, the
# statistics a sequence reports and the drafters (csrc/lg_spec.cpp over llama.cpp's
# common/speculative.h).  The verification itself is SeqCore.verify (_seq.pxi).  Included by
# _core.pyx after _seq.pxi.

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
    sequence's share of the step (``n_gen`` sequences decode a token in it).  Until decodes of
    more than one size have been timed, a prior of a row costing a quarter of a step's fixed
    part: 1 / (1 + 4 / n_gen) (0.2 alone, 0.67 at 8 sequences, 0.89 at 32: in a batch the fixed
    part is already shared, and a drafted row is dearer next to it)."""
    cdef double mx, my, var, b, a
    cdef double n = n_gen if n_gen > 1.0 else 1.0
    if c.w < 2.0:
        return 1.0 / (1.0 + 4.0 / n)
    mx = c.sx / c.w
    my = c.sy / c.w
    var = c.sxx / c.w - mx * mx
    if var < 0.05:
        return 1.0 / (1.0 + 4.0 / n)
    b = (c.sxy / c.w - mx * my) / var
    a = my - b * mx
    if b <= 0.0:
        return 0.02
    if a < 0.0:
        a = 0.0
    return b / (b + a / (n_gen if n_gen > 1.0 else 1.0))


# A single stream's decode time by rows decoded (1..65: the pending token and up to 64 drafted):
# a decayed mean per row count.  A line fitted to it misleads where the cost is not linear in the
# rows (gemma3 Q4_K_M on a 2-core EPYC: 1 row 10 ms, 2 rows 20 ms, 8 rows 38 ms, 16 rows 50 ms:
# each logits row of its 262k-token output matrix costs most of a step until the batch is large
# enough for its multi-row kernels), so a stream that only ever tried short drafts would never
# draft the long ones that pay.
cdef enum:
    _CURVE_ROWS = 66
cdef double _CURVE_PRIOR = 0.1             # (below)

cdef struct SpecCurve:
    double w[_CURVE_ROWS]                   # decayed counts of decodes of i rows
    double t[_CURVE_ROWS]                   # ... and of their times (us)


cdef inline void _curve_add(SpecCurve * c, int32_t rows, double us) noexcept nogil:
    if 0 < rows < _CURVE_ROWS:
        c.w[rows] = 0.8 * c.w[rows] + 1.0
        c.t[rows] = 0.8 * c.t[rows] + us


cdef double _curve_cost(SpecCurve * c, int32_t rows) noexcept nogil:
    """The expected time of a decode of ``rows`` rows: measured where decodes of that size were
    timed; between two measured sizes the line through them; past the largest, that one plus a
    prior of a tenth of a one-row decode per row: optimistic (0.1-0.5 was measured on the
    project's CPUs, docs/speculative.md), so a longer draft is tried and its real cost learned,
    where a pessimistic prior would never be corrected."""
    cdef int32_t lo = rows, hi = rows, m = 1
    cdef double one = 1.0, tl, th
    while m < _CURVE_ROWS and c.w[m] <= 0.0:
        m += 1
    if m < _CURVE_ROWS:                     # a one-row decode, measured or scaled from the prior
        one = c.t[m] / c.w[m] / (1.0 + _CURVE_PRIOR * (m - 1))
    while lo >= 1 and c.w[lo] <= 0.0:
        lo -= 1
    if lo == rows:
        return c.t[rows] / c.w[rows]
    while hi < _CURVE_ROWS and c.w[hi] <= 0.0:
        hi += 1
    if lo < 1:
        return one * (1.0 + _CURVE_PRIOR * (rows - 1))
    tl = c.t[lo] / c.w[lo]
    if hi >= _CURVE_ROWS:
        return tl + _CURVE_PRIOR * one * (rows - lo)
    th = c.t[hi] / c.w[hi]
    return tl + (th - tl) * (rows - lo) / (hi - lo)


cdef int32_t _spec_budget_curve(SeqCore * q, SpecCurve * c) noexcept nogil:
    """How many tokens a single stream drafts after its pending one: the k that makes the most
    tokens per unit of time, (1 + alpha + ... + alpha^k) / cost(k + 1), with alpha the sequence's
    acceptance rate and cost the measured curve (0: decode the pending token alone, or probe)."""
    cdef int32_t b = q.spec_bound()
    if b <= 0:
        return 0
    if not q.spec_adaptive:
        return b
    return q.spec_or_probe(_curve_best(c, q.spec_alpha(), b))


cdef int32_t _curve_best(SpecCurve * c, double alpha, int32_t b) noexcept nogil:
    cdef int32_t k, best = 0
    cdef double e = 1.0, p = 1.0, rate, best_rate = 1.0 / _curve_cost(c, 1)
    for k in range(1, b + 1):
        p *= alpha
        e += p
        rate = e / _curve_cost(c, k + 1)
        if rate > best_rate:
            best_rate = rate
            best = k
    return best


def _spec_plan(dict times, double alpha, int bound):
    """(tests) The draft length a single stream picks: ``times`` {rows: decode us} measured,
    ``alpha`` its acceptance rate, ``bound`` the most it may draft; and the curve's estimates
    for 1..bound + 1 rows."""
    cdef SpecCurve c
    memset(&c, 0, sizeof(SpecCurve))
    for rows, us in times.items():
        _curve_add(&c, rows, us)
    return _curve_best(&c, alpha, bound), [_curve_cost(&c, r) for r in range(1, bound + 2)]


cdef object _spec_stats(SeqCore * c):
    if c.spec_n_max <= 0:
        return None
    return {"drafted": c.n_drafted, "accepted": c.n_accepted,
            "acceptance_rate": <double> c.n_accepted / c.n_drafted if c.n_drafted else None,
            "verify_steps": c.n_verified, "near_ties": c.n_solo}


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
