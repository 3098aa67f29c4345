# LoRA adapters and control vectors, on llama.h's adapter API (control vector files read by
# common's loader, csrc/lg_adapters.cpp).  Included by _core.pyx.
#
# llama.cpp applies adapters per context, not per sequence: a Context keeps the set its cells are
# being computed with (_lora_applied) and switches only when a decode needs another set; a batch
# decodes each distinct set of its live sequences separately (see BatchGenerator._step).  An
# adapter set is a "lora key": a tuple of (LoraAdapter, scale) pairs, zero scales left out,
# sorted (SamplingParams.lora makes it).  () is the base model; None means "the context's
# default" (Context.set_adapters).

cimport cython

from llamagen.sampling import canonical_lora as _canonical_lora


@cython.no_gc_clear
cdef class LoraAdapter:
    """A LoRA adapter (a GGUF file, ``general.type = "adapter"``) loaded for one Model.

    ``LoraAdapter(model, path)``.  Use it for every request on a context with
    ``ctx.set_adapters({adapter: scale})``, or for one request with ``lora={adapter: scale}``
    (SamplingParams: generate, streams, BatchGenerator.add, map_generate, AsyncEngine).  Loading
    releases the GIL; a bad file is an AdapterLoadError.  ``close()`` refuses further uses; the
    memory goes with the last reference (sequences that still use it keep it) or with the model.
    """
    cdef llama.llama_adapter_lora * _ptr
    cdef readonly Model model
    cdef readonly object path
    cdef readonly dict metadata
    cdef readonly tuple alora_invocation_tokens   # aLoRA: tokens that switch it on (else ())
    cdef bint _closed
    cdef object __weakref__

    def __cinit__(self):
        self._ptr = NULL
        self._closed = False

    def __init__(self, Model model not None, path):
        cdef bytes bpath
        cdef const char * cpath
        cdef llama.llama_adapter_lora * p
        cdef uint64_t i, n
        cdef const llama.llama_token * toks
        if self._ptr != NULL:
            raise LlamaError("LoraAdapter is already initialised")
        model._check()
        if model.vocab_only:
            raise invalid(ValueError, "model", "a vocab_only model has no weights to adapt")
        path = _os.fspath(path)
        bpath = path if isinstance(path, bytes) else _os.fsencode(path)
        if not _os.path.exists(bpath):
            raise FileNotFoundError(2, "adapter file not found", path)
        if _os.path.isdir(bpath):
            raise AdapterLoadError(path, "is a directory, not a GGUF file")
        reason = _gguf_check_adapter(bpath, "lora")
        if reason is not None:
            raise AdapterLoadError(path, reason)
        _refresh_log_levels()
        _take_errors()
        cpath = bpath
        model._pin()                    # (loading releases the GIL: keep the model)
        try:
            with nogil:
                p = llama.llama_adapter_lora_init(model._model, cpath)
        finally:
            model._release_user()
        if p == NULL:
            raise AdapterLoadError(path, _take_errors() or "llama.cpp could not read it")
        self._ptr = p
        self.model = model
        self.path = path
        self.metadata = {}
        for i in range(<uint64_t> max(0, llama.llama_adapter_meta_count(p))):
            k = _adapter_meta(p, <int32_t> i, True)
            if k is not None:
                self.metadata[k] = _adapter_meta(p, <int32_t> i, False)
        n = llama.llama_adapter_get_alora_n_invocation_tokens(p)
        toks = llama.llama_adapter_get_alora_invocation_tokens(p)
        self.alora_invocation_tokens = tuple(toks[i] for i in range(n))

    def __dealloc__(self):
        # (a model already freed freed its adapters with it)
        if self._ptr != NULL and self.model is not None and self.model._model != NULL:
            llama.llama_adapter_lora_free(self._ptr)
        self._ptr = NULL

    cdef int _check_for(self, Model model) except -1:
        if self._ptr == NULL:
            raise LlamaError("this LoraAdapter was not loaded: LoraAdapter(model, path)")
        if self._closed:
            raise invalid(ValueError, "lora", f"the LoRA adapter {self.path!r} is closed")
        if self.model is not model:
            raise invalid(ValueError, "lora", f"the LoRA adapter {self.path!r} was loaded for "
                          "another model")
        if model._model == NULL:
            raise LlamaError("the model is closed")
        return 0

    def close(self):
        """Refuse further uses (idempotent).  The memory is freed when the last reference goes."""
        self._closed = True

    @property
    def closed(self):
        return self._closed

    @property
    def task_name(self):
        """``adapter.lora.task_name`` from the file ("" when absent), as llama-server shows it."""
        return self.metadata.get("adapter.lora.task_name", "")

    @property
    def prompt_prefix(self):
        return self.metadata.get("adapter.lora.prompt_prefix", "")

    @property
    def alpha(self):
        v = self.metadata.get("adapter.lora.alpha")
        return float(v) if v is not None else None

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self                     # (SamplingParams.to_dict copies its fields)

    def __reduce__(self):
        raise TypeError("a LoraAdapter belongs to one loaded Model and cannot be pickled: load "
                        "it again where the model is loaded")

    def __repr__(self):
        state = " closed" if self._closed else ""
        return f"<llamagen.LoraAdapter {self.path!r}{state}>"


