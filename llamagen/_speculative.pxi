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
