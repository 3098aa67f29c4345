"""What both APIs translate the same way: sampling fields, engine errors, the chat prompt (template,
tools, tokens) and the logprobs a choice shows.  The wire shapes of each API are in
openai_format.py and anthropic_format.py.  No generation logic lives here or anywhere in the HTTP
layer."""
from __future__ import annotations

from typing import Optional, Sequence

from llamagen.errors import (
    EngineClosedError, GrammarError, LlamaError, PromptTooLongError, QueueFullError,
    RequestCancelledError,
)
from llamagen.sampling import FIELDS as ENGINE_FIELDS

from llamagen.server.errors import APIError, InvalidRequest, Overloaded
from llamagen.server.models import LlamagenSampling, ResponseFormat

# wire name -> SamplingParams field, where they differ
_RENAMED = {
    "temperature": "temp",
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "max_output_tokens": "max_new_tokens",
    "n_predict": "max_new_tokens",
    "repetition_penalty": "repeat_penalty",
    "stop_sequences": "stop",
    "reasoning_budget_tokens": "reasoning_budget",      # llama-server's name
}
_ENGINE_FIELDS = frozenset(ENGINE_FIELDS)
# llama-server's per-request speculative fields -> llamagen.Speculative's
_SPEC_DOTTED = {
    "speculative_type": "type", "speculative_n_max": "n_max", "speculative_n_min": "n_min",
    "speculative_ngram_size_n": "ngram_n", "speculative_ngram_size_m": "ngram_m",
    "speculative_ngram_min_hits": "min_hits",
}


def sampling_kwargs(req: LlamagenSampling, **defaults) -> tuple[dict, dict]:
    """(SamplingParams overrides, {engine field: wire name}) from the fields the client sent.

    ``defaults`` apply where the client sent nothing (or null).  The second dict lets an engine
    error that names ``temp`` be reported as ``temperature``, the field the client knows."""
    out = dict(defaults)
    origin = {}
    spec = {}
    for name in req.model_fields_set:
        value = getattr(req, name)
        if value is None:
            continue
        if name in _SPEC_DOTTED:
            spec[_SPEC_DOTTED[name]] = value
            continue
        field = _RENAMED.get(name, name)
        if field == "reasoning_budget_message":
            out[field] = value              # (chat: ChatPrompt.budgeted tokenizes it)
            continue
        if field not in _ENGINE_FIELDS:
            continue
        if field == "logit_bias":
            value = _logit_bias(value)
        elif field == "seed":
            value = fold_seed(value)
        elif field == "stop" and isinstance(value, list):
            value = tuple(value)
        elif field == "reasoning_budget" and value == -1:
            continue            # (llama-server's "no budget")
        elif field == "lora":
            if not value:
                continue        # ([]: the server's default set, as in llama-server)
            value = {e.id: e.scale for e in value}      # (ids: the engine's adapter list)
        out[field] = value
        origin[field] = name
    if spec:
        # llama-server's "speculative.n_max" etc. beside (and over) a "speculative" object
        base = out.get("speculative")
        if isinstance(base, str):
            base = {"type": base}
        out["speculative"] = {**(base if isinstance(base, dict) else {}), **spec}
    return out, origin


# SamplingParams takes seeds 0 .. 2**32 - 2; clients send any integer (OpenAI's is a 64-bit int)
SEED_RANGE = 0xFFFFFFFF


def fold_seed(seed: int):
    """A client's seed as SamplingParams takes it: -1 is random (llama-server's convention, None
    here); any other integer is folded into the sampler's range, the same seed always the same."""
    return None if seed == -1 else seed % SEED_RANGE


def response_format(rf: Optional[ResponseFormat], kwargs: dict, origin: dict) -> None:
    """OpenAI's response_format as SamplingParams fields (a JSON schema or any JSON object: a
    grammar made by llama.cpp's converter); errors about them name ``response_format``."""
    if rf is None or rf.type == "text":
        return
    if "grammar" in kwargs:
        raise InvalidRequest("response_format and grammar are exclusive (a schema is turned into "
                             "a grammar)", param="response_format")
    if rf.type == "json_object":
        kwargs["json_object"] = True
        origin["json_object"] = "response_format"
    elif rf.type == "json_schema":
        if rf.json_schema is None:
            raise InvalidRequest("response_format.json_schema is required when type is "
                                 "'json_schema'", param="response_format.json_schema")
        if rf.json_schema.schema_ is None:        # no schema: any JSON object
            kwargs["json_object"] = True
            origin["json_object"] = "response_format"
        else:
            kwargs["json_schema"] = rf.json_schema.schema_
            origin["json_schema"] = "response_format.json_schema.schema"
    else:
        raise InvalidRequest(f"response_format.type must be 'text', 'json_object' or "
                             f"'json_schema', got {rf.type!r}", param="response_format.type")


def _logit_bias(bias: dict) -> dict:
    out = {}
    for key, b in bias.items():
        try:
            tok = int(key)
        except ValueError:
            raise InvalidRequest(f"logit_bias keys must be token ids (integers as strings), got {key!r}",
                                 param="logit_bias") from None
        out[tok] = b
    return out