cdef str _adapter_meta(const llama.llama_adapter_lora * p, int32_t i, bint key):
    cdef vector[char] buf
    cdef int32_t n
    buf.resize(256)
    for _ in range(2):
        if key:
            n = llama.llama_adapter_meta_key_by_index(p, i, buf.data(), buf.size())
        else:
            n = llama.llama_adapter_meta_val_str_by_index(p, i, buf.data(), buf.size())
        if n < 0:
            return None
        if <size_t> n < buf.size():
            return buf.data()[:n].decode("utf-8", "replace")
        buf.resize(n + 1)
    return None


cdef class ControlVector:
    """Control vectors: per-layer directions added to the hidden state (llama.cpp's
    ``--control-vector``).  ``ControlVector(sources)``: a GGUF path, or a list of paths and
    ``(path, strength)`` pairs, read by llama.cpp's loader and summed with their strengths; or
    ``ControlVector.from_array(rows)`` with one row of n_embd floats per layer from layer 1.
    Apply it with ``Context.set_control_vector(cvec, layer_start=, layer_end=)``."""
    cdef vector[float] _data
    cdef readonly int32_t n_embd
    cdef readonly tuple sources

    def __init__(self, sources):
        cdef list keep = []
        cdef vector[const char *] paths
        cdef vector[float] strengths
        cdef int32_t n_embd
        if isinstance(sources, (str, bytes, _os.PathLike)):
            sources = [sources]
        items = []
        for s in sources:
            if isinstance(s, tuple) and len(s) == 2:
                path, strength = s
            else:
                path, strength = s, 1.0
            path = _os.fspath(path)
            strength = _check_float("strength", strength)
            bpath = path if isinstance(path, bytes) else _os.fsencode(path)
            if not _os.path.exists(bpath):
                raise FileNotFoundError(2, "control vector file not found", path)
            if _os.path.isdir(bpath):
                raise AdapterLoadError(path, "is a directory, not a GGUF file")
            reason = _gguf_check_adapter(bpath, "control_vector")
            if reason is not None:
                raise AdapterLoadError(path, reason)
            items.append((path, strength))
            keep.append(bpath)
        if not items:
            raise invalid(ValueError, "sources", "no control vector files given")
        for i in range(len(keep)):
            paths.push_back(PyBytes_AS_STRING(keep[i]))
            strengths.push_back(items[i][1])
        with nogil:
            n_embd = lgadapt.cvec_load(paths.data(), strengths.data(), <int> paths.size(), self._data)
        if n_embd <= 0 or self._data.size() == 0:
            raise AdapterLoadError(items[0][0] if len(items) == 1 else [p for p, _ in items],
                                   "no valid direction.<layer> tensors (F32, 1-D, one size), "
                                   "or the files disagree on n_embd")
        self.n_embd = n_embd
        self.sources = tuple(items)

    @staticmethod
    def from_array(rows):
        """A ControlVector from a 2-D array-like: row i is layer i + 1's direction (n_embd
        floats)."""
        cdef ControlVector cv = ControlVector.__new__(ControlVector)
        rows = [[float(x) for x in r] for r in rows]
        if not rows or not rows[0]:
            raise invalid(ValueError, "rows", "a control vector needs at least one layer of n_embd floats")
        n = len(rows[0])
        if any(len(r) != n for r in rows):
            raise invalid(ValueError, "rows", "every layer's direction must have the same length")
        for r in rows:
            for x in r:
                cv._data.push_back(_check_float("rows", x))
        cv.n_embd = n
        cv.sources = ()
        return cv

    @property
    def n_layers(self):
        return self._data.size() // max(1, self.n_embd)

    def __repr__(self):
        return f"<llamagen.ControlVector n_embd={self.n_embd} n_layers={self.n_layers}>"


cdef float _check_float(str field, value) except? -1:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise invalid(TypeError, field, f"{field} must be a number, got {type(value).__name__}")
    if v != v or v in (float("inf"), float("-inf")) or abs(v) > 3.0e38:
        raise invalid(ValueError, field, f"{field} must be a finite float32, got {value!r}")
    return <float> v

