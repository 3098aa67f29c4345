# quantize(): re-encode a GGUF model's weights (llama_model_quantize).  Included by _core.pyx.

import collections as _collections
import stat as _stat
import struct as _struct
import time as _time
import uuid as _uuid

# The names llama-quantize accepts (tools/quantize/quantize.cpp), upper case.  "COPY" copies the
# tensors unchanged (only_copy); Q3_K, Q4_K and Q5_K are llama-quantize's aliases of the _M mixes.
QUANT_TYPES = {
    "F32": llama.LLAMA_FTYPE_ALL_F32,
    "F16": llama.LLAMA_FTYPE_MOSTLY_F16,
    "BF16": llama.LLAMA_FTYPE_MOSTLY_BF16,
    "Q8_0": llama.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q6_K": llama.LLAMA_FTYPE_MOSTLY_Q6_K,
    "Q5_K_M": llama.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q5_K_S": llama.LLAMA_FTYPE_MOSTLY_Q5_K_S,
    "Q5_K": llama.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q5_1": llama.LLAMA_FTYPE_MOSTLY_Q5_1,
    "Q5_0": llama.LLAMA_FTYPE_MOSTLY_Q5_0,
    "Q4_K_M": llama.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q4_K_S": llama.LLAMA_FTYPE_MOSTLY_Q4_K_S,
    "Q4_K": llama.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q4_1": llama.LLAMA_FTYPE_MOSTLY_Q4_1,
    "Q4_0": llama.LLAMA_FTYPE_MOSTLY_Q4_0,
    "IQ4_NL": llama.LLAMA_FTYPE_MOSTLY_IQ4_NL,
    "IQ4_XS": llama.LLAMA_FTYPE_MOSTLY_IQ4_XS,
    "Q3_K_L": llama.LLAMA_FTYPE_MOSTLY_Q3_K_L,
    "Q3_K_M": llama.LLAMA_FTYPE_MOSTLY_Q3_K_M,
    "Q3_K_S": llama.LLAMA_FTYPE_MOSTLY_Q3_K_S,
    "Q3_K": llama.LLAMA_FTYPE_MOSTLY_Q3_K_M,
    "IQ3_M": llama.LLAMA_FTYPE_MOSTLY_IQ3_M,
    "IQ3_S": llama.LLAMA_FTYPE_MOSTLY_IQ3_S,
    "IQ3_XS": llama.LLAMA_FTYPE_MOSTLY_IQ3_XS,
    "IQ3_XXS": llama.LLAMA_FTYPE_MOSTLY_IQ3_XXS,
    "Q2_K": llama.LLAMA_FTYPE_MOSTLY_Q2_K,
    "Q2_K_S": llama.LLAMA_FTYPE_MOSTLY_Q2_K_S,
    "IQ2_M": llama.LLAMA_FTYPE_MOSTLY_IQ2_M,
    "IQ2_S": llama.LLAMA_FTYPE_MOSTLY_IQ2_S,
    "IQ2_XS": llama.LLAMA_FTYPE_MOSTLY_IQ2_XS,
    "IQ2_XXS": llama.LLAMA_FTYPE_MOSTLY_IQ2_XXS,
    "IQ1_M": llama.LLAMA_FTYPE_MOSTLY_IQ1_M,
    "IQ1_S": llama.LLAMA_FTYPE_MOSTLY_IQ1_S,
    "TQ2_0": llama.LLAMA_FTYPE_MOSTLY_TQ2_0,
    "TQ1_0": llama.LLAMA_FTYPE_MOSTLY_TQ1_0,
    "Q2_0": llama.LLAMA_FTYPE_MOSTLY_Q2_0,
    "Q1_0": llama.LLAMA_FTYPE_MOSTLY_Q1_0,
    "MXFP4_MOE": llama.LLAMA_FTYPE_MOSTLY_MXFP4_MOE,
    "COPY": llama.LLAMA_FTYPE_ALL_F32,
}
# ftype number -> canonical name (the first name listed for it; aliases and COPY excluded)
_FTYPE_NAMES = {}
for _name, _value in QUANT_TYPES.items():
    if _name not in ("COPY", "Q3_K", "Q4_K", "Q5_K"):
        _FTYPE_NAMES.setdefault(int(_value), _name)
