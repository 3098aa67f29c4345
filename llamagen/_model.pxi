# Model: a loaded GGUF file and its vocabulary.  Included by _core.pyx.

cdef inline int32_t _meta_get(const llama.llama_model * model, int32_t i, bint key,
                              vector[char] & buf) noexcept:
    if key:
        return llama.llama_model_meta_key_by_index(model, i, buf.data(), buf.size())
    return llama.llama_model_meta_val_str_by_index(model, i, buf.data(), buf.size())


cdef str _meta_string(const llama.llama_model * model, int32_t i, bint key):
    cdef vector[char] buf
    cdef int32_t n
    buf.resize(256)
    n = _meta_get(model, i, key, buf)
    if n < 0:
        return None
    if <size_t>n >= buf.size():
        buf.resize(n + 1)
        n = _meta_get(model, i, key, buf)
    return buf.data()[:n].decode("utf-8", "replace")


def _refuse_unloadable(path, fspath):
    """ModelLoadError for a model file that llama.cpp would reject with a poor message (empty) or
    abort the process on (see llamagen._gguf.check_loadable); ``path`` names it in the error."""
    if _os.path.getsize(fspath) == 0:
        raise ModelLoadError(path, "the file is empty")
    reason = _gguf_check_loadable(fspath)
    if reason is not None:
        raise ModelLoadError(path, reason)


