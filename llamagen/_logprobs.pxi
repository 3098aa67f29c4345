# Log-probabilities as Python objects, and prompt scoring.  Included by _core.pyx after
# _batch.pxi.
#
# Generated tokens: SeqCore.consume records, per token, the chosen token's logprob and the k most
# likely alternatives (csrc/lg_logprobs.h) into flat C++ vectors; the objects below are made only
# when asked for.  Scoring decodes texts as sequences of one batch with an output row for every
# token but the last, and keeps logp(token i | tokens < i) from row i - 1.

from cython.parallel cimport prange, threadid

from llamagen._results import ScoreResult as _ScoreResult, TokenLogprob as _TokenLogprob, \
    TopLogprob as _TopLogprob

# the most logits rows one scoring decode asks for: llama.cpp keeps n_outputs x n_vocab floats
# (at a 262k vocabulary, 128 rows are 128 MiB)
cdef int64_t _SCORE_LOGITS_BUDGET = 1 << 25


cdef bytes _piece_of(Model model, llama.llama_token tok):
    """The bytes ``tok`` renders to, special tokens included (cached per model)."""
    cdef char buf[256]
    cdef int32_t n
    cdef vector[char] big
    p = model._pieces.get(tok)
    if p is not None:
        return p
    n = llama.llama_token_to_piece(model._vocab, tok, buf, sizeof(buf), 0, True)
    if n >= 0:
        p = buf[:n]
    else:
        big.resize(-n)
        n = llama.llama_token_to_piece(model._vocab, tok, big.data(), <int32_t> big.size(), 0, True)
        p = big.data()[:max(n, 0)]
    model._pieces[tok] = p
    return p


cdef tuple _top_of(Model model, const int32_t * ids, const float * lps, int32_t k):
    return tuple([_TopLogprob(ids[j], <double> lps[j], _piece_of(model, ids[j])) for j in range(k)])


cdef list _seq_logprobs(Model model, SeqCore * c, Py_ssize_t start, Py_ssize_t end):
    """TokenLogprobs of generated tokens [start, end) of ``c`` (only those that have one)."""
    cdef Py_ssize_t i, n = min(<Py_ssize_t> c.lp.size(), <Py_ssize_t> c.tokens.size())
    cdef int32_t k = c.n_logprobs
    if k < 0:
        return []
    if end < 0 or end > n:
        end = n
    out = []
    for i in range(max(0, start), end):
        out.append(_TokenLogprob(c.tokens[i], <double> c.lp[i], _piece_of(model, c.tokens[i]),
                                 _top_of(model, c.lp_ids.data() + i * k, c.lp_top.data() + i * k, k)))
    return out


cdef void _prompt_rows(llama.llama_context * lctx, vector[SeqCore *] & active,
                       vector[_PromptRow] & rows, int n_threads) noexcept nogil:
    """Prompt logprobs (``prompt_logprobs``): the rows a batch step computed for the sequences
    that asked for them, in parallel as _score does (BatchGenerator._sample_all)."""
    cdef size_t i
    cdef int32_t j, k, m
    cdef Py_ssize_t r, n_rows
    cdef SeqCore * q
    cdef _PromptRow pr
    rows.clear()
    for i in range(active.size()):
        q = active[i]
        if q.n_prompt_lp < 0 or q.plp_count <= 0:
            continue
        m = <int32_t> q.prompt.size() - 1
        if <int32_t> q.plp.size() < m:
            k = q.n_prompt_lp
            q.plp.resize(m)
            q.plp_ids.resize(<size_t> m * k)
            q.plp_top.resize(<size_t> m * k)
        for j in range(q.plp_count):
            pr.q = q
            pr.pos = q.plp_pos + j
            pr.batch_idx = q.plp_row + j
            rows.push_back(pr)
        q.plp_count = 0
    n_rows = <Py_ssize_t> rows.size()
    if n_rows > 1 and n_threads > 1:
        for r in prange(n_rows, num_threads=n_threads, schedule="static"):
            _prompt_row(lctx, &rows[r])
    else:
        for r in range(n_rows):
            _prompt_row(lctx, &rows[r])


cdef void _prompt_row(llama.llama_context * lctx, _PromptRow * pr) noexcept nogil:
    """One prompt-logprob row of a batch sequence (BatchGenerator._prompt_rows)."""
    cdef llama.llama_token_data heap[lglp.MAX_TOP + 1]
    cdef SeqCore * q = pr.q
    cdef int32_t k = q.n_prompt_lp
    cdef const float * row = llama.llama_get_logits_ith(lctx, pr.batch_idx)
    cdef double norm = lglp.row(row, q.n_vocab, k, q.plp_ids.data() + <size_t> pr.pos * k,
                                q.plp_top.data() + <size_t> pr.pos * k, heap)
    q.plp[pr.pos] = <float> (<double> row[q.prompt[pr.pos + 1]] - norm)