del _name, _value

QuantizeResult = _collections.namedtuple(
    "QuantizeResult", ["path", "ftype", "src_size", "dst_size", "seconds"])
QuantizeResult.__doc__ = ("What quantize() wrote: the output path, the type name (e.g. 'Q4_K_M'), "
                          "input and output sizes in bytes, and the seconds it took.")


def _quant_type(ftype):
    """(llama_ftype value, canonical name, only_copy) for a type name or number."""
    if isinstance(ftype, str):
        key = ftype.strip().upper()
        if key not in QUANT_TYPES:
            raise ValueError(f"unknown quantization type {ftype!r}; valid names: "
                             f"{', '.join(QUANT_TYPES)}")
        value = int(QUANT_TYPES[key])
        if key == "COPY":
            return value, "COPY", True
        return value, _FTYPE_NAMES[value], False
    if isinstance(ftype, bool):
        raise TypeError("ftype must be a type name (str) or a llama_ftype number (int), not bool")
    try:
        value = PyNumber_Index(ftype)
    except TypeError:
        raise TypeError(f"ftype must be a type name (str) or a llama_ftype number (int), "
                        f"not {type(ftype).__name__}") from None
    if value not in _FTYPE_NAMES:
        raise ValueError(f"unknown llama_ftype number {value}; valid: " + ", ".join(
            f"{v} ({n})" for v, n in sorted(_FTYPE_NAMES.items())))
    return int(value), _FTYPE_NAMES[value], False


# llama.cpp's reasons that mean the input is not a loadable model (rather than a refused type)
_LOAD_FAILURES = ("gguf_init", "llama_model_loader", "model architecture", "corrupted",
                  "file bounds", "failed to read", "key not found", "has invalid data")


def _quantize_reason(logged):
    """llama.cpp's reason for a failed quantization, from the warning/error lines it logged:
    the per-tensor fallback warnings are dropped, the error itself is kept."""
    parts = [p for p in logged.split("; ") if p and "falling back" not in p
             and not p.startswith("warning:") and "not divisible by" not in p]
    reason = "; ".join(p.replace("llama_model_quantize: failed to quantize: ", "") for p in parts)
    return reason or "llama_model_quantize failed"


def _gguf_magic(path):
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _gguf_n_tensors(path):
    """The tensor count in a GGUF header (magic, version, n_tensors, ...)."""
    with open(path, "rb") as f:
        head = f.read(16)
    return _struct.unpack_from("<Q", head, 8)[0] if len(head) == 16 else 0


