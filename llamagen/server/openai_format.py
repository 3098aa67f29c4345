"""OpenAI's wire shapes: chat messages in, tool-call deltas, logprobs and finish reasons out."""
from __future__ import annotations

from typing import Iterable, Optional

from llamagen.server.errors import InvalidRequest
from llamagen.server.models import ChatMessage
from llamagen.server.translate import text_parts


_OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                 "tool": "tool"}


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
                text_parts(m.content, f"messages[{i}].content")
        if m.tool_calls:
            msg["tool_calls"] = m.tool_calls
        if m.reasoning_content is not None and role == "assistant":
            msg["reasoning_content"] = m.reasoning_content
        if role == "tool":
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                msg["name"] = m.name
        out.append(msg)
    return out


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
    1 elements"); an echoed prompt's first token has null for both."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for t in lps:
        tokens.append(t.text)
        token_lps.append(t.logprob)
        if t.logprob is None:           # an echoed prompt's first token: nothing precedes it
            tops.append(None)
        else:
            top = {a.text: a.logprob for a in t.top}
            top.setdefault(t.text, t.logprob)
            tops.append(top)
        offsets.append(offset)
        offset += len(t.text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}, offset


def openai_finish(reason: Optional[str]) -> Optional[str]:
    return {"stop": "stop", "length": "length"}.get(reason, reason)
