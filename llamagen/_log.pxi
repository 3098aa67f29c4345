# llama.cpp / ggml log lines -> logging.getLogger("llamagen").  Included by _core.pyx.
#
# llama.cpp emits a line in pieces (GGML_LOG_LEVEL_CONT continues the previous one); pieces are
# joined until a newline.  Debug lines are dropped in C unless the logger wants them, so the hot
# path never takes the GIL for a message nobody reads.  The last error lines are kept so that a
# failure (model load, grammar parse) can say llama.cpp's reason in the exception.

logger = _logging.getLogger("llamagen")
if not logger.handlers:
    logger.addHandler(_logging.NullHandler())

cdef int _log_want_debug = 0
cdef int _log_want_info = 0
# Level of the last line llama.cpp started (delivered or not): a CONT piece belongs to that line,
# so it is dropped with it and never inherits the level of an older line (llama.cpp's progress
# dots used to come out as WARNING after any warning, and landed in the error reasons).
cdef int _log_line_level = ggml.GGML_LOG_LEVEL_INFO

_LEVELS = {
    ggml.GGML_LOG_LEVEL_DEBUG: _logging.DEBUG,
    ggml.GGML_LOG_LEVEL_INFO: _logging.INFO,
    ggml.GGML_LOG_LEVEL_WARN: _logging.WARNING,
    ggml.GGML_LOG_LEVEL_ERROR: _logging.ERROR,
    ggml.GGML_LOG_LEVEL_NONE: _logging.INFO,
}
_log_pending = []          # pieces of the current line
_log_pending_level = [_logging.INFO]
_recent_errors = []        # last few warning/error lines, newest last


cdef _refresh_log_levels():
    """Read the logger's effective level into the C flags (called at load/context/begin)."""
    global _log_want_debug, _log_want_info
    _log_want_debug = logger.isEnabledFor(_logging.DEBUG)
    _log_want_info = logger.isEnabledFor(_logging.INFO)


cdef void _log_callback(ggml.ggml_log_level level, const char * text, void * ud) noexcept nogil:
    global _log_line_level
    cdef int line_level
    if level == ggml.GGML_LOG_LEVEL_CONT:
        line_level = _log_line_level
    else:
        line_level = level
        _log_line_level = level
    if line_level == ggml.GGML_LOG_LEVEL_DEBUG and not _log_want_debug:
        return
    if (line_level == ggml.GGML_LOG_LEVEL_INFO or line_level == ggml.GGML_LOG_LEVEL_NONE) \
            and not _log_want_info:
        return
    if text == NULL:
        return
    with gil:
        try:
            _log_emit(<int>level, text[:strlen(text)].decode("utf-8", "replace"))
        except BaseException:
            pass


def _log_emit(int level, str piece):
    if level != ggml.GGML_LOG_LEVEL_CONT:
        if _log_pending:
            _log_flush()
        _log_pending_level[0] = _LEVELS.get(level, _logging.INFO)
    _log_pending.append(piece)
    if piece.endswith("\n"):
        _log_flush()


def _log_flush():
    msg = "".join(_log_pending).rstrip("\n")
    _log_pending.clear()
    lvl = _log_pending_level[0]
    if lvl >= _logging.WARNING:
        _recent_errors.append(msg.strip())
        if len(_recent_errors) > 8:
            del _recent_errors[0]
    if msg:
        logger.log(lvl, "%s", msg)


cdef _take_errors():
    """The warning/error lines llama.cpp logged since the last call (joined), and forget them."""
    if _log_pending:
        _log_flush()
    msg = "; ".join(m for m in _recent_errors if m)
    _recent_errors.clear()
    return msg
