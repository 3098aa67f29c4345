"""What both APIs translate the same way: sampling fields, engine errors, the chat prompt (template,
tools, tokens) and the logprobs a choice shows.  The wire shapes of each API are in
openai_format.py and anthropic_format.py.  No generation logic lives here or anywhere in the HTTP
layer."""
from __future__ import annotations

import re
from typing import Optional, Sequence

from llamagen.errors import GrammarError, LlamaError
from llamagen.sampling import FIELDS as ENGINE_FIELDS

from llamagen.server.errors import APIError, InvalidRequest, Overloaded
from llamagen.server.models import LlamagenSampling, ResponseFormat

# wire name -> SamplingParams field, where they differ
_RENAMED = {
    "temperature": "temp",
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "repetition_penalty": "repeat_penalty",
    "stop_sequences": "stop",
}
_ENGINE_FIELDS = frozenset(ENGINE_FIELDS)


def sampling_kwargs(req: LlamagenSampling, **defaults) -> tuple[dict, dict]:
    """(SamplingParams overrides, {engine field: wire name}) from the fields the client sent.

    ``defaults`` apply where the client sent nothing (or null).  The second dict lets an engine
    error that names ``temp`` be reported as ``temperature``, the field the client knows."""
    out = dict(defaults)
    origin = {}
    for name in req.model_fields_set:
        value = getattr(req, name)
        if value is None:
            continue
        field = _RENAMED.get(name, name)
        if field not in _ENGINE_FIELDS:
            continue
        if field == "logit_bias":
            value = _logit_bias(value)
        elif field == "stop" and isinstance(value, list):
            value = tuple(value)
        out[field] = value
        origin[field] = name
    return out, origin


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


_FIRST_WORD = re.compile(r"[A-Za-z_]+")


def param_error(exc: Exception, origin: dict, default_param: Optional[str] = None) -> InvalidRequest:
    """A 400 from an engine ValueError / TypeError; its message starts with the field it is about
    (SamplingParams' convention), which is renamed to the client's name for it."""
    msg = str(exc) or type(exc).__name__
    m = _FIRST_WORD.match(msg)
    word = m.group(0) if m else ""
    if word in origin:
        param = origin[word]
        if word != param:
            msg = param + msg[len(word):]
    elif word in _ENGINE_FIELDS:
        param = word
    elif isinstance(exc, GrammarError):
        # the grammar the client sent, or the one made of its schema (response_format)
        param = origin.get("grammar") or origin.get("json_schema") or "grammar"
    else:
        param = default_param
    return InvalidRequest(msg, param=param)


def engine_error(exc: BaseException, origin: dict, prompt_param: str) -> APIError:
    """The APIError for an exception from ``engine.stream`` (raised there, synchronously)."""
    import llamagen
    if isinstance(exc, getattr(llamagen, "PromptTooLongError", ())):
        n_prompt, n_ctx = getattr(exc, "n_prompt", None), getattr(exc, "n_ctx", None)
        return InvalidRequest(
            f"the prompt is {n_prompt} tokens long but the context holds {n_ctx} tokens "
            f"(prompt and generated tokens together); shorten the prompt",
            param=prompt_param, code="context_length_exceeded")
    if isinstance(exc, getattr(llamagen, "QueueFullError", ())):
        return Overloaded(f"the server is busy: {exc}", code="queue_full")
    if isinstance(exc, getattr(llamagen, "EngineClosedError", ())):
        return Overloaded("the server is shutting down", code="shutting_down")
    if isinstance(exc, (ValueError, TypeError, OverflowError)):
        return param_error(exc, origin, prompt_param if "prompt" in str(exc) else None)
    if isinstance(exc, LlamaError):
        return APIError(f"{type(exc).__name__}: {exc}")
    raise exc


def generation_error(exc: BaseException) -> APIError:
    """The APIError for an exception raised while generating (after engine.stream accepted)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, GrammarError):
        return InvalidRequest(f"grammar: {exc}", param="grammar")
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


def render_chat(engine, messages: list[dict]) -> str:
    """The prompt text for ``messages``.  A final assistant message is a prefill: the reply
    continues it (Anthropic's documented behaviour, llama-server's too), so the template renders
    the turns before it with the generation prompt and the prefill text follows verbatim."""
    prefill = ""
    if messages and messages[-1]["role"] == "assistant":
        if messages[-1].get("tool_calls"):
            raise InvalidRequest("the last message is an assistant's tool calls: send their "
                                 "results after it", param="messages")
        prefill = messages[-1].get("content") or ""
        messages = messages[:-1]
    try:
        text = engine.apply_chat_template(messages, add_generation_prompt=True)
    except (ValueError, TypeError) as e:
        raise InvalidRequest(f"messages: the chat template failed: {e}", param="messages") from None
    return text + prefill


# -- tools ---------------------------------------------------------------------------------------

def chat_prompt(engine, messages: list[dict], tools=None, tool_choice=None,
                parallel_tool_calls=None):
    """(prompt token ids, llamagen.tools.ChatPrompt or None) for a chat request.  With tools the
    template renders them and its tool-call syntax brings a grammar and a parser; a bad tool,
    choice or message is a 400 naming the field at fault."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        return chat_tokens(engine, render_chat(engine, messages)), None
    try:
        chat = engine.prepare_chat(messages, tools=tools, tool_choice=tool_choice,
                                   parallel_tool_calls=parallel_tool_calls)
    except (ValueError, TypeError) as e:
        text = str(e)
        param = next((p for p in ("tool_choice", "tools", "messages") if text.startswith(p)), "messages")
        if param == "messages" and not text.startswith("messages"):
            text = f"messages: the chat template failed: {text}"
        raise InvalidRequest(text, param=param) from None
    return chat_tokens(engine, chat.prompt), chat


def add_tool_sampling(chat, kwargs: dict, origin: dict) -> None:
    """The sampling the tool-call format needs, merged into a request's SamplingParams fields: a
    grammar or JSON schema of the client's own cannot go with it (llama-server refuses it too)."""
    extra = dict(chat.sampling)
    if "grammar" in extra and any(k in kwargs for k in ("grammar", "json_schema", "json_object")):
        raise InvalidRequest("a grammar or response_format cannot be combined with tools: the "
                             "tool-call format brings its own grammar", param="tools")
    stops = extra.pop("stop", ())
    if stops:
        mine = kwargs.get("stop") or ()
        mine = (mine,) if isinstance(mine, str) else tuple(mine)
        kwargs["stop"] = mine + tuple(x for x in stops if x not in mine)
    for k, v in extra.items():
        kwargs[k] = v
        origin[k] = "tools"


# -- logprobs ------------------------------------------------------------------------------------

def visible_logprobs(lps: list, reason: Optional[str], stop_sequence: Optional[str]) -> list:
    """The logprobs of the tokens the text shows: a choice that ended at the end of generation
    ("stop" without a stop string) ends with the end-of-generation token, which has no text
    (OpenAI's and vLLM's logprobs leave it out)."""
    if reason == "stop" and stop_sequence is None and lps:
        return lps[:-1]
    return lps


def chat_tokens(engine, text: str) -> list[int]:
    """The token ids of a rendered chat prompt, as llama-server makes them: special tokens
    written by the template (<|im_start|>, <start_of_turn>) are parsed, the model's BOS is added,
    and a BOS the template wrote itself is not doubled."""
    toks = engine.tokenize(text, add_special=True, parse_special=True)
    bos = getattr(engine.model, "bos", None)
    if bos is not None and len(toks) >= 2 and toks[0] == bos and toks[1] == bos:
        del toks[0]
    return toks
