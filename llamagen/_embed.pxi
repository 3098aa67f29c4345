# Embeddings: pooled vectors of many texts per decode.  Included by _core.pyx after _logprobs.pxi.
#
# Texts go into one batch as separate sequences (whole: a text is pooled within one decode) until
# EMBED_PACK_TOKENS tokens or n_seq_max sequences (a longer text goes alone, up to n_batch); each
# decode starts from an empty KV cache and runs without the GIL; vectors are normalized by llama.cpp's
# own common_embd_normalize straight into the numpy output.  Once a context's first decode has shown
# that pooling its final hidden states gives llama.cpp's vectors, later decodes stop the graph there
# and skip the lm_head (csrc/lg_embed.h).

# Why not fill n_batch as llama-embedding does: every packed token attends over (masked) cells of all
# the decode's texts, and llama.cpp keeps a logits row per token (n_vocab floats) even for pooled
# embeddings, so a decode's cost grows faster than its tokens.  Measured (2 threads, mean pooling,
# n_batch 4096 vs 512 per decode): gemma3-270m 181 -> 267 tokens/s on short texts and 127 -> 243 on
# ~200-token ones; a 33M bge-small-shaped model 1,780 -> 2,320 (short); 256, 512 and 1024 within 4%.
cdef enum:
    EMBED_PACK_TOKENS = 512

import numpy as _np


cdef extern from *:
    """
    // llama.cpp's common library (linked into this module): -1 none, 0 max-abs scaled to int16
    // range, 1 taxicab, 2 euclidean, p > 2 p-norm
    void common_embd_normalize(const float * inp, float * out, int n, int embd_norm);
    """
    void common_embd_normalize(const float * inp, float * out, int n, int embd_norm) noexcept nogil


cdef vector[llama.llama_token] _embed_tokens(Context ctx, item, Py_ssize_t idx, int32_t limit,
                                            int32_t n_batch, bint truncate, bint add_special,
                                            bint parse_special, bint * cut) except *:
    """Text ``idx``'s tokens for an embedding decode: at most ``limit``, cut there with
    ``truncate`` (``cut[0]`` says so), else a PromptTooLongError naming the text."""
    cdef vector[llama.llama_token] t
    try:
        t = _prompt_tokens(ctx, item, add_special, parse_special, INT32_MAX)
    except (ValueError, TypeError) as e:
        raise _item_error(e, idx) from None
    cut[0] = <int32_t> t.size() > limit
    if cut[0]:
        if not truncate:
            err = PromptTooLongError(t.size(), limit, f"text {idx} has {t.size()} tokens but "
                                     f"one decode of this context holds {limit} (n_batch "
                                     f"{n_batch}, {llama.llama_n_ctx_seq(ctx._ctx)} cells per "
                                     "sequence): pass truncate=True or use a larger context")
            err.index = idx
            raise err
        t.resize(limit)
    return t


