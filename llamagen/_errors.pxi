# The one place where llama.cpp return codes become Python exceptions.  Included by _core.pyx.

from cpython.number cimport PyNumber_Index

cdef int check_decode(int32_t rc, const char * what) except -1:
    """Map a llama_decode return code to an exception (0 is success)."""
    if rc == 0:
        return 0
    where = what.decode()
    if rc == 1:
        raise KVCacheFullError(rc, f"{where}: no room in the KV cache for the batch")
    if rc == 2:
        # aborted by our abort callback: a pending signal (Ctrl-C) explains why
        raise KeyboardInterrupt(f"{where}: interrupted")
    if rc == -1:
        raise DecodeError(rc, f"{where}: invalid batch ({_take_errors() or 'rejected by llama.cpp'})")
    raise DecodeError(rc, f"{where}: llama.cpp failed ({_take_errors() or 'allocation or compute error'})")


def _item_error(e, Py_ssize_t idx):
    """``e``, about text ``idx`` of a list (embed, score): the same kind of error with "text
    idx: " before its message and ``index`` set.  A built-in error (UnicodeEncodeError from a
    lone surrogate, say) becomes an InvalidParamError: its own constructor takes other arguments."""
    msg = f"text {idx}: {e}"
    if isinstance(e, LlamaError):
        new = type(e).__new__(type(e))
        new.__dict__.update(e.__dict__)
        new.args = (msg,)
    else:
        new = invalid(TypeError if isinstance(e, TypeError) else ValueError,
                      getattr(e, "field", None), msg)
    new.index = idx
    return new


cdef inline int check_token(llama.llama_token tok, int32_t n_vocab) except -1:
    if tok < 0 or tok >= n_vocab:
        raise ValueError(f"token id {tok} is outside the vocabulary [0, {n_vocab})")
    return 0


cdef llama.llama_token as_token(object value, int32_t n_vocab) except? -1:
    """A Python token id -> llama_token.  TypeError unless it is an integer (a float is not
    truncated), ValueError outside ``[0, n_vocab)`` however large (never OverflowError)."""
    if value is True or value is False:
        raise TypeError("a token id must be an int, not bool")
    try:
        v = PyNumber_Index(value)
    except TypeError:
        raise TypeError(f"a token id must be an int, not {type(value).__name__}") from None
    if v < 0 or v >= n_vocab:
        raise ValueError(f"token id {v} is outside the vocabulary [0, {n_vocab})")
    return <llama.llama_token>v
