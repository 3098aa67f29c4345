"""OpenAI's Responses API wire shapes: input items in (as chat messages), output items, usage and
the streamed events out.  No generation logic: the route runs the chat path (responses.py)."""
from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from threading import Lock
from typing import Any, Optional

from llamagen.server.errors import InvalidRequest

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_TEXT_PARTS = {"input_text", "output_text", "text", "summary_text", "refusal"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or text parts (input_text / output_text) joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where} must be a string or a list of content parts", param=where)
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text", part.get("refusal")), str):
            raise InvalidRequest(f"{where}[{i}]: only text parts are supported ('input_text' or "
                                 f"'output_text' with a 'text' string), got type {kind!r}",
                                 param=f"{where}[{i}].type")
        texts.append(part.get("text", part.get("refusal")))
    return "\n".join(texts)


def input_messages(instructions: Optional[str], items: Any) -> list[dict]:
    """``instructions`` and ``input`` (a string or a list of items: messages, function_call,
    function_call_output; reasoning items are skipped) as the chat messages the template takes.
    Consecutive function calls become one assistant message's ``tool_calls``."""
    out: list[dict] = []
    if instructions:
        out.append({"role": "system", "content": instructions})
    if isinstance(items, str):
        out.append({"role": "user", "content": items})
        return out
    if not isinstance(items, list) or not items:
        raise InvalidRequest("input must be a string or a non-empty list of items", param="input")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            role = _ROLES.get(item.get("role"))
            if role is None:
                raise InvalidRequest(f"{where}.role must be 'system', 'developer', 'user' or "
                                     f"'assistant', got {item.get('role')!r}", param=f"{where}.role")
            out.append({"role": role, "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise InvalidRequest(f"{where}.{key} must be a string", param=f"{where}.{key}")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise InvalidRequest(f"{where}.call_id must be a string", param=f"{where}.call_id")
            output = item.get("output")
            if not isinstance(output, str):
                output = _text(output, f"{where}.output")
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        elif kind == "reasoning":
            continue                        # (a model's earlier reasoning: not re-sent to it)
        else:
            raise InvalidRequest(f"{where}.type {kind!r} is not supported (message, function_call, "
                                 "function_call_output)", param=f"{where}.type")
    return out


def chat_tools(tools: Optional[list], tool_choice: Any) -> tuple[Optional[list], Any]:
    """Responses' function tools (``{"type": "function", "name", "parameters", ...}``, flat) and
    ``tool_choice`` in chat completions' shapes."""
    out = None
    if tools:
        out = []
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or t.get("type") != "function":
                kind = t.get("type") if isinstance(t, dict) else None
                raise InvalidRequest(f"tools[{i}].type {kind!r} is not supported: only function "
                                     "tools run here", param=f"tools[{i}].type")
            fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}
            out.append({"type": "function", "function": fn})
    if isinstance(tool_choice, dict):
        if tool_choice.get("type") != "function" or not isinstance(tool_choice.get("name"), str):
            raise InvalidRequest("tool_choice must be 'auto', 'none', 'required' or "
                                 "{\"type\": \"function\", \"name\": ...}", param="tool_choice")
        tool_choice = {"type": "function", "function": {"name": tool_choice["name"]}}
    return out, tool_choice


def response_format_of(text: Optional[dict]):
    """``text.format`` as chat's response_format dict, or None."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise InvalidRequest("text must be an object", param="text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise InvalidRequest("text.format.type must be 'text', 'json_object' or 'json_schema'",
                             param="text.format.type")
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    return {"type": "json_schema", "json_schema": {
        "name": fmt.get("name") or "output", "schema": fmt.get("schema"),
        "strict": fmt.get("strict")}}


# -- output ----------------------------------------------------------------------------------------

def message_item(item_id: str, text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [output_text(text)] if status == "completed" else []}


def output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(item_id: str, call_id: str, name: str, arguments: str,
              status: str = "completed") -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def reasoning_item(item_id: str, text: str) -> dict:
    return {"type": "reasoning", "id": item_id, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def output_items(message: Optional[dict], text: str) -> list[dict]:
    """The output items of a finished reply: reasoning (if the parser found any), the text as a
    message, and one function_call item per tool call."""
    if message is None:
        return [message_item(new_id("msg"), text)]
    items = []
    if message.get("reasoning_content"):
        items.append(reasoning_item(new_id("rs"), message["reasoning_content"]))
    content = message.get("content") or ""
    if content or not message.get("tool_calls"):
        items.append(message_item(new_id("msg"), content))
    for tc in message.get("tool_calls") or ():
        fn = tc["function"]
        args = fn["arguments"] if isinstance(fn["arguments"], str) else json.dumps(fn["arguments"])
        items.append(call_item(new_id("fc"), tc.get("id") or new_id("call"), fn["name"], args))
    return items


def usage(prompt: int, completion: int, cached: int) -> dict:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def response_object(resp_id: str, created: int, model: str, body, *, status: str,
                    output: list, usage_: Optional[dict], reason: Optional[str] = None) -> dict:
    """The Response object (the SDK's ``Response``)."""
    return {
        "id": resp_id, "object": "response", "created_at": created, "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if reason == "length" else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "model": model, "output": output,
        "output_text": "".join(p["text"] for it in output if it["type"] == "message"
                               for p in it["content"]),
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "store": body.store is not False,
        "temperature": body.temperature, "top_p": body.top_p,
        "text": body.text or {"format": {"type": "text"}},
        "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
        "tools": body.tools or [], "truncation": body.truncation or "disabled",
        "usage": usage_, "user": body.user, "metadata": body.metadata or {},
    }


def status_of(reason: Optional[str]) -> str:
    return "incomplete" if reason == "length" else "completed"


def history_messages(output: list) -> list[dict]:
    """A stored response's output items as chat messages (for ``previous_response_id``)."""
    msgs: list[dict] = []
    for item in output:
        if item["type"] == "message":
            msgs.append({"role": "assistant", "content": "".join(p["text"] for p in item["content"])})
        elif item["type"] == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if msgs and msgs[-1]["role"] == "assistant":
                msgs[-1].setdefault("tool_calls", []).append(call)
            else:
                msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
    return msgs


class ResponseStore:
    """The responses a later request may continue (``previous_response_id``) or read back
    (``GET /v1/responses/{id}``): the newest ``capacity``, each for ``ttl`` seconds."""

    def __init__(self, capacity: int = 1024, ttl: float = 3600.0):
        self.capacity, self.ttl = capacity, ttl
        self._items: OrderedDict = OrderedDict()
        self._lock = Lock()

    def put(self, resp_id: str, messages: list, response: dict) -> None:
        with self._lock:
            self._items[resp_id] = (time.monotonic(), messages, response)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, resp_id: str):
        """(messages of the whole conversation so far, the response) or None."""
        with self._lock:
            entry = self._items.get(resp_id)
            if entry is None:
                return None
            if time.monotonic() - entry[0] > self.ttl:
                del self._items[resp_id]
                return None
            return entry[1], entry[2]

    def delete(self, resp_id: str) -> bool:
        with self._lock:
            return self._items.pop(resp_id, None) is not None