def _embed(Context ctx not None, list items, int norm, bint truncate, bint add_special,
           bint parse_special):
    """See llamagen.embed.  Returns (vectors, n_tokens per text, truncated per text): a float32
    array (n_texts, n_embd) when pooled, else a list of (n_tokens, n_embd) arrays."""
    cdef vector[vector[llama.llama_token]] toks
    cdef vector[llama.llama_token] t
    cdef int32_t limit, n_batch, n_pack, n_seq, n_embd, i, j, n, s, first, k, rc = 0
    cdef llama.llama_pooling_type pooling
    cdef llama.llama_batch batch
    cdef bint have_batch = False, pooled, cut = False
    cdef llama.llama_memory_t mem
    cdef const float * src
    cdef float * out
    cdef vector[float *] outs        # per text: where its vector(s) go
    cdef vector[float] rows          # the tap's hidden states of one decode (csrc/lg_embed.h)
    cdef vector[float] pbuf          # one pooled vector
    cdef bint use_tap, mine, ok
    cdef int how = lgembd.POOL_MEAN
    cdef int32_t max_rows, len_k
    cdef float[:, ::1] view
    ctx._check()
    if not ctx.embeddings:
        raise ContextError("embeddings need a Context made with embeddings=True (and pooling=..., "
                           "default the model's own)")
    pooling = llama.llama_get_pooling_type(ctx._ctx)
    pooled = pooling != llama.LLAMA_POOLING_TYPE_NONE
    n_batch = llama.llama_n_batch(ctx._ctx)
    n_seq = llama.llama_n_seq_max(ctx._ctx)
    # a decode's tokens all need cells: n_ctx bounds the batch too
    n_batch = min(n_batch, <int32_t> llama.llama_n_ctx(ctx._ctx))
    limit = min(n_batch, <int32_t> llama.llama_n_ctx_seq(ctx._ctx))
    n_pack = min(n_batch, EMBED_PACK_TOKENS)
    n_embd = llama.llama_model_n_embd_out(ctx.model._model)
    if pooling == llama.LLAMA_POOLING_TYPE_RANK:
        # a reranker's head: n_cls_out scores per sequence
        n_embd = llama.llama_model_n_cls_out(ctx.model._model)
        if n_embd < 1:
            raise ValueError("rank pooling needs a reranker: this model has no classification "
                             "head (no classifier labels in its GGUF)")
    n_tokens, truncated = [], []
    for idx, item in enumerate(items):
        t = _embed_tokens(ctx, item, idx, limit, n_batch, truncate, add_special, parse_special,
                          &cut)
        toks.push_back(t)
        n_tokens.append(<int> t.size())
        truncated.append(bool(cut))
    ctx._check()        # (reading the texts ran user code, which may have closed it)
    # the output, allocated up front so the decode loop writes into it without the GIL
    outs.resize(toks.size())
    if pooled:
        result = _np.zeros((toks.size(), n_embd), dtype=_np.float32)
        if toks.size() > 0 and n_embd > 0:
            view = result
            for i in range(<int32_t> toks.size()):
                outs[i] = &view[i, 0]
    else:
        result = []
        for i in range(<int32_t> toks.size()):
            a = _np.zeros((toks[i].size(), n_embd), dtype=_np.float32)
            result.append(a)
            if n_embd > 0:
                view = a
                outs[i] = &view[0, 0]
    if toks.size() == 0:
        return result, n_tokens, truncated
    # the hidden-state tap for the pooling kinds llama.cpp does in plain sums (not RANK's heads)
    use_tap = ctx._tap_state >= 0 and n_embd > 0 and pooling in (
        llama.LLAMA_POOLING_TYPE_NONE, llama.LLAMA_POOLING_TYPE_MEAN,
        llama.LLAMA_POOLING_TYPE_CLS, llama.LLAMA_POOLING_TYPE_LAST)
    if pooling == llama.LLAMA_POOLING_TYPE_CLS:
        how = lgembd.POOL_FIRST
    elif pooling == llama.LLAMA_POOLING_TYPE_LAST:
        how = lgembd.POOL_LAST
    if use_tap:
        max_rows = n_pack
        for i in range(<int32_t> toks.size()):
            max_rows = max(max_rows, <int32_t> toks[i].size())
        rows.resize(<size_t> min(max_rows, n_batch) * n_embd)
        pbuf.resize(n_embd)
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
            i = 0
            while i < <int32_t> toks.size() and rc == 0 and not ctx._abort.interrupted:
                # whole texts until n_pack tokens or n_seq_max sequences; the first text of a
                # decode always goes in (it fits n_batch: checked above)
                first = i
                n = 0
                s = 0
                while i < <int32_t> toks.size() and s < n_seq and \
                        (s == 0 or n + <int32_t> toks[i].size() <= n_pack):
                    for j in range(<int32_t> toks[i].size()):
                        batch.token[n] = toks[i][j]
                        batch.pos[n] = j
                        batch.n_seq_id[n] = 1
                        batch.seq_id[n][0] = s
                        batch.logits[n] = 1
                        n += 1
                    s += 1
                    i += 1
                batch.n_tokens = n
                llama.llama_memory_clear(mem, True)
                if use_tap:
                    # once checked, stop the graph at the hidden states (no lm_head)
                    ctx._tap.armed = 1
                    ctx._tap.stop = ctx._tap_state == 1
                    ctx._tap.got = 0
                    ctx._tap.unpooled = not pooled
                    ctx._tap.n_embd = n_embd
                    ctx._tap.n_rows = n
                    ctx._tap.dst = rows.data()
                rc = llama.llama_decode(ctx._ctx, batch)
                ctx._tap.armed = 0
                if rc != 0:
                    break
                mine = use_tap and ctx._tap.got
                if use_tap and ctx._tap_state == 0:
                    # the context's first decode ran whole: the tap's pooling must give
                    # llama.cpp's vectors for every sequence, or the tap stays off
                    ok = mine
                    n = 0
                    k = first
                    while ok and k < i:
                        len_k = <int32_t> toks[k].size()
                        if pooled:
                            lgembd.pool(rows.data(), n_embd, n, len_k, how, pbuf.data())
                            src = llama.llama_get_embeddings_seq(ctx._ctx, k - first)
                            ok = src != NULL and lgembd.same_vector(pbuf.data(), src, n_embd)
                        else:
                            for j in range(len_k):
                                src = llama.llama_get_embeddings_ith(ctx._ctx, n + j)
                                if src == NULL or not lgembd.same_vector(
                                        rows.data() + <size_t> (n + j) * n_embd, src, n_embd):
                                    ok = False
                                    break
                        n += len_k
                        k += 1
                    ctx._tap_state = 1 if ok else -1
                    mine = ok
                    use_tap = ok
                n = 0
                for k in range(first, i):
                    len_k = <int32_t> toks[k].size()
                    if pooled:
                        if mine:
                            lgembd.pool(rows.data(), n_embd, n, len_k, how, pbuf.data())
                            src = pbuf.data()
                        else:
                            src = llama.llama_get_embeddings_seq(ctx._ctx, k - first)
                            if src == NULL:
                                rc = -100
                                break
                        common_embd_normalize(src, outs[k], n_embd, norm)
                    else:
                        for j in range(len_k):
                            if mine:
                                src = rows.data() + <size_t> (n + j) * n_embd
                            else:
                                src = llama.llama_get_embeddings_ith(ctx._ctx, n + j)
                                if src == NULL:
                                    rc = -100
                                    break
                            common_embd_normalize(src, outs[k] + <size_t> j * n_embd, n_embd, norm)
                        if rc != 0:
                            break
                    n += len_k
            llama.llama_memory_clear(mem, True)
    finally:
        ctx._abort.armed = 0
        ctx._tap.armed = 0
        if have_batch:
            llama.llama_batch_free(batch)
        ctx._release()
    if ctx._abort.interrupted:
        ctx._abort.interrupted = 0
        raise KeyboardInterrupt
    if rc == -100:
        raise LlamaError("llama.cpp returned no embeddings for a sequence (does this model "
                         "support the context's pooling?)")
    if rc != 0:
        check_decode(rc, b"embedding")
    return result, n_tokens, truncated