cdef class Model:
    """A GGUF model loaded with llama.cpp.

    ``Model(path, *, n_gpu_layers=0, use_mmap=True, use_mlock=False, vocab_only=False,
    check_tensors=False, main_gpu=0, repack=True)``.  ``repack=False`` keeps the weights as stored
    instead of repacking them for the CPU's GEMM kernels (llama.cpp's ``--no-repack``: for comparing
    kernels).  Loading releases the GIL.  ``close()`` is idempotent;
    while a Context still uses the model the memory is kept until the last one closes.
    """
    cdef llama.llama_model * _model
    cdef const llama.llama_vocab * _vocab
    cdef readonly object path
    cdef readonly int32_t n_vocab
    cdef int _users          # open Contexts using this model
    cdef bint _closed        # close() was called
    cdef readonly bint vocab_only   # loaded with vocab_only=True: no weights, no Context
    cdef readonly int32_t n_gpu_layers   # as loaded (0: every weight on the CPU)
    cdef readonly bint repack       # weights repacked for the CPU's GEMM kernels (llama.cpp's default)
    cdef object _metadata
    cdef fs.lgfs_trie * _gtrie   # the vocabulary's prefix tree for grammar re-samples (lazy)
    cdef object _chat_default    # _ChatTemplates of the model's own template (lazy, _chat.pxi)
    cdef dict _chat_overrides    # template source -> _ChatTemplates, a few most recent
    cdef dict _grammars          # grammar key -> _GrammarProto (_sampling.pxi), most recent last
    cdef dict _pieces            # token id -> piece bytes with specials rendered (logprobs)
    cdef object __weakref__

    def __cinit__(self):
        self._model = NULL
        self._vocab = NULL
        self._users = 0
        self._closed = False
        self._gtrie = NULL
        self._chat_default = None
        self._chat_overrides = {}
        self._grammars = {}
        self._pieces = {}

    def __init__(self, path, *, n_gpu_layers=0, bint use_mmap=True, bint use_mlock=False,
                 bint vocab_only=False, bint check_tensors=False, main_gpu=0, bint repack=True):
        cdef llama.llama_model_params params = llama.llama_model_default_params()
        cdef bytes bpath
        cdef const char * cpath
        cdef llama.llama_model * m
        if self._model != NULL:
            raise LlamaError("Model is already initialised")
        path = _os.fspath(path)
        self.path = path
        if isinstance(path, bytes):
            bpath = path
        else:
            bpath = _os.fsencode(path)
        if not _os.path.exists(bpath):
            raise FileNotFoundError(2, "model file not found", path)
        if _os.path.isdir(bpath):
            raise ModelLoadError(path, "is a directory, not a GGUF file")
        _refuse_unloadable(path, bpath)
        n_gpu_layers = _check_int("n_gpu_layers", n_gpu_layers, -1, INT32_MAX,
                                  "-1 (every layer) or a layer count")
        main_gpu = _check_int("main_gpu", main_gpu, 0, INT32_MAX, "a device index >= 0")
        params.n_gpu_layers = n_gpu_layers
        params.main_gpu = main_gpu
        params.vocab_only = vocab_only
        params.check_tensors = check_tensors
        # llama.cpp's CPU_REPACK buffers (--no-repack there): off only to compare kernels
        params.use_extra_bufts = repack
        if use_mmap and use_mlock:
            params.load_mode = llama.LLAMA_LOAD_MODE_MMAP_MLOCK
        elif use_mmap:
            params.load_mode = llama.LLAMA_LOAD_MODE_MMAP
        elif use_mlock:
            params.load_mode = llama.LLAMA_LOAD_MODE_MLOCK
        else:
            params.load_mode = llama.LLAMA_LOAD_MODE_NONE
        _refresh_log_levels()
        _take_errors()
        cpath = bpath
        with nogil:
            m = llama.llama_model_load_from_file(cpath, params)
        if m == NULL:
            raise ModelLoadError(path, _take_errors() or "llama.cpp could not read it")
        self._model = m
        self.vocab_only = vocab_only
        self.n_gpu_layers = n_gpu_layers
        self.repack = repack
        self._vocab = llama.llama_model_get_vocab(m)
        self.n_vocab = llama.llama_vocab_n_tokens(self._vocab)

    def __dealloc__(self):
        if self._gtrie != NULL:
            fs.lgfs_trie_free(self._gtrie)
            self._gtrie = NULL
        if self._model != NULL:
            llama.llama_model_free(self._model)
            self._model = NULL

    cdef const fs.lgfs_trie * _grammar_trie(self) except NULL:
        """The token pieces as a prefix tree (built on first use, kept while the model lives;
        it outlives close(), the engines that walk it belong to Contexts that keep it alive)."""
        cdef fs.lgfs_trie * t
        if self._gtrie == NULL:
            self._pin()
            try:
                with nogil:
                    t = fs.lgfs_trie_new(self._vocab)
            finally:
                self._release_user()
            if self._gtrie == NULL:
                self._gtrie = t
            else:
                fs.lgfs_trie_free(t)
        return self._gtrie

    cdef int _check(self) except -1:
        if self._closed or self._model == NULL:
            raise LlamaError("the model is closed")
        return 0

    cdef int _pin(self) except -1:
        """Keep the model alive across a GIL-free call (or for a Context's lifetime): close()
        defers freeing it until the matching _release_user()."""
        self._check()
        self._users += 1
        return 0

    cdef void _release_user(self) noexcept:
        """A Context stopped using this model; free it if close() was called meanwhile."""
        self._users -= 1
        if self._users <= 0 and self._closed and self._model != NULL:
            llama.llama_model_free(self._model)
            self._model = NULL

    def close(self):
        """Free the model (deferred while a Context still uses it).  Idempotent."""
        self._closed = True
        self._grammars.clear()
        if self._users <= 0 and self._model != NULL:
            llama.llama_model_free(self._model)
            self._model = NULL

    @property
    def closed(self):
        return self._closed

    def _n_grammars_kept(self):
        """How many built grammars this model keeps for sequences to clone (tests, debugging)."""
        return len(self._grammars)

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self._closed else f"n_vocab={self.n_vocab}"
        return f"<llamagen.Model {self.path!r} {state}>"

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self                     # (a draft model in SamplingParams.to_dict's copy)

    # -- description -------------------------------------------------------------------------

    @property
    def n_ctx_train(self):
        self._check()
        return llama.llama_model_n_ctx_train(self._model)

    @property
    def n_embd(self):
        self._check()
        return llama.llama_model_n_embd(self._model)

    @property
    def n_embd_out(self):
        """Size of the vectors an embedding context returns (n_embd for most models)."""
        self._check()
        return llama.llama_model_n_embd_out(self._model)

    @property
    def n_layer(self):
        self._check()
        return llama.llama_model_n_layer(self._model)

    @property
    def n_params(self):
        self._check()
        return llama.llama_model_n_params(self._model)

    @property
    def size(self):
        """Bytes of all the model's tensors."""
        self._check()
        return llama.llama_model_size(self._model)

    @property
    def description(self):
        cdef char buf[512]
        self._check()
        n = llama.llama_model_desc(self._model, buf, sizeof(buf))
        return buf[:max(0, min(n, <int>sizeof(buf) - 1))].decode("utf-8", "replace")

    @property
    def architecture(self):
        return self.metadata.get("general.architecture")

    @property
    def metadata(self):
        """Every GGUF key -> value, as strings (arrays are summarised by llama.cpp)."""
        cdef int32_t i, n
        self._check()
        if self._metadata is None:
            n = llama.llama_model_meta_count(self._model)
            meta = {}
            for i in range(n):
                key = _meta_string(self._model, i, True)
                if key is not None:
                    meta[key] = _meta_string(self._model, i, False)
            self._metadata = meta
        return dict(self._metadata)

    @property
    def chat_template(self):
        cdef const char * t
        self._check()
        t = llama.llama_model_chat_template(self._model, NULL)
        return None if t == NULL else t.decode("utf-8", "replace")

    def apply_chat_template(self, messages, *, bint add_assistant=True, template=None):
        """Format chat messages [{"role": ..., "content": ...}] into a prompt string.

        Uses ``template`` (a built-in template name such as "gemma" or "chatml", or a template
        text) or else the model's own.  llama.cpp matches built-in templates by heuristics (no
        Jinja); an unknown template raises ValueError.  ``render_chat`` renders the Jinja
        template itself, as llama-server does.
        """
        cdef vector[llama.llama_chat_message] msgs
        cdef llama.llama_chat_message msg
        cdef vector[char] buf
        cdef int32_t n
        cdef const char * tmpl
        self._check()
        if template is None:
            template = self.chat_template
            if template is None:
                raise ValueError("the model has no chat template; pass template= (e.g. 'chatml')")
        if not isinstance(template, str):
            raise TypeError(f"template must be a str (a template name or text), not "
                            f"{type(template).__name__}")
        tb = template.encode("utf-8")
        if b"\0" in tb:
            raise ValueError("the chat template contains a NUL character")
        keep = []
        for m in messages:
            try:
                role, content = m["role"], m["content"]
            except (TypeError, KeyError):
                raise TypeError("messages must be dicts with 'role' and 'content'") from None
            rb, cb = str(role).encode("utf-8"), str(content).encode("utf-8")
            if b"\0" in rb or b"\0" in cb:
                # llama.cpp takes C strings: the text after a NUL would be dropped silently
                raise ValueError("a chat message's role or content contains a NUL character")
            keep.append((rb, cb))
            msg.role = rb
            msg.content = cb
            msgs.push_back(msg)
        tmpl = tb
        size = sum(len(r) + len(c) for r, c in keep) * 2 + 256
        buf.resize(size)
        n = llama.llama_chat_apply_template(tmpl, msgs.data(), msgs.size(), add_assistant,
                                            buf.data(), <int32_t> buf.size())
        if n < 0:
            raise ValueError(f"unknown chat template {template[:60]!r}")
        if <size_t> n > buf.size():
            buf.resize(n)
            n = llama.llama_chat_apply_template(tmpl, msgs.data(), msgs.size(), add_assistant,
                                                buf.data(), <int32_t> buf.size())
        return buf.data()[:n].decode("utf-8", "replace")

    def render_chat(self, messages, *, bint add_generation_prompt=True, template=None,
                    chat_template_kwargs=None, enable_thinking=None, bint prefill_assistant=True):
        """Render chat messages into a prompt with the model's Jinja chat template, exactly as
        llama-server renders them (llama.cpp's common/chat: same Jinja engine, same fixes and
        defaults).  A model without a chat template gets ChatML, as in llama-server.

        ``messages``: a list of OpenAI-style dicts ``{"role": str, "content": str | None | [
        {"type": "text", "text": str}, ...]}``, optionally with ``name``, ``tool_call_id``,
        ``reasoning_content`` and (assistant) ``tool_calls``; other keys are ignored.
        ``template``: Jinja source (or "chatml") used instead of the model's own.
        ``chat_template_kwargs``: extra template variables (JSON data).  ``enable_thinking``:
        None follows the template (on where it supports thinking), False turns it off.
        ``prefill_assistant``: as in llama-server, a trailing assistant message is continued
        (left open, no generation prompt) instead of closed.

        TypeError / ValueError name the message at fault; ValueError also for a template that
        does not parse or fails to render (e.g. its raise_exception()).  The GIL is released
        while the template renders.
        """
        return _render_chat(self, messages, add_generation_prompt, template, chat_template_kwargs,
                            enable_thinking, prefill_assistant, False)

    def render_chat_params(self, messages, *, bint add_generation_prompt=True, template=None,
                           chat_template_kwargs=None, enable_thinking=None,
                           bint prefill_assistant=True, tools=None, tool_choice=None,
                           parallel_tool_calls=None):
        """``render_chat`` plus what the template implies for generation, as a dict: ``prompt``,
        ``additional_stops`` (stop strings to add), ``grammar`` (GBNF or None) and
        ``grammar_lazy``, ``preserved_tokens``, ``generation_prompt`` (the text the generation
        prompt added), ``format`` (llama.cpp's output-parser name), ``supports_thinking``,
        ``thinking_start_tag`` and ``thinking_end_tags``; and for sampling and parsing as
        llama-server does them: ``trigger_patterns`` / ``trigger_tokens`` (what wakes a lazy
        grammar), ``preserved_ids`` (tokens shown in the text), ``prefill_tokens``,
        ``format_id`` and ``parser``.

        ``tools``: OpenAI function tools (``[{"type": "function", "function": {"name", "description",
        "parameters"}}]``), rendered into the prompt by the template, with the grammar the model's
        tool-call format implies; ``tool_choice``: "auto" (default), "none", "required" or
        ``{"type": "function", "function": {"name": ...}}``; ``parallel_tool_calls``: None (what
        the template supports), True or False.  llamagen.tools builds on this."""
        return _render_chat(self, messages, add_generation_prompt, template, chat_template_kwargs,
                            enable_thinking, prefill_assistant, True, tools, tool_choice,
                            parallel_tool_calls)

    def chat_template_source(self, template=None):
        """The Jinja source ``render_chat`` uses: the model's template, llama.cpp's ChatML when
        the model has none, or ``template`` after llama.cpp's small compatibility fixes."""
        return _chat_template_source(self, template)

    # -- vocabulary --------------------------------------------------------------------------

    @property
    def bos(self):
        """The beginning-of-sequence token id, or None when the model has none."""
        self._check()
        t = llama.llama_vocab_bos(self._vocab)
        return None if t == llama.LLAMA_TOKEN_NULL else t

    @property
    def eos(self):
        """The end-of-sequence token id, or None when the model has none."""
        self._check()
        t = llama.llama_vocab_eos(self._vocab)
        return None if t == llama.LLAMA_TOKEN_NULL else t

    @property
    def eot(self):
        self._check()
        t = llama.llama_vocab_eot(self._vocab)
        return None if t == llama.LLAMA_TOKEN_NULL else t

    @property
    def fim_tokens(self):
        """The fill-in-the-middle tokens llama.cpp found for this model (from its metadata, or
        by name in the vocabulary): {"pre", "suf", "mid", "rep", "sep"} -> id or None."""
        self._check()
        ids = {"pre": llama.llama_vocab_fim_pre(self._vocab), "suf": llama.llama_vocab_fim_suf(self._vocab),
               "mid": llama.llama_vocab_fim_mid(self._vocab), "rep": llama.llama_vocab_fim_rep(self._vocab),
               "sep": llama.llama_vocab_fim_sep(self._vocab)}
        return {k: (None if v == llama.LLAMA_TOKEN_NULL else v) for k, v in ids.items()}

    @property
    def add_bos(self):
        self._check()
        return bool(llama.llama_vocab_get_add_bos(self._vocab))

    def is_eog(self, token):
        """True when ``token`` ends generation (EOS, EOT, ...)."""
        self._check()
        return bool(llama.llama_vocab_is_eog(self._vocab, as_token(token, self.n_vocab)))

    def is_control(self, token):
        self._check()
        return bool(llama.llama_vocab_is_control(self._vocab, as_token(token, self.n_vocab)))

    def token_text(self, token):
        """The vocabulary entry of ``token`` as stored in the model (not detokenized)."""
        self._check()
        return llama.llama_vocab_get_text(self._vocab, as_token(token, self.n_vocab)).decode(
            "utf-8", "replace")

    def tokenize(self, text, *, bint add_special=True, bint parse_special=False):
        """Text (str or UTF-8 bytes) -> list of token ids."""
        self._pin()
        try:
            return _tokenize(self._vocab, text, add_special, parse_special)
        finally:
            self._release_user()

    def detokenize(self, tokens, *, bint remove_special=False, bint unparse_special=False):
        """Token ids -> str (bytes that do not form valid UTF-8 become U+FFFD)."""
        cdef vector[llama.llama_token] toks
        cdef vector[char] buf
        cdef int32_t n, n_tok
        self._check()
        _fill_tokens(toks, tokens, self.n_vocab)
        if toks.size() == 0:
            return ""
        if toks.size() > <size_t>INT32_MAX:
            raise ValueError("too many tokens")
        n_tok = <int32_t>toks.size()
        buf.resize(n_tok * 8 + 16)
        self._pin()
        try:
            with nogil:
                n = llama.llama_detokenize(self._vocab, toks.data(), n_tok, buf.data(),
                                           <int32_t>buf.size(), remove_special, unparse_special)
                if n < 0 and n != INT32_MIN:
                    buf.resize(-n)
                    n = llama.llama_detokenize(self._vocab, toks.data(), n_tok, buf.data(),
                                               <int32_t>buf.size(), remove_special, unparse_special)
        finally:
            self._release_user()
        if n < 0:
            raise LlamaError("detokenize failed: output too large")
        return buf.data()[:n].decode("utf-8", "replace")

    def token_to_piece(self, token, *, bint special=False):
        """The bytes one token renders to (may be part of a multi-byte UTF-8 character)."""
        cdef char buf[256]
        cdef int32_t n
        cdef vector[char] big
        cdef llama.llama_token tok
        self._check()
        tok = as_token(token, self.n_vocab)
        n = llama.llama_token_to_piece(self._vocab, tok, buf, sizeof(buf), 0, special)
        if n >= 0:
            return buf[:n]
        big.resize(-n)
        n = llama.llama_token_to_piece(self._vocab, tok, big.data(), <int32_t>big.size(), 0, special)
        return big.data()[:max(n, 0)]


