# Speculation in a BatchGenerator (a "coding:" in the first two lines would be read as an
# encoding): one drafter per kind of Speculative shared by its slots, each step's drafts (planned together: _spec_plan_batch), and what a verified step
# leaves.  Module-level functions of the batch (they read its attributes).  Included by
# _core.pyx after _batch.pxi; the verification itself is SeqCore.verify (_seq.pxi).


cdef int _batch_admit_drafting(BatchGenerator self, _Seq q, int32_t slot) except -1:
    """``q`` took ``slot``: its drafter (the batch's for its kind, made on first use, one
    sequence per slot), and the acceptance it starts from: what the latest verified sequence of
    that drafter on the context knew (this batch's, an earlier batch's or stream's), at half
    weight (SpecMemory)."""
    spec = q.params.speculative
    i = self._drafter_index.get(spec.key)
    if i is None:
        self._drafters.push_back(_new_drafter(spec, <uint32_t> self._n_slots, self._context))
        mem = _spec_memory(self._context, spec)
        self._accepted_refs.append(mem)
        self._accepted.push_back(&(<_SpecMemory> mem).m)
        i = self._drafter_index[spec.key] = self._drafters.size() - 1
    q.c.drafter = self._drafters[<size_t> i]
    q.c.dseq = slot
    q.c.spec_begun = False
    self._accepted[<size_t> i].load_rates(q.c)
    return 0


cdef _SpecMemory _batch_curve_memory(Context ctx, int32_t n_batch):
    """The context's batch step-cost curve (in a _SpecMemory's ``curve``), which its
    BatchGenerators measure into: a batch step's cost (decode and sampling, by rows) is the
    model's and the machine's, not a drafter's or a batch's, so the next BatchGenerator on the
    context (a pipeline's next map_generate) starts from what the last one measured."""
    cdef _SpecMemory m = ctx._batch_curve
    if m is None or <int32_t> m.m.curve.w.size() != n_batch + 1:
        m = ctx._batch_curve = _SpecMemory()
        m.m.curve.reset(n_batch)
    return m


cdef bint _batch_draft(BatchGenerator self) noexcept nogil:
    """This step's drafts: lengths planned over the active sequences, the drafters run once
    each.  True when any generating sequence drafts (the step is then timed for the cost
    curve)."""
    cdef size_t i
    cdef SeqCore * q
    cdef int32_t k
    cdef bint any_spec = False, asked = False
    for i in range(self._active.size()):
        q = self._active[i]
        if q.pending >= 0 and q.drafter != NULL:
            any_spec = True
    if not any_spec:
        return False
    _spec_plan_batch(self._active, &self._spec)
    for i in range(self._active.size()):
        q = self._active[i]
        k = self._spec.ks[i]
        if k < 0:
            continue
        if q.spec_adaptive:
            k = q.spec_or_probe(k)
        if q.spec_want(k):
            asked = True
    if asked:
        for i in range(self._drafters.size()):
            lgspec.run(self._drafters[i])
        for i in range(self._active.size()):
            q = self._active[i]
            if q.spec_asked:
                q.spec_take()
    return True


cdef bint _batch_one_row(BatchGenerator self) noexcept nogil:
    """Whether this step's decode takes one-row kernels (Speculative.exact): when its rows are
    one sequence's pending token and draft, so that they come out as that sequence's plain
    one-row decodes would (a step with other sequences' rows is a many-row batch either way)."""
    cdef size_t i
    cdef SeqCore * q
    cdef SeqCore * only = NULL
    for i in range(self._active.size()):
        q = self._active[i]
        if q.batch_idx >= 0 or q.fed_now > 0:
            if only != NULL:
                return False
            only = q
    return only != NULL and only.draft_idx >= 0 and only.spec_exact


cdef void _batch_settle(BatchGenerator self) noexcept nogil:
    """After sampling (one thread: the KV cache and the shared drafters): each verified
    sequence's rejected cells go, its drafter learns what was accepted, the batch its rates."""
    cdef size_t i, j
    cdef SeqCore * q
    for i in range(self._sampled.size()):
        q = self._active[self._sampled[i]]
        if q.spec_acc >= 0:
            self.n_drafted += <int64_t> q.draft.size()
            self.n_accepted += q.spec_acc
            q.spec_settle(self._context._ctx, q.slot)
            for j in range(self._drafters.size()):
                if self._drafters[j] == q.drafter:
                    self._accepted[j].save_rates(q)


def _spec_batch_learned(BatchGenerator b, seq_id=None):
    """(tests) The acceptance a batch's next sequence starts from (at half weight), or
    ``seq_id``'s own now: the decayed (accepted, cut short) counts; None where nothing was
    learned.  ``seq_id="curve"``: the batch's step-cost curve, {rows: mean step us}."""
    cdef SeqCore * q
    cdef size_t i
    if seq_id is None:
        for i in range(b._accepted.size()):
            if b._accepted[i].has:
                return {"accepted": b._accepted[i].s, "cut_short": b._accepted[i].f}
        return None
    if seq_id == "curve":
        return {r: b._spec.curve.mean(r) for r in b._spec.curve.seen}
    q = b._get(seq_id).c
    return {"accepted": q.spec_s, "cut_short": q.spec_f}