def _embed_splits(Context ctx not None):
    """Whether _EmbedText can embed one text a few tokens per call on ``ctx``: causal attention
    (a token's hidden state does not depend on later tokens, so pieces decoded one after another
    over kept KV cells give the whole text's rows) and a pooling that combines across pieces
    (not RANK's head)."""
    ctx._check()
    return bool(ctx.embeddings and llama.llama_get_causal_attn(ctx._ctx)
                and llama.llama_get_pooling_type(ctx._ctx) != llama.LLAMA_POOLING_TYPE_RANK)


cdef class _EmbedText:
    """One text embedded ``step(k)`` tokens at a time, its KV cells kept between steps: an engine
    interleaves a long text with generation steps instead of stalling every stream for the whole
    text (issue 35).  Needs _embed_splits(ctx).  The result is _embed's for that one text (the same
    tokens, truncation and errors) up to llama.cpp's batch variance: MEAN pools the sum of every
    piece's rows, CLS the first piece's, LAST the last one's.  If the context was used by anything
    else between steps, the text starts again from its first token."""
    cdef Context ctx
    cdef vector[llama.llama_token] toks
    cdef int32_t n_embd, norm
    cdef readonly int32_t done
    cdef llama.llama_pooling_type pooling
    cdef uint64_t epoch
    cdef vector[float] acc           # pooled: the sum (MEAN) or the vector (CLS, LAST) so far
    cdef vector[float] rows          # the tap's hidden states of one piece
    cdef vector[float] pooled        # ... pooled
    cdef readonly object vectors     # as _embed returns them for one text
    cdef readonly int n_tokens
    cdef readonly bint truncated

    def __init__(self, Context ctx not None, item, int norm, bint truncate, bint add_special,
                 bint parse_special):
        cdef int32_t n_batch
        cdef bint cut = False
        if not _embed_splits(ctx):
            raise ValueError("this context cannot embed a text in pieces (bidirectional attention "
                             "or rank pooling)")
        self.ctx = ctx
        self.norm = norm
        self.pooling = llama.llama_get_pooling_type(ctx._ctx)
        self.n_embd = llama.llama_model_n_embd_out(ctx.model._model)
        # the same tokens, limit and errors as _embed (a text fits one decode there)
        n_batch = min(llama.llama_n_batch(ctx._ctx), llama.llama_n_ctx(ctx._ctx))
        self.toks = _embed_tokens(ctx, item, 0, min(n_batch, llama.llama_n_ctx_seq(ctx._ctx)),
                                  n_batch, truncate, add_special, parse_special, &cut)
        self.truncated = cut
        self.n_tokens = <int> self.toks.size()
        if self.pooling == llama.LLAMA_POOLING_TYPE_NONE:
            self.vectors = [_np.zeros((self.n_tokens, self.n_embd), dtype=_np.float32)]
        else:
            self.vectors = _np.zeros((1, self.n_embd), dtype=_np.float32)
        self.acc.assign(self.n_embd, 0)
        self.pooled.resize(self.n_embd)

    @property
    def finished(self):
        return self.done >= <int32_t> self.toks.size()

    def step(self, int32_t max_tokens):
        """Decode the next ``max_tokens`` tokens (at least one, at most a ubatch); True once the
        text is done and ``vectors`` holds its result."""
        cdef Context ctx = self.ctx
        cdef int32_t size = <int32_t> self.toks.size(), k, i, j, done, n_embd = self.n_embd
        cdef int32_t rc = 0
        cdef llama.llama_batch batch
        cdef bint have_batch = False, use_tap = False, last
        cdef llama.llama_memory_t mem
        cdef const float * src
        cdef float * out
        cdef float * acc
        cdef int how = lgembd.POOL_MEAN
        cdef float[:, ::1] view
        ctx._check()
        if self.done >= size:
            return True
        if self.pooling == llama.LLAMA_POOLING_TYPE_CLS:
            how = lgembd.POOL_FIRST
        elif self.pooling == llama.LLAMA_POOLING_TYPE_LAST:
            how = lgembd.POOL_LAST
        view = self.vectors[0] if self.pooling == llama.LLAMA_POOLING_TYPE_NONE else self.vectors
        out = NULL
        if n_embd > 0 and view.shape[0] > 0:
            out = &view[0, 0]
        ctx._acquire()
        try:
            mem = llama.llama_get_memory(ctx._ctx)
            if self.done == 0 or ctx._epoch != self.epoch:
                # (someone else decoded here meanwhile: the kept cells are gone)
                self.done = 0
                self.acc.assign(n_embd, 0)
                ctx._take_over()
                ctx._use_lora(ctx._lora_default)
                llama.llama_memory_clear(mem, True)
                self.epoch = ctx._epoch
            done = self.done
            k = min(max(1, max_tokens), size - done, <int32_t> llama.llama_n_ubatch(ctx._ctx))
            last = done + k == size
            use_tap = ctx._tap_state == 1 and n_embd > 0
            if use_tap:
                self.rows.resize(<size_t> k * n_embd)
            acc = self.acc.data()
            batch = llama.llama_batch_init(k, 0, 1)
            have_batch = True
            ctx._abort.armed = 1
            ctx._abort.interrupted = 0
            ctx._abort.last_us = llamagen_monotonic_us()
            with nogil:
                for j in range(k):
                    batch.token[j] = self.toks[done + j]
                    batch.pos[j] = done + j
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = 0
                    batch.logits[j] = 1
                batch.n_tokens = k
                if use_tap:
                    ctx._tap.armed = 1
                    ctx._tap.stop = 1
                    ctx._tap.got = 0
                    ctx._tap.unpooled = self.pooling == llama.LLAMA_POOLING_TYPE_NONE
                    ctx._tap.n_embd = n_embd
                    ctx._tap.n_rows = k
                    ctx._tap.dst = self.rows.data()
                rc = llama.llama_decode(ctx._ctx, batch)
                ctx._tap.armed = 0
                use_tap = use_tap and ctx._tap.got
                if rc == 0 and n_embd > 0:
                    if self.pooling == llama.LLAMA_POOLING_TYPE_NONE:
                        for j in range(k):
                            if use_tap:
                                src = self.rows.data() + <size_t> j * n_embd
                            else:
                                src = llama.llama_get_embeddings_ith(ctx._ctx, j)
                                if src == NULL:
                                    rc = -100
                                    break
                            common_embd_normalize(src, out + <size_t> (done + j) * n_embd,
                                                  n_embd, self.norm)
                    else:
                        # this piece's pooled vector (the tap's rows pooled here, else
                        # llama.cpp's), combined with the earlier pieces': a mean by length
                        if use_tap:
                            lgembd.pool(self.rows.data(), n_embd, 0, k, how, self.pooled.data())
                            src = self.pooled.data()
                        else:
                            src = llama.llama_get_embeddings_seq(ctx._ctx, 0)
                        if src == NULL:
                            rc = -100
                        elif how == lgembd.POOL_MEAN:
                            for i in range(n_embd):
                                acc[i] += k * src[i]
                        elif (how == lgembd.POOL_FIRST and done == 0) or \
                                (how == lgembd.POOL_LAST and last):
                            for i in range(n_embd):
                                acc[i] = src[i]
                if rc == 0 and last:
                    if self.pooling != llama.LLAMA_POOLING_TYPE_NONE and n_embd > 0:
                        if how == lgembd.POOL_MEAN:
                            for i in range(n_embd):
                                acc[i] /= size
                        common_embd_normalize(acc, out, n_embd, self.norm)
                    llama.llama_memory_clear(mem, True)
            if rc == 0:
                self.done = done + k
        finally:
            ctx._abort.armed = 0
            ctx._tap.armed = 0
            if have_batch:
                llama.llama_batch_free(batch)
            ctx._release()
        if ctx._abort.interrupted:
            ctx._abort.interrupted = 0
            raise KeyboardInterrupt
        if rc == -100:
            raise LlamaError("llama.cpp returned no embeddings for a sequence (does this model "
                             "support the context's pooling?)")
        if rc != 0:
            check_decode(rc, b"embedding")
        return self.done >= size


