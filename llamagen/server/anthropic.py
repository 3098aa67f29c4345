"""Anthropic's Messages API: /v1/messages and /v1/messages/count_tokens.

Usage follows Anthropic's accounting: ``input_tokens`` are the prompt tokens that were computed,
``cache_read_input_tokens`` those taken from the prefix cache (their sum is the prompt length).
"""
from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Request
from starlette.responses import StreamingResponse

from llamagen.server import sse, streams
from llamagen.server.deps import get_engine, get_state
from llamagen.server.auth import require_api_key
from llamagen.server.errors import InvalidRequest, error_body
from llamagen.server.models import CountTokensRequest, MessagesRequest
from llamagen.server.anthropic_format import (
    anthropic_content, anthropic_messages, anthropic_stop, anthropic_tools,
)
from llamagen.server.translate import (
    chat_prompt, generation_error, sampling_kwargs, thinking_kwargs, tool_origin,
)
from llamagen.tools import ToolStream

router = APIRouter(dependencies=[Depends(require_api_key)])


def _prompt(engine, body):
    """The request's ChatPrompt, as translate.chat_prompt makes it."""
    tools, choice, parallel = anthropic_tools(body.tools, body.tool_choice)
    thinking = getattr(body, "thinking", None)
    if thinking is not None and (not isinstance(thinking, dict)
                                 or thinking.get("type") not in ("enabled", "disabled")):
        raise InvalidRequest("thinking must be {\"type\": \"enabled\" or \"disabled\", ...}",
                             param="thinking")
    enable = None if thinking is None else thinking["type"] == "enabled"
    return chat_prompt(engine, anthropic_messages(body.system, body.messages), tools, choice,
                       parallel, **thinking_kwargs(getattr(body, "chat_template_kwargs", None),
                                                   enable_thinking=enable))


def _usage(source: streams.ChunkSource) -> dict:
    p, c, cached = source.usage()
    return {"input_tokens": p - cached, "output_tokens": c,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: Request, engine=Depends(get_engine)):
    st = get_state(request)
    prompt = await st.prep.run(_prompt, engine, body)
    chat = prompt if prompt.parses else None       # parsed for tool calls and thinking
    kwargs, origin = sampling_kwargs(body, seed=None)
    tool_origin(prompt, origin)
    budget = (body.thinking or {}).get("budget_tokens")
    if (body.thinking or {}).get("type") == "enabled" and budget is not None:
        kwargs["reasoning_budget"] = budget         # Anthropic's thinking budget, enforced
        origin["reasoning_budget"] = "thinking.budget_tokens"
    timer = st.metrics.timer()
    source = await streams.open_source(st, engine, [prompt], kwargs, origin,
                                       prompt_param="messages")
    msg_id = f"msg_{uuid.uuid4().hex}"
    if body.stream:
        return StreamingResponse(_stream(source, request.url.path, timer, st, msg_id, chat),
                                 media_type="text/event-stream", headers=sse.SSE_HEADERS)
    got = await streams.collected(request, source, timer)
    reason = got.finish.get((0, 0))
    stop_sequence = got.stop_sequence.get((0, 0))
    text = "".join(got.texts.get((0, 0), []))
    message, parse_error = chat.reply_and_error(text, reason) if chat is not None else (None, None)
    out = {"id": msg_id, "type": "message", "role": "assistant", "model": st.model_name,
           "content": anthropic_content(message) if message is not None else [{"type": "text", "text": text}],
           "stop_reason": anthropic_stop(reason, stop_sequence, message),
           "stop_sequence": stop_sequence if reason == "stop" else None,
           "usage": _usage(source)}
    if parse_error is not None:
        out["parse_error"] = parse_error                # why the reply is text only
    return out


