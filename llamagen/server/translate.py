"""Translation between the wire formats and the engine: sampling fields, chat messages, engine
errors.  No generation logic lives here or anywhere in the HTTP layer."""
from __future__ import annotations

import json
import re
from typing import Iterable, Optional, Sequence

from llamagen.errors import GrammarError, LlamaError
from llamagen.sampling import FIELDS as ENGINE_FIELDS

from llamagen.server.errors import APIError, InvalidRequest, Overloaded
from llamagen.server.models import ChatMessage, LlamagenSampling, ResponseFormat

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

_OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                 "tool": "tool"}


def _text_of(parts: Sequence, where: str) -> str:
    texts = []
    for i, part in enumerate(parts):
        if part.type != "text" or part.text is None:
            raise InvalidRequest(
                f"{where}[{i}]: only text content is supported (type 'text' with a 'text' "
                f"string), got type {part.type!r}", param=f"{where}[{i}].type")
        texts.append(part.text)
    # llama-server's way of flattening typed text parts for a string-content template
    return "\n".join(texts)


def openai_messages(messages: Iterable[ChatMessage]) -> list[dict]:
    """OpenAI chat messages as the chat template takes them: text parts flattened, an
    assistant's ``tool_calls`` and a ``tool`` message's ``tool_call_id`` passed on (the template
    renders them; Model.render_chat checks their shape)."""
    out = []
    for i, m in enumerate(messages):
        role = _OPENAI_ROLES.get(m.role)
        if role is None:
            raise InvalidRequest(f"messages[{i}].role must be 'system', 'developer', 'user', "
                                 f"'assistant' or 'tool', got {m.role!r}",
                                 param=f"messages[{i}].role")
        if m.tool_calls and role != "assistant":
            raise InvalidRequest(f"messages[{i}].tool_calls: only an assistant message makes tool "
                                 f"calls", param=f"messages[{i}].tool_calls")
        if m.content is None and not (role == "assistant" and m.tool_calls):
            raise InvalidRequest(f"messages[{i}].content is required", param=f"messages[{i}].content")
        msg = {"role": role}
        if m.content is not None:
            msg["content"] = m.content if isinstance(m.content, str) else \
                _text_of(m.content, f"messages[{i}].content")
        if m.tool_calls:
            msg["tool_calls"] = m.tool_calls
        if role == "tool":
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                msg["name"] = m.name
        out.append(msg)
    return out