def quantize(src, dst, ftype="Q4_K_M", *, n_threads=None, allow_requantize=False,
             quantize_output_tensor=True, pure=False):
    """Quantize the GGUF model ``src`` into a new file ``dst`` (llama.cpp's llama-quantize).

    ``ftype`` is a llama-quantize type name, case-insensitive ("Q4_K_M", "Q8_0", "F16",
    "BF16", "Q6_K", "COPY", ...: see ``llamagen.QUANT_TYPES``) or a llama_ftype number.
    ``n_threads=None`` uses the physical cores.  ``allow_requantize`` lets already quantized
    tensors be re-quantized (quality suffers); ``quantize_output_tensor=False`` keeps
    output.weight as it is; ``pure`` puts every tensor in the one type instead of the mix that
    the _S/_M/_L types choose per tensor.  Runs without the GIL.

    The output is written to a temporary file beside ``dst`` and renamed into place when
    complete, so a failed run leaves no partial ``dst``.  Returns a ``QuantizeResult``.
    Raises ``FileNotFoundError`` (missing ``src`` or output folder), ``ValueError`` (bad
    arguments, ``src`` and ``dst`` the same file), ``ModelLoadError`` (``src`` is not a GGUF
    model) and ``QuantizeError`` (llama.cpp refused, with its reason).
    """
    cdef llama.llama_model_quantize_params params = llama.llama_model_quantize_default_params()
    cdef bytes bsrc, btmp
    cdef const char * csrc
    cdef const char * ctmp
    cdef uint32_t rc
    value, name, only_copy = _quant_type(ftype)
    if n_threads is None:
        n_threads = _physical_cores()
    if isinstance(n_threads, bool):
        raise TypeError("n_threads must be an int or None")
    n_threads = PyNumber_Index(n_threads)
    if n_threads < 1 or n_threads > 4096:
        raise ValueError(f"n_threads must be at least 1 (or None), got {n_threads}")

    src = _os.fsdecode(_os.fspath(src))
    dst = _os.fsdecode(_os.fspath(dst))
    for arg, path in (("src", src), ("dst", dst)):
        if "\0" in path:
            # llama.cpp takes C strings: it would write to the part before the NUL
            raise ValueError(f"{arg} path contains a NUL character: {path!r}")
    if not _os.path.exists(src):
        raise FileNotFoundError(2, "model file not found", src)
    if not _os.path.isfile(src):
        raise FileNotFoundError(2, "not a file (a model to quantize must be a GGUF file)", src)
    out_dir = _os.path.dirname(_os.path.abspath(dst))
    if not _os.path.isdir(out_dir):
        raise FileNotFoundError(2, "the output folder does not exist", out_dir)
    if _os.path.isdir(dst):
        raise ValueError(f"dst {dst!r} is a directory; give the output file's path")
    if _os.path.exists(dst) and not _stat.S_ISREG(_os.stat(dst).st_mode):
        # the output is renamed over dst: a device, FIFO or socket would be replaced by a file
        raise ValueError(f"dst {dst!r} exists and is not a regular file (a device, FIFO or "
                         "socket): give a new file's path")
    if _os.path.abspath(src) == _os.path.abspath(dst) or (
            _os.path.exists(dst) and _os.path.samefile(src, dst)):
        raise ValueError(f"src and dst are the same file ({src!r}): write to a new file")
    _refuse_unloadable(src, src)
    if not _gguf_magic(src):
        raise ModelLoadError(src, "not a GGUF file (no GGUF magic)")
    if _gguf_n_tensors(src) == 0:
        raise ModelLoadError(src, "the GGUF file holds no tensors: nothing to quantize")
    src_size = _os.path.getsize(src)

    params.ftype = <llama.llama_ftype> value
    params.nthread = n_threads
    params.allow_requantize = allow_requantize
    params.quantize_output_tensor = quantize_output_tensor
    params.only_copy = only_copy
    params.pure = pure

    # llama.cpp writes the output file itself; a failure can leave it half written
    tmp = f"{_os.path.abspath(dst)}.{_uuid.uuid4().hex[:12]}.partial"
    bsrc = _os.fsencode(src)
    btmp = _os.fsencode(tmp)
    csrc = bsrc
    ctmp = btmp
    _refresh_log_levels()
    _take_errors()
    t0 = _time.perf_counter()
    try:
        with nogil:
            rc = llama.llama_model_quantize(csrc, ctmp, &params)
        seconds = _time.perf_counter() - t0
        if rc != 0:
            reason = _quantize_reason(_take_errors())
            if any(k in reason for k in _LOAD_FAILURES):
                raise ModelLoadError(src, reason)
            raise QuantizeError(src, name, reason)
        _os.replace(tmp, dst)
    finally:
        if _os.path.exists(tmp):
            _os.unlink(tmp)
    return QuantizeResult(dst, name, src_size, _os.path.getsize(dst), seconds)
