"""Anthropic's wire shapes: messages and tools in (as the OpenAI-style messages the chat
template takes), content blocks and stop reasons out."""
from __future__ import annotations

import json
from typing import Optional

from llamagen.server.errors import InvalidRequest
from llamagen.server.translate import text_parts


def anthropic_messages(system, messages) -> list[dict]:
    """Anthropic messages as OpenAI-style ones for the template: text blocks joined, an
    assistant's tool_use blocks as its tool_calls, a user's tool_result blocks as ``tool``
    messages (before the user's own text)."""
    out = []
    if system is not None:
        text = system if isinstance(system, str) else text_parts(system, "system")
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
        texts, calls, results, thoughts = [], [], 0, []
        for j, b in enumerate(m.content):
            where = f"messages[{i}].content[{j}]"
            if b.type == "text" and b.text is not None:
                texts.append(b.text)
            elif b.type == "thinking" and m.role == "assistant" and isinstance(b.thinking, str):
                thoughts.append(b.thinking)       # (the template may render it, or drop it)
            elif b.type == "redacted_thinking" and m.role == "assistant":
                continue
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
                    text_parts(b.content, f"{where}.content")
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
        if thoughts:
            msg["reasoning_content"] = "\n".join(thoughts)
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
    if message.get("reasoning_content"):
        blocks.append({"type": "thinking", "thinking": message["reasoning_content"],
                       "signature": ""})
    if message.get("content"):
        blocks.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or ():
        blocks.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                       "input": tool_input(call["function"]["arguments"])})
    if not any(b["type"] != "thinking" for b in blocks):
        blocks.append({"type": "text", "text": ""})
    return blocks


def tool_input(arguments: str):
    """A call's arguments text as Anthropic's ``input`` object (text that is not a JSON object,
    from a reply cut short, is kept under "_raw" rather than dropped)."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return {"_raw": arguments}
    return value if isinstance(value, dict) else {"_raw": arguments}


def anthropic_stop(reason: Optional[str], stop_sequence: Optional[str],
                   message: Optional[dict] = None) -> Optional[str]:
    if reason == "stop" and message is not None and message.get("tool_calls"):
        return "tool_use"
    if reason == "length":
        return "max_tokens"
    if reason == "stop":
        return "stop_sequence" if stop_sequence else "end_turn"
    return reason
