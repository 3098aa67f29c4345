"""Exceptions raised by llamagen."""


def _with_reason(msg, reason):
    return f"{msg}: {reason}" if reason else msg


class LlamaError(Exception):
    """Base class of every error llamagen raises about llama.cpp or its use."""


class InvalidParamError(LlamaError, ValueError):
    """A request's parameter is invalid.  ``field`` names it as llamagen spells it (a
    SamplingParams field, "prompt", "n", "input", ...); ``index``: which item of a list (a prompt,
    an input text) when there are several.  Callers map it without reading the message."""

    def __init__(self, message, field=None, index=None):
        self.field = field
        self.index = index
        super().__init__(message)


class InvalidParamTypeError(InvalidParamError, TypeError):
    """InvalidParamError for a value of the wrong type (a TypeError too)."""


class UnknownSequenceError(InvalidParamError, KeyError):
    """A BatchGenerator sequence id that is not (or no longer) in the batch (a KeyError too)."""

    __str__ = Exception.__str__         # (KeyError's would quote the message)


def invalid(kind, field, message, index=None):
    """The InvalidParamError (``kind`` ValueError) or InvalidParamTypeError (TypeError) to raise."""
    cls = InvalidParamTypeError if issubclass(kind, TypeError) else InvalidParamError
    return cls(message, field=field, index=index)


class ModelLoadError(LlamaError, ValueError):
    """A model file could not be loaded (not GGUF, truncated, unsupported architecture, ...)."""

    def __init__(self, path, reason=""):
        self.path = path
        self.reason = reason
        super().__init__(_with_reason(f"could not load model {path!r}", reason))


class AdapterLoadError(LlamaError, ValueError):
    """A LoRA adapter or control vector file could not be loaded (not GGUF, another
    architecture, shapes that do not fit the model, truncated, ...)."""

    def __init__(self, path, reason=""):
        self.path = path
        self.reason = reason
        super().__init__(_with_reason(f"could not load adapter {path!r}", reason))


class ContextError(LlamaError):
    """A context could not be created, or was used in a way llama.cpp rejects."""


class DecodeError(LlamaError):
    """llama_decode failed; ``code`` is llama.cpp's return code."""

    def __init__(self, code, message):
        self.code = code
        super().__init__(f"{message} (llama_decode returned {code})")


class KVCacheFullError(DecodeError):
    """No room left in the KV cache for the batch (llama_decode returned 1)."""


class StaleStateError(LlamaError):
    """A GenerationState was used after a newer generation started on its context, or after close."""


class GrammarError(LlamaError, ValueError):
    """A GBNF grammar did not parse, or (during generation) allows no token at all."""


class QuantizeError(LlamaError):
    """llama_model_quantize refused or failed; ``reason`` is llama.cpp's message."""

    def __init__(self, path, ftype, reason=""):
        self.path = path
        self.ftype = ftype
        self.reason = reason
        super().__init__(_with_reason(f"could not quantize {path!r} to {ftype}", reason))


class PromptTooLongError(LlamaError, ValueError):
    """A prompt leaves no room in the context for a new token; ``n_prompt`` and ``n_ctx`` say why."""

    def __init__(self, n_prompt, n_ctx, message=None):
        self.n_prompt = n_prompt
        self.n_ctx = n_ctx
        super().__init__(message or f"the prompt has {n_prompt} tokens but the context holds "
                         f"{n_ctx}: it must leave room for at least one new token")


class QueueFullError(LlamaError):
    """The engine already has its limit of requests waiting for a slot (AsyncEngine max_queue)."""


class EngineClosedError(LlamaError):
    """The engine was closed: it takes no more requests."""


class GenerationError(LlamaError):
    """A request's generation failed after it was accepted (a stream raises it in place of the
    choice's chunks); ``index``: the choice, ``reason``: the engine's finish reason."""

    def __init__(self, message, index=None, reason="error"):
        self.index = index
        self.reason = reason
        super().__init__(message)


class RequestCancelledError(GenerationError):
    """The engine cancelled a request it had accepted (not the caller: closing a stream ends it
    quietly)."""