cdef list _prompt_logprobs(Model model, SeqCore * c):
    """TokenLogprobs of a batch sequence's prompt tokens: None for the first."""
    cdef Py_ssize_t i, n = <Py_ssize_t> c.prompt.size()
    cdef int32_t k = c.n_prompt_lp
    out = [_TokenLogprob(c.prompt[0], None, _piece_of(model, c.prompt[0]), ())]
    for i in range(1, n):
        out.append(_TokenLogprob(c.prompt[i], <double> c.plp[i - 1], _piece_of(model, c.prompt[i]),
                                 _top_of(model, c.plp_ids.data() + (i - 1) * k,
                                         c.plp_top.data() + (i - 1) * k, k)))
    return out


cdef struct _ScoreRow:
    int32_t text         # which text
    int32_t pos          # the token this row predicts the next of
    int32_t batch_idx


def _score(Context ctx not None, list texts, int32_t k, bint add_special, bint parse_special):
    """See llamagen.score."""
    cdef vector[vector[llama.llama_token]] toks
    cdef vector[llama.llama_token] t, cont
    cdef vector[int32_t] firsts             # per text: the first token that is scored
    cdef vector[vector[float]] lps
    cdef vector[vector[int32_t]] top_ids
    cdef vector[vector[float]] top_lps
    cdef int32_t n_ctx_seq, n_slots, n_batch, cap, i, j, n, m, slot, nt, rc = 0
    cdef int32_t n_vocab = ctx._n_vocab, n_threads
    cdef int64_t n_ctx_total, reserved = 0
    cdef vector[int32_t] slot_text, slot_fed, slot_len
    cdef vector[_ScoreRow] rows
    cdef vector[llama.llama_token_data] heaps
    cdef Py_ssize_t r, n_rows
    cdef int tid
    cdef int32_t next_text = 0, n_done = 0, n_texts
    cdef llama.llama_batch batch
    cdef bint unified, have_batch = False
    cdef llama.llama_memory_t mem
    cdef const float * row
    cdef double norm
    cdef _ScoreRow sr
    ctx._check_generative()
    n_ctx_seq = llama.llama_n_ctx_seq(ctx._ctx)
    for idx, text in enumerate(texts):
        try:
            if isinstance(text, tuple) and len(text) == 2 and not isinstance(text[0], int):
                # (context, continuation): only the continuation is scored
                t = _prompt_tokens(ctx, text[0], add_special, parse_special, INT32_MAX)
                c = _check_prompt(text[1])
                cont.clear()
                if isinstance(c, (str, bytes)):
                    cont = _tokenize(ctx._vocab, c, False, parse_special)
                else:
                    _fill_tokens(cont, c, ctx._n_vocab)
                if cont.size() == 0:
                    raise ValueError("the continuation is empty (no tokens to score)")
                firsts.push_back(<int32_t> t.size())
                t.insert(t.end(), cont.begin(), cont.end())
            else:
                t = _prompt_tokens(ctx, text, add_special, parse_special, INT32_MAX)
                firsts.push_back(1)
        except (ValueError, TypeError) as e:
            raise _item_error(e, idx) from None
        if <int32_t> t.size() > n_ctx_seq:
            err = PromptTooLongError(t.size(), n_ctx_seq, f"text {idx} has {t.size()} tokens but "
                                     f"one sequence's context holds {n_ctx_seq} (use a larger n_ctx)")
            err.index = idx
            raise err
        toks.push_back(t)
    ctx._check()        # (reading the texts ran user code, which may have closed it)
    n_texts = <int32_t> toks.size()
    lps.resize(n_texts)
    top_ids.resize(n_texts)
    top_lps.resize(n_texts)
    for i in range(n_texts):
        lps[i].assign(toks[i].size(), 0.0)
        if k > 0:
            top_ids[i].assign(toks[i].size() * k, 0)
            top_lps[i].assign(toks[i].size() * k, 0.0)
    n_slots = llama.llama_n_seq_max(ctx._ctx)
    n_batch = llama.llama_n_batch(ctx._ctx)
    n_ctx_total = llama.llama_n_ctx(ctx._ctx)
    unified = ctx.kv_unified or n_slots == 1
    cap = <int32_t> max(1, min(<int64_t> n_batch, _SCORE_LOGITS_BUDGET // max(1, n_vocab)))
    n_threads = max(1, llama.llama_n_threads(ctx._ctx))
    heaps.resize(n_threads * (lglp.MAX_TOP + 1))
    slot_text.assign(n_slots, -1)
    slot_fed.assign(n_slots, 0)
    slot_len.assign(n_slots, 0)
    if n_batch < 1:
        n_batch = 1
    ctx._acquire()
    try:
        ctx._take_over()
        ctx._use_lora(ctx._lora_default)
        batch = llama.llama_batch_init(n_batch, 0, 1)
        have_batch = True
        mem = llama.llama_get_memory(ctx._ctx)
        ctx._abort.armed = 1
        ctx._abort.interrupted = 0
        ctx._abort.last_us = llamagen_monotonic_us()
        with nogil:
            llama.llama_memory_clear(mem, True)
            while n_done < n_texts and rc == 0 and not ctx._abort.interrupted:
                # free slots take the next texts (on a unified cache, while their cells fit)
                for slot in range(n_slots):
                    if slot_text[slot] < 0 and next_text < n_texts:
                        nt = <int32_t> toks[next_text].size()
                        if unified and n_slots > 1 and reserved > 0 and reserved + nt > n_ctx_total:
                            break
                        slot_text[slot] = next_text
                        slot_fed[slot] = 0
                        slot_len[slot] = nt
                        reserved += nt
                        next_text += 1
                # one batch: chunks of the live texts (one text per batch on per-sequence KV
                # streams: llama.cpp mixes up several sequences' prompts there, see _batch.pxi)
                n = 0
                rows.clear()
                for slot in range(n_slots):
                    i = slot_text[slot]
                    if i < 0:
                        continue
                    while slot_fed[slot] < slot_len[slot] and n < n_batch and <int32_t> rows.size() < cap:
                        j = slot_fed[slot]
                        batch.token[n] = toks[i][j]
                        batch.pos[n] = j
                        batch.n_seq_id[n] = 1
                        batch.seq_id[n][0] = slot
                        # a row for every token whose next one is scored
                        batch.logits[n] = j + 1 >= firsts[i] and j + 1 < slot_len[slot]
                        if batch.logits[n]:
                            sr.text = i
                            sr.pos = j
                            sr.batch_idx = n
                            rows.push_back(sr)
                        n += 1
                        slot_fed[slot] += 1
                    if not unified or n >= n_batch or <int32_t> rows.size() >= cap:
                        break
                if n == 0:
                    break
                if rows.size() == 0:
                    # (one-token texts: nothing to predict, but llama.cpp wants an output)
                    batch.logits[n - 1] = 1
                batch.n_tokens = n
                rc = llama.llama_decode(ctx._ctx, batch)
                if rc != 0:
                    break
                llama.llama_synchronize(ctx._ctx)
                llama.llama_get_logits(ctx._ctx)
                n_rows = <Py_ssize_t> rows.size()
                for r in prange(n_rows, num_threads=n_threads, schedule="static"):
                    tid = threadid()
                    i = rows[r].text
                    j = rows[r].pos
                    row = llama.llama_get_logits_ith(ctx._ctx, rows[r].batch_idx)
                    if k > 0:
                        norm = lglp.row(row, n_vocab, k, top_ids[i].data() + (j + 1) * k,
                                        top_lps[i].data() + (j + 1) * k,
                                        heaps.data() + tid * (lglp.MAX_TOP + 1))
                    else:
                        norm = lglp.row(row, n_vocab, 0, NULL, NULL, NULL)
                    lps[i][j + 1] = <float> (<double> row[toks[i][j + 1]] - norm)
                # finished texts free their sequences
                for slot in range(n_slots):
                    if slot_text[slot] >= 0 and slot_fed[slot] == slot_len[slot]:
                        llama.llama_memory_seq_rm(mem, slot, -1, -1)
                        reserved -= slot_len[slot]
                        slot_text[slot] = -1
                        n_done += 1
            llama.llama_memory_clear(mem, True)
    finally:
        ctx._abort.armed = 0
        if have_batch:
            llama.llama_batch_free(batch)
        ctx._release()
    if ctx._abort.interrupted:
        ctx._abort.interrupted = 0
        raise KeyboardInterrupt
    if rc != 0:
        check_decode(rc, b"scoring")
    model = ctx.model
    out = []
    for i in range(n_texts):
        n = <int32_t> toks[i].size()
        ids = [toks[i][j] for j in range(n)]
        m = firsts[i]
        lp = [None] * m + [<double> lps[i][j] for j in range(m, n)]
        tops = None
        if k > 0:
            tops = [()] * m + [_top_of(model, top_ids[i].data() + j * k, top_lps[i].data() + j * k, k)
                               for j in range(m, n)]
        out.append(_ScoreResult(ids, lp, tops, [_piece_of(model, x) for x in ids]))
    return out


def _row_logprobs(const float[::1] row not None, int32_t k, int64_t iters=1):
    """Internal (tests, bench/): the logprob kernel on one row of float32 logits, ``iters`` times.
    Returns (norm, top ids, top logprobs, seconds per call); log p_i = row[i] - norm."""
    cdef vector[int32_t] ids
    cdef vector[float] lps
    cdef llama.llama_token_data heap[lglp.MAX_TOP + 1]
    cdef int32_t n = <int32_t> row.shape[0]
    cdef double norm = 0.0
    cdef int64_t t0, i
    if not 0 <= k <= lglp.MAX_TOP or n == 0 or iters < 1:
        raise ValueError("k must be in [0, 20], the row non-empty and iters >= 1")
    ids.resize(max(k, 1))
    lps.resize(max(k, 1))
    t0 = llamagen_monotonic_ns()
    with nogil:
        for i in range(iters):
            norm = lglp.row(&row[0], n, k, ids.data(), lps.data(), heap)
    dt = (llamagen_monotonic_ns() - t0) / 1e9 / iters
    return norm, [ids[i] for i in range(min(k, n))], [<double> lps[i] for i in range(min(k, n))], dt