def anthropic_messages(system, messages) -> list[dict]:
    """Anthropic messages as OpenAI-style ones for the template: text blocks joined, an
    assistant's tool_use blocks as its tool_calls, a user's tool_result blocks as ``tool``
    messages (before the user's own text)."""
    out = []
    if system is not None:
        text = system if isinstance(system, str) else _text_of(system, "system")
        if text:
            out.append({"role": "system", "content": text})
    for i, m in enumerate(messages):
        if m.role not in ("user", "assistant"):
            raise InvalidRequest(f"messages[{i}].role must be 'user' or 'assistant' (the system "
                                 f"prompt goes in 'system'), got {m.role!r}",
                                 param=f"messages[{i}].role")
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        texts, calls, results = [], [], 0
        for j, b in enumerate(m.content):
            where = f"messages[{i}].content[{j}]"
            if b.type == "text" and b.text is not None:
                texts.append(b.text)
            elif b.type == "tool_use" and m.role == "assistant":
                if not b.id or not b.name or not isinstance(b.input, dict):
                    raise InvalidRequest(f"{where}: a tool_use block needs 'id', 'name' and an "
                                         f"'input' object", param=where)
                calls.append({"type": "function", "id": b.id, "function": {
                    "name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}})
            elif b.type == "tool_result" and m.role == "user":
                if not b.tool_use_id:
                    raise InvalidRequest(f"{where}: a tool_result block needs 'tool_use_id'", param=where)
                content = b.content if isinstance(b.content, str) or b.content is None else \
                    _text_of(b.content, f"{where}.content")
                out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": content or ""})
                results += 1
            else:
                raise InvalidRequest(
                    f"{where}: a {m.role} message takes text{' and tool_use' if m.role == 'assistant' else ' and tool_result'} "
                    f"blocks, got type {b.type!r}", param=f"{where}.type")
        if texts or not (calls or results):
            msg = {"role": m.role, "content": "\n".join(texts)}
        elif calls:
            msg = {"role": "assistant", "content": None}
        else:
            continue            # tool results only: they are the turn
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def anthropic_tools(tools, tool_choice):
    """Anthropic ``tools`` and ``tool_choice`` as OpenAI's (tools, tool_choice, parallel)
    (chat_prompt refuses a choice other than auto / none without tools)."""
    if tool_choice is not None and not isinstance(tool_choice, dict):
        raise InvalidRequest("tool_choice must be an object", param="tool_choice")
    tc = tool_choice or {}
    kind = tc.get("type", "auto")
    parallel = False if tc.get("disable_parallel_tool_use") else None
    out = []
    for i, t in enumerate(tools or ()):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise InvalidRequest(f"tools[{i}] needs a 'name'", param=f"tools[{i}]")
        schema = t.get("input_schema", {"type": "object", "properties": {}})
        if not isinstance(schema, dict):
            raise InvalidRequest(f"tools[{i}].input_schema must be an object", param=f"tools[{i}].input_schema")
        fn = {"name": t["name"], "parameters": schema}
        if t.get("description") is not None:
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    choice = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
    if kind == "tool":
        if not isinstance(tc.get("name"), str):
            raise InvalidRequest("tool_choice of type 'tool' needs a 'name'", param="tool_choice")
        choice = {"type": "function", "function": {"name": tc["name"]}}
    elif choice is None:
        raise InvalidRequest(f"tool_choice type must be 'auto', 'any', 'tool' or 'none', got {kind!r}",
                             param="tool_choice")
    return out, choice, parallel


def anthropic_content(message: dict) -> list:
    """An assistant message (ChatPrompt.reply) as Anthropic content blocks."""
    blocks = []
    if message.get("content"):
        blocks.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or ():
        blocks.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                       "input": tool_input(call["function"]["arguments"])})
    return blocks or [{"type": "text", "text": ""}]


def tool_input(arguments: str):
    """A call's arguments text as Anthropic's ``input`` object (text that is not a JSON object,
    from a reply cut short, is kept under "_raw" rather than dropped)."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return {"_raw": arguments}
    return value if isinstance(value, dict) else {"_raw": arguments}


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


def openai_tool_delta(deltas: list) -> dict:
    """ToolStream deltas as one chat-completion chunk delta: text pieces joined, a call's id,
    name and argument pieces merged per call index."""
    out: dict = {}
    calls: dict = {}
    for d in deltas:
        for key in ("reasoning_content", "content"):
            if key in d:
                out[key] = out.get(key, "") + d[key]
        for tc in d.get("tool_calls", ()):
            c = calls.get(tc["index"])
            if c is None:
                calls[tc["index"]] = {**tc, "function": dict(tc["function"])}
            else:
                c["function"]["arguments"] = c["function"].get("arguments", "") + tc["function"].get("arguments", "")
    if calls:
        out["tool_calls"] = [calls[i] for i in sorted(calls)]
    return out


def tool_finish(reason: Optional[str], message: Optional[dict]) -> Optional[str]:
    """OpenAI's finish_reason: "tool_calls" when the reply ended with calls."""
    if reason == "stop" and message is not None and message.get("tool_calls"):
        return "tool_calls"
    return openai_finish(reason)


# -- logprobs ------------------------------------------------------------------------------------

def visible_logprobs(lps: list, reason: Optional[str], stop_sequence: Optional[str]) -> list:
    """The logprobs of the tokens the text shows: a choice that ended at the end of generation
    ("stop" without a stop string) ends with the end-of-generation token, which has no text
    (OpenAI's and vLLM's logprobs leave it out)."""
    if reason == "stop" and stop_sequence is None and lps:
        return lps[:-1]
    return lps


def chat_logprobs(lps) -> dict:
    """OpenAI chat's ``choice.logprobs`` for TokenLogprobs."""
    return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.piece),
                         "top_logprobs": [{"token": a.text, "logprob": a.logprob,
                                           "bytes": list(a.piece)} for a in t.top]}
                        for t in lps],
            "refusal": None}


def completion_logprobs(lps, offset: int) -> tuple[dict, int]:
    """OpenAI completions' ``choice.logprobs`` for TokenLogprobs whose text starts at character
    ``offset`` of the choice's text; and the offset after them.  ``top_logprobs`` maps the k most
    likely tokens' text to their logprobs, the sampled token included (OpenAI's "up to logprobs +
    1 elements")."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for t in lps:
        tokens.append(t.text)
        token_lps.append(t.logprob)
        top = {a.text: a.logprob for a in t.top}
        top.setdefault(t.text, t.logprob)
        tops.append(top)
        offsets.append(offset)
        offset += len(t.text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}, offset


# -- finish reasons -----------------------------------------------------------------------------

def openai_finish(reason: Optional[str]) -> Optional[str]:
    return {"stop": "stop", "length": "length"}.get(reason, reason)


def anthropic_stop(reason: Optional[str], stop_sequence: Optional[str],
                   message: Optional[dict] = None) -> Optional[str]:
    if reason == "stop" and message is not None and message.get("tool_calls"):
        return "tool_use"
    if reason == "length":
        return "max_tokens"
    if reason == "stop":
        return "stop_sequence" if stop_sequence else "end_turn"
    return reason


def chat_tokens(engine, text: str) -> list[int]:
    """The token ids of a rendered chat prompt, as llama-server makes them: special tokens
    written by the template (<|im_start|>, <start_of_turn>) are parsed, the model's BOS is added,
    and a BOS the template wrote itself is not doubled."""
    toks = engine.tokenize(text, add_special=True, parse_special=True)
    bos = getattr(engine.model, "bos", None)
    if bos is not None and len(toks) >= 2 and toks[0] == bos and toks[1] == bos:
        del toks[0]
    return toks