def param_error(exc: Exception, origin: dict, default_param: Optional[str] = None) -> InvalidRequest:
    """A 400 from an engine ValueError / TypeError.  An InvalidParamError names its field, which
    is reported by the client's name for it (``temp`` -> ``temperature``); a grammar error is
    about the client's grammar or the one made of its schema."""
    msg = str(exc) or type(exc).__name__
    field = getattr(exc, "field", None)
    if isinstance(exc, GrammarError):
        param = origin.get("grammar") or origin.get("json_schema") or "grammar"
    elif field is not None:
        param = origin.get(field, field)
        if param != field and msg.startswith(field):
            msg = param + msg[len(field):]
    else:
        param = default_param
    return InvalidRequest(msg, param=param)


def engine_error(exc: BaseException, origin: dict, prompt_param: str) -> APIError:
    """The APIError for an exception from ``engine.stream`` (raised there, synchronously)."""
    if isinstance(exc, PromptTooLongError):
        n_prompt, n_ctx = getattr(exc, "n_prompt", None), getattr(exc, "n_ctx", None)
        return InvalidRequest(
            f"the prompt is {n_prompt} tokens long but the context holds {n_ctx} tokens "
            f"(prompt and generated tokens together); shorten the prompt",
            param=prompt_param, code="context_length_exceeded")
    if isinstance(exc, QueueFullError):
        return Overloaded(f"the server is busy: {exc}", code="queue_full")
    if isinstance(exc, EngineClosedError):
        return Overloaded("the server is shutting down", code="shutting_down")
    if isinstance(exc, (ValueError, TypeError, OverflowError)):
        return param_error(exc, {**origin, "prompt": prompt_param}, prompt_param)
    if isinstance(exc, LlamaError):
        return APIError(f"{type(exc).__name__}: {exc}")
    raise exc


def generation_error(exc: BaseException) -> APIError:
    """The APIError for an exception raised while generating (after engine.stream accepted)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, GrammarError):
        return InvalidRequest(f"grammar: {exc}", param="grammar")
    if isinstance(exc, (EngineClosedError, RequestCancelledError)):
        return Overloaded("the request was cancelled: the server is shutting down",
                          code="shutting_down")
    if isinstance(exc, QueueFullError):         # (a later prompt of a long request)
        return Overloaded(f"the server is busy: {exc}", code="queue_full")
    return APIError(f"generation failed: {type(exc).__name__}: {exc}")


# -- chat messages -------------------------------------------------------------------------------

def text_parts(parts: Sequence, where: str) -> str:
    texts = []
    for i, part in enumerate(parts):
        if part.type != "text" or part.text is None:
            raise InvalidRequest(
                f"{where}[{i}]: only text content is supported (type 'text' with a 'text' "
                f"string), got type {part.type!r}", param=f"{where}[{i}].type")
        texts.append(part.text)
    # llama-server's way of flattening typed text parts for a string-content template
    return "\n".join(texts)


# -- the chat prompt ------------------------------------------------------------------------------

def thinking_kwargs(chat_template_kwargs=None, reasoning_format=None, reasoning_effort=None,
                    enable_thinking=None) -> dict:
    """A request's reasoning fields as llamagen.chat.prepare's keywords: llama-server's
    ``chat_template_kwargs`` (``enable_thinking`` among them) and ``reasoning_format``, OpenAI's
    ``reasoning_effort`` (passed to the template as ``reasoning_effort``; "none" turns thinking
    off), Anthropic's ``thinking`` (as ``enable_thinking``)."""
    out: dict = {}
    kwargs = dict(chat_template_kwargs or {})
    if reasoning_effort is not None:
        if not isinstance(reasoning_effort, str):
            raise InvalidRequest("reasoning_effort must be a string", param="reasoning_effort")
        if reasoning_effort == "none":
            enable_thinking = False
        else:
            kwargs.setdefault("reasoning_effort", reasoning_effort)
    if kwargs:
        out["chat_template_kwargs"] = kwargs
    if enable_thinking is not None:
        out["enable_thinking"] = enable_thinking
    if reasoning_format is not None:
        out["reasoning_format"] = reasoning_format
    return out


def chat_prompt(engine, messages: list[dict], tools=None, tool_choice=None,
                parallel_tool_calls=None, **thinking):
    """The llamagen.chat.ChatPrompt of a chat request, from the library's one chat path
    (engine.prepare_chat: template, tools, tokens); a bad tool, choice or message is a 400 naming
    the field at fault.  The engine takes it as the prompt and merges its sampling.
    ``thinking``: thinking_kwargs()."""
    try:
        return engine.prepare_chat(messages, tools=tools, tool_choice=tool_choice,
                                   parallel_tool_calls=parallel_tool_calls, **thinking)
    except (ValueError, TypeError) as e:
        text = str(e)
        param = getattr(e, "field", None) or next(
            (p for p in ("tool_choice", "tools", "messages", "chat_template_kwargs")
             if text.startswith(p)), "messages")
        if param == "messages" and not text.startswith("messages"):
            text = f"messages: the chat template failed: {text}"
        raise InvalidRequest(text, param=param) from None


def tool_origin(chat, origin: dict) -> None:
    """Errors about the sampling fields a tool-call template sets are about ``tools``."""
    for k in chat.sampling:
        origin.setdefault(k, "tools")
