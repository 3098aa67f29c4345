# Saving a running GenerationState and resuming it on another context (issue 30): the sequence's
# KV cells (llama.cpp's sequence state), its tokens and held-back text, and its sampler's random
# state; the sampler is rebuilt from the parameters and the generated tokens are replayed into it
# (penalty and DRY windows, grammar), so the resumed stream goes on with the tokens the original
# would have produced.  Included by _core.pyx after _generation.pxi.

import json as _json
import struct as _struct

_GS_MAGIC = b"LGGS"
_GS_VERSION = 1


cdef dict _model_fingerprint(Model m):
    return {"n_vocab": m.n_vocab, "n_embd": llama.llama_model_n_embd(m._model),
            "n_layer": llama.llama_model_n_layer(m._model), "description": m.description}


def _gen_save(GenerationState st, path=None):
    """The bytes of a saved generation (written to ``path`` too when given)."""
    cdef SeqCore * q = st._core
    cdef size_t size, got
    cdef bytearray kv
    cdef unsigned char[::1] view
    if st._context is None:
        raise LlamaError("this GenerationState was not started: use llamagen.gen_begin()")
    params = st._seq.params
    if q.backend or q.engine == ENGINE_BACKEND:
        raise invalid(ValueError, "sampler_impl", "a generation sampled on the backend cannot be "
                      "saved (its chain lives in the context): use sampler_impl='fast'")
    if q.fast == NULL and not params.greedy:
        raise invalid(ValueError, "sampler_impl", "llama.cpp's sampler chain keeps its random "
                      "state private: only a greedy one, or sampler_impl='fast', can be saved")
    if st._enter():
        raise LlamaError("the generation is over: nothing to resume")
    try:
        size = llama.llama_state_seq_get_size(st._lctx, 0)
        kv = bytearray(size)
        view = kv
        with nogil:
            got = llama.llama_state_seq_get_data(st._lctx, &view[0], size, 0)
        if got == 0:
            raise LlamaError("llama.cpp could not copy the sequence's state")
        pdict = params.to_dict()
        pdict.pop("lora", None)
        pdict["seed"] = st._seq.seed
        header = {
            "version": _GS_VERSION, "model": _model_fingerprint(st._context.model),
            "params": pdict,
            "lora": [[a.path, sc] for a, sc in (st._lora or ())],
            "prompt": list(q.prompt), "tokens": list(q.tokens), "pending": q.pending,
            "n_past": q.n_past, "n_prompt": q.n_prompt,
            "raw": bytes(q.raw).hex(), "text": bytes(q.text).hex(), "stop_index": q.stop_index,
            "lp": list(q.lp), "lp_ids": list(q.lp_ids), "lp_top": list(q.lp_top),
            "rng": bytes(q.fast.rng_state()).decode() if q.fast != NULL else None,
        }
    finally:
        st._context._release()
    hj = _json.dumps(header).encode()
    data = _GS_MAGIC + _struct.pack("<II", _GS_VERSION, len(hj)) + hj + bytes(kv[:got])
    if path is not None:
        with open(path, "wb") as fh:
            fh.write(data)
    return data