def _rerank_tokens(Model model not None, query, document):
    """One (query, document) pair as llama-server formats it for a reranker
    (format_prompt_rerank): the GGUF's "rerank" template with {query} and {document} replaced,
    tokenized with special tokens parsed; without one, [BOS] query [EOS] [SEP] document [EOS],
    each special token where the vocabulary adds it (EOS falls back to SEP)."""
    cdef const char * tmpl
    cdef const llama.llama_vocab * vocab
    cdef llama.llama_token eos
    model._check()
    vocab = model._vocab
    for name, v in (("query", query), ("document", document)):
        if not isinstance(v, str):
            raise TypeError(f"{name} must be str, got {type(v).__name__}")
    tmpl = llama.llama_model_chat_template(model._model, b"rerank")
    if tmpl != NULL:
        prompt = (<bytes> tmpl).decode("utf-8", "replace")
        prompt = prompt.replace("{query}", query).replace("{document}", document)
        return _tokenize(vocab, prompt, False, True)
    toks = []
    eos = llama.llama_vocab_eos(vocab)
    if eos == llama.LLAMA_TOKEN_NULL:
        eos = llama.llama_vocab_sep(vocab)
    if llama.llama_vocab_get_add_bos(vocab):
        toks.append(llama.llama_vocab_bos(vocab))
    toks += _tokenize(vocab, query, False, False)
    if llama.llama_vocab_get_add_eos(vocab):
        toks.append(eos)
    if llama.llama_vocab_get_add_sep(vocab):
        toks.append(llama.llama_vocab_sep(vocab))
    toks += _tokenize(vocab, document, False, False)
    if llama.llama_vocab_get_add_eos(vocab):
        toks.append(eos)
    return toks