cdef int _fill_tokens(vector[llama.llama_token] & out, tokens, int32_t n_vocab) except -1:
    """Copy a Python sequence of token ids into ``out``, checking each id."""
    if isinstance(tokens, (str, dict, set, frozenset)) or not hasattr(tokens, "__len__"):
        raise TypeError(f"expected a sequence of token ids, got {type(tokens).__name__}")
    out.reserve(len(tokens))
    for x in tokens:
        out.push_back(as_token(x, n_vocab))
    return 0


cdef list _tokenize(const llama.llama_vocab * vocab, text, bint add_special, bint parse_special):
    cdef bytes b
    cdef const char * p
    cdef int32_t n, n_max
    cdef Py_ssize_t length
    cdef vector[llama.llama_token] out
    if isinstance(text, str):
        b = (<str>text).encode("utf-8")
    elif isinstance(text, (bytes, bytearray, memoryview)):
        b = bytes(text)
    else:
        raise TypeError(f"text must be str or bytes, not {type(text).__name__}")
    length = len(b)
    if length > INT32_MAX - 16:
        raise ValueError("text is too long to tokenize (over 2 GiB)")
    p = PyBytes_AS_STRING(b)
    n_max = <int32_t>length + 8
    out.resize(n_max)
    with nogil:
        n = llama.llama_tokenize(vocab, p, <int32_t>length, out.data(), n_max, add_special, parse_special)
        if n < 0 and n != INT32_MIN:
            out.resize(-n)
            n = llama.llama_tokenize(vocab, p, <int32_t>length, out.data(), -n, add_special, parse_special)
    if n < 0:
        raise LlamaError("tokenize failed: too many tokens")
    out.resize(n)
    return out