def _gen_resume(Context ctx not None, source, lora=None):
    """A GenerationState going on from ``source`` (what GenerationState.save returned or wrote)."""
    cdef GenerationState st
    cdef SeqCore * q
    cdef const unsigned char[::1] view
    cdef size_t got
    cdef llama.llama_token t
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        with open(source, "rb") as fh:
            data = fh.read()
    if len(data) < 12 or data[:4] != _GS_MAGIC:
        raise invalid(ValueError, "source", "not a saved generation (GenerationState.save)")
    version, n = _struct.unpack_from("<II", data, 4)
    if version != _GS_VERSION or 12 + n > len(data):
        raise invalid(ValueError, "source", f"a saved generation of another version ({version}) "
                      "or truncated")
    try:
        h = _json.loads(data[12:12 + n])
        kv = data[12 + n:]
        ctx._check_generative()
        if h["model"] != _model_fingerprint(ctx.model):
            raise invalid(ValueError, "source", "the saved generation belongs to another model "
                          f"({h['model']['description']!r})")
        pd = {k: tuple(v) if isinstance(v, list) else v for k, v in h["params"].items()}
        pd["logit_bias"] = {int(k): v for k, v in h["params"]["logit_bias"].items()}
        if h["lora"] and lora is None:
            raise invalid(ValueError, "lora", "the generation ran with LoRA adapters "
                          f"({', '.join(p for p, _ in h['lora'])}): pass them (lora=)")
        params = SamplingParams(**pd, lora=lora)
        tokens, prompt = h["tokens"], h["prompt"]
        n_past, pending = int(h["n_past"]), int(h["pending"])
        _check_tokens(tokens + prompt + ([pending] if pending >= 0 else []), ctx._n_vocab)
    except (KeyError, TypeError, AttributeError, _json.JSONDecodeError) as e:
        raise invalid(ValueError, "source", f"a damaged saved generation ({e})") from None
    st = GenerationState.__new__(GenerationState)
    st._lora = _lora_key(ctx, params.lora)
    view = kv
    ctx._acquire()
    try:
        n_ctx = llama.llama_n_ctx_seq(ctx._ctx)
        if n_past >= n_ctx:
            raise invalid(ValueError, "source", f"the generation holds {n_past} cells, the context "
                          f"{n_ctx} per sequence")
        st._seq = _new_seq(ctx, params, <int32_t> h["n_prompt"], n_ctx)
        st._core = q = st._seq.c
        st._context = ctx
        st._lctx = ctx._ctx
        st._cand.resize(ctx._n_vocab)
        ctx._use_lora(st._lora)
        ctx._take_over()
        st._epoch = ctx._epoch
        mem = llama.llama_get_memory(ctx._ctx)
        llama.llama_memory_clear(mem, True)
        _take_errors()
        with nogil:
            got = llama.llama_state_seq_set_data(ctx._ctx, &view[0], view.shape[0], 0) \
                if view.shape[0] > 0 else 0
        if got == 0 or llama.llama_memory_seq_pos_max(mem, 0) + 1 != n_past:
            llama.llama_memory_clear(mem, True)
            raise LlamaError("the saved KV cells do not fit this context (another shape or KV "
                             f"type?): {_take_errors() or 'llama.cpp refused them'}")
        _reasoning_prime(q, prompt, params)
        for t in tokens:          # the sampler's windows and the grammar, as they were
            paused = q.thinking()
            if q.rbudget != NULL:
                llama.llama_sampler_accept(q.rbudget, t)
            if q.grammar != NULL and not paused and fs.lgfs_grammar_accept(q.grammar, t) != 0:
                raise invalid(ValueError, "source", "the saved tokens leave the grammar")
            if q.fast != NULL:
                q.fast.accept(t)
            elif q.chain != NULL:
                llama.llama_sampler_accept(q.chain, t)
        if h["rng"] is not None:
            if q.fast == NULL or not q.fast.set_rng_state(h["rng"].encode()):
                raise invalid(ValueError, "source", "the saved random state does not fit this "
                              "build's sampling engine")
        q.prompt = prompt
        q.tokens = tokens
        q.pending = pending
        q.n_past = n_past
        q.raw = bytes.fromhex(h["raw"])
        q.text = bytes.fromhex(h["text"])
        q.stop_index = h["stop_index"]
        if q.n_logprobs >= 0:
            q.lp = h["lp"]
            q.lp_ids = h["lp_ids"]
            q.lp_top = h["lp_top"]
        if q.spec_n_max > 0:
            q.drafter = _new_drafter(params.speculative, 1, ctx)
            q.owns_drafter = True
            st._sbatch = llama.llama_batch_init(q.spec_n_max + 1, 0, 1)
            # (a reference: the context drops a drafter's memory 8 drafters later)
            st._mem_ref = _spec_memory(ctx, params.speculative)
            st._mem = &(<_SpecMemory> st._mem_ref).m
            st._mem.load(&st._curve, q)
            st._has_sbatch = True
        st._n_reused = n_past
    finally:
        ctx._release()
    return st


cdef int _check_tokens(list toks, int32_t n_vocab) except -1:
    for t in toks:
        if not isinstance(t, int) or not 0 <= t < n_vocab:
            raise invalid(ValueError, "source", f"the saved generation holds token {t!r}, not a "
                          "token of this model")
    return 0