async def _stream(source: streams.ChunkSource, path: str, timer, st, msg_id: str, chat=None):
    """message_start; content blocks as the reply goes: a thinking block (thinking_delta) for a
    thinking template's reasoning, a text block (text_delta), one tool_use block per call (start
    with id and name, input_json_delta pieces), each closed by content_block_stop when the next
    starts; message_delta, message_stop.  A reply with nothing in it gets one empty text block.
    The official client dispatches on the ``event:`` line and drops data-only frames."""
    ev = sse.event
    started = False
    parser = ToolStream(chat) if chat is not None else None
    block = {"index": -1, "kind": None, "call": None}      # the open block

    def start():
        # sent with the first engine chunk: by then the engine knows how much of the prompt
        # came from the cache, so this usage already has the final input split
        return ev("message_start", {"type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": st.model_name,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {**_usage(source), "output_tokens": 0}}})

    def open_block(kind, content_block, call=None):
        out = b""
        if block["index"] >= 0:
            out += ev("content_block_stop", {"type": "content_block_stop", "index": block["index"]})
        block.update(index=block["index"] + 1, kind=kind, call=call)
        return out + ev("content_block_start", {"type": "content_block_start",
                                                "index": block["index"],
                                                "content_block": content_block})

    def delta(kind, piece):
        out = b""
        if block["kind"] != kind:
            out += open_block(kind, {"type": "text", "text": ""} if kind == "text"
                              else {"type": "thinking", "thinking": ""})
        d = {"type": "text_delta", "text": piece} if kind == "text" else \
            {"type": "thinking_delta", "thinking": piece}
        return out + ev("content_block_delta", {"type": "content_block_delta",
                                                "index": block["index"], "delta": d})

    def tool_events(deltas):
        out = b""
        for d in deltas:
            if d.get("reasoning_content"):
                out += delta("thinking", d["reasoning_content"])
            if d.get("content") and block["kind"] != "tool_use":
                out += delta("text", d["content"])
            for tc in d.get("tool_calls", ()):
                if tc.get("id") is not None:            # a new call: close the open block
                    out += open_block("tool_use", {"type": "tool_use", "id": tc["id"],
                                                   "name": tc["function"]["name"], "input": {}},
                                      tc["index"])
                piece = tc["function"].get("arguments")
                if piece and tc["index"] == block["call"]:
                    out += ev("content_block_delta", {
                        "type": "content_block_delta", "index": block["index"],
                        "delta": {"type": "input_json_delta", "partial_json": piece}})
        return out
    try:
        reason = stop_sequence = None
        async for c in streams.one_choice(source, timer, st.ping_interval):
            if c is streams.Tick:
                yield sse.PING
                continue
            if not started:
                started = True
                yield start()
            if parser is not None:
                out = tool_events(parser.feed(c.text))
                if c.finish_reason is not None:
                    out += tool_events(parser.finish(c.finish_reason))
                if out:
                    yield out
            elif c.text:
                yield delta("text", c.text)
            if c.finish_reason is not None:
                reason, stop_sequence = c.finish_reason, c.stop_sequence
        timer.done()
        if not started:
            yield start()
        if block["kind"] in (None, "thinking"):
            yield open_block("text", {"type": "text", "text": ""})      # (no text: an empty one)
        yield ev("content_block_stop", {"type": "content_block_stop", "index": block["index"]})
        delta_ = {"type": "message_delta",
                  "delta": {"stop_reason": anthropic_stop(reason, stop_sequence,
                                                          parser.message if parser is not None else None),
                            "stop_sequence": stop_sequence if reason == "stop" else None},
                  "usage": _usage(source)}
        if parser is not None and parser.parse_error is not None:
            delta_["parse_error"] = parser.parse_error   # why the reply is text only
        yield ev("message_delta", delta_)
        yield ev("message_stop", {"type": "message_stop"})
    except Exception as e:  # noqa: BLE001 - the stream has started: one error event, then end
        yield ev("error", error_body(path, generation_error(e)))
    finally:
        await source.aclose()


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request, engine=Depends(get_engine)):
    prompt = await get_state(request).prep.run(_prompt, engine, body)
    return {"input_tokens": len(prompt.tokens)}
