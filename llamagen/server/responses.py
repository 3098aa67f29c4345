"""OpenAI's Responses API: POST /v1/responses (streamed and not), /v1/responses/input_tokens,
GET and DELETE /v1/responses/{id}.

Built on the chat path, as chat completions is: the input items become chat messages, the chat
template renders them with the tools, the engine generates, llama.cpp's parser splits the reply
into text, reasoning and function calls, which become output items.  A stored response (``store``
not false) can be continued with ``previous_response_id`` while the server keeps it: the newest
1,024 responses, each for an hour (deps.ServerState.responses).
"""
from __future__ import annotations

import itertools
import time

from fastapi import APIRouter, Depends, Request
from starlette.responses import StreamingResponse

from llamagen.server import sse, streams
from llamagen.server.auth import require_api_key
from llamagen.server.deps import get_engine, get_state
from llamagen.server.errors import InvalidRequest, NotFound, error_body
from llamagen.server.models import InputTokensRequest, ResponseFormat, ResponsesRequest
from llamagen.server.responses_format import (
    call_item, chat_tools, history_messages, input_messages, message_item, new_id, output_items,
    output_text, reasoning_item, response_format_of, response_object, status_of, usage,
)
from llamagen.server.translate import (
    chat_prompt, generation_error, response_format, sampling_kwargs, thinking_kwargs, tool_origin,
)
from llamagen.tools import ToolStream

router = APIRouter(dependencies=[Depends(require_api_key)])


def _conversation(st, body) -> tuple[list, list]:
    """(the messages to render, the conversation to store): a previous response's conversation,
    then this request's input; ``instructions`` apply to this request only (as OpenAI's)."""
    before = []
    if body.previous_response_id is not None:
        prev = st.responses.get(body.previous_response_id)
        if prev is None:
            raise InvalidRequest(
                f"previous_response_id {body.previous_response_id!r} is not held by this server: "
                "it keeps the newest 1024 stored responses for an hour (and none sent with "
                "store: false)", param="previous_response_id")
        before = prev[0]
    new = input_messages(None, body.input)
    head = [{"role": "system", "content": body.instructions}] if body.instructions else []
    return head + before + new, before + new


def _prompt(engine, st, body):
    messages, conversation = _conversation(st, body)
    tools, choice = chat_tools(body.tools, body.tool_choice)
    effort = body.reasoning.get("effort") if isinstance(body.reasoning, dict) else None
    thinking = thinking_kwargs(body.chat_template_kwargs, body.reasoning_format, effort)
    return chat_prompt(engine, messages, tools, choice, body.parallel_tool_calls,
                       **thinking), conversation


@router.post("/v1/responses")
@router.post("/responses", include_in_schema=False)
async def create_response(body: ResponsesRequest, request: Request, engine=Depends(get_engine)):
    st = get_state(request)
    prompt, conversation = await st.prep.run(_prompt, engine, st, body)
    chat = prompt if prompt.parses else None        # parsed for tool calls and reasoning
    # no max_output_tokens: until the end of the turn or of the context
    kwargs, origin = sampling_kwargs(body, max_new_tokens=int(engine.n_ctx), seed=None)
    rf = response_format_of(body.text)
    if rf is not None:
        try:
            response_format(ResponseFormat.model_validate(rf), kwargs, origin)
        except InvalidRequest as e:
            raise InvalidRequest(str(e).replace("response_format", "text.format"),
                                 param="text.format") from None
        for k, v in origin.items():
            if v.startswith("response_format"):
                origin[k] = "text.format" + v[len("response_format"):].replace(".json_schema", "")
    tool_origin(prompt, origin)
    timer = st.metrics.timer()
    source = await streams.open_source(st, engine, [prompt], kwargs, origin,
                                       prompt_param="input")
    resp_id, created = new_id("resp"), int(time.time())

    def finish(output, reason):
        resp = response_object(resp_id, created, st.model_name, body, status=status_of(reason),
                               output=output, usage_=usage(*source.usage()), reason=reason)
        if body.store is not False:
            st.responses.put(resp_id, conversation + history_messages(output), resp)
        return resp

    if body.stream:
        return StreamingResponse(_stream(source, request.url.path, timer, st, body, resp_id,
                                         created, chat, finish),
                                 media_type="text/event-stream", headers=sse.SSE_HEADERS)
    got = await streams.collected(request, source, timer)
    reason = got.finish.get((0, 0))
    text = "".join(got.texts.get((0, 0), []))
    message = chat.reply_and_error(text, reason)[0] if chat is not None else None
    return finish(output_items(message, text), reason)


async def _stream(source, path, timer, st, body, resp_id, created, chat, finish):
    """The event sequence the openai SDK parses: response.created, response.in_progress; per
    output item output_item.added, its deltas (output_text / function_call_arguments /
    reasoning_text), their .done events, output_item.done; then response.completed (or
    response.incomplete at max_output_tokens).  Every event has ``type`` and
    ``sequence_number``."""
    seq = itertools.count()
    items: list = []                 # finished output items
    cur: dict = {}                   # the open item: {"item": ..., "acc": accumulated text}

    def ev(kind, **fields):
        return sse.event(kind, {"type": kind, "sequence_number": next(seq), **fields})

    def shell(status):
        return response_object(resp_id, created, st.model_name, body, status=status,
                               output=list(items), usage_=None)

    def close():
        if not cur:
            return b""
        item, acc, index = cur["item"], cur["acc"], len(items)
        out = b""
        if item["type"] == "message":
            item = message_item(item["id"], acc)
            part = output_text(acc)
            out += ev("response.output_text.done", item_id=item["id"], output_index=index,
                      content_index=0, text=acc, logprobs=[])
            out += ev("response.content_part.done", item_id=item["id"], output_index=index,
                      content_index=0, part=part)
        elif item["type"] == "function_call":
            item = call_item(item["id"], item["call_id"], item["name"], acc)
            out += ev("response.function_call_arguments.done", item_id=item["id"],
                      output_index=index, name=item["name"], arguments=acc)
        else:
            item = reasoning_item(item["id"], acc)
            out += ev("response.reasoning_text.done", item_id=item["id"], output_index=index,
                      content_index=0, text=acc)
        out += ev("response.output_item.done", output_index=index, item=item)
        items.append(item)
        cur.clear()
        return out

    def open_(item):
        out = close()
        cur.update(item=item, acc="")
        index = len(items)
        out += ev("response.output_item.added", output_index=index, item=item)
        if item["type"] == "message":
            out += ev("response.content_part.added", item_id=item["id"], output_index=index,
                      content_index=0, part=output_text(""))
        return out

    def text(piece, kind):
        out = b""
        if not cur or cur["item"]["type"] != kind:
            out += open_(message_item(new_id("msg"), "", "in_progress") if kind == "message"
                         else {"type": "reasoning", "id": new_id("rs"), "summary": []})
        cur["acc"] += piece
        index = len(items)
        name = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra = {"logprobs": []} if kind == "message" else {}
        return out + ev(name, item_id=cur["item"]["id"], output_index=index, content_index=0,
                        delta=piece, **extra)

    def deltas(ds):
        out = b""
        for d in ds:
            if d.get("reasoning_content"):
                out += text(d["reasoning_content"], "reasoning")
            if d.get("content"):
                out += text(d["content"], "message")
            for tc in d.get("tool_calls", ()):
                if tc.get("id") is not None:            # a new call
                    out += open_(call_item(new_id("fc"), tc["id"], tc["function"]["name"], "",
                                           "in_progress"))
                piece = tc["function"].get("arguments")
                if piece and cur and cur["item"]["type"] == "function_call":
                    cur["acc"] += piece
                    out += ev("response.function_call_arguments.delta", item_id=cur["item"]["id"],
                              output_index=len(items), delta=piece)
        return out

    parser = ToolStream(chat) if chat is not None else None
    try:
        yield ev("response.created", response=shell("in_progress"))
        yield ev("response.in_progress", response=shell("in_progress"))
        reason = None
        async for c in streams.one_choice(source, timer, st.ping_interval):
            if c is streams.Tick:
                yield sse.PING
                continue
            if parser is not None:
                out = deltas(parser.feed(c.text))
                if c.finish_reason is not None:
                    out += deltas(parser.finish(c.finish_reason))
            else:
                out = text(c.text, "message") if c.text else b""
            if out:
                yield out
            if c.finish_reason is not None:
                reason = c.finish_reason
        timer.done()
        if not items and not cur:
            yield open_(message_item(new_id("msg"), "", "in_progress"))    # (an empty reply)
        yield close()
        resp = finish(items, reason)
        yield ev("response.completed" if resp["status"] == "completed" else "response.incomplete",
                 response=resp)
    except Exception as e:  # noqa: BLE001 - the stream has started: an error event, then end
        err = error_body(path, generation_error(e))["error"]
        yield ev("error", code=err.get("code"), message=err.get("message"), param=err.get("param"))
        failed = shell("failed")
        failed["error"] = {"code": err.get("code") or "server_error", "message": err.get("message")}
        yield ev("response.failed", response=failed)
    finally:
        await source.aclose()


@router.post("/v1/responses/input_tokens")
@router.post("/responses/input_tokens", include_in_schema=False)
async def input_tokens(body: InputTokensRequest, request: Request, engine=Depends(get_engine)):
    st = get_state(request)
    prompt, _ = await st.prep.run(_prompt, engine, st, body)
    return {"object": "response.input_tokens", "input_tokens": len(prompt.tokens)}


@router.get("/v1/responses/{resp_id}")
async def get_response(resp_id: str, request: Request):
    held = get_state(request).responses.get(resp_id)
    if held is None:
        raise NotFound(f"response {resp_id!r} not found (this server keeps the newest 1024 stored "
                       "responses for an hour)", param="response_id", code="not_found")
    return held[1]


@router.delete("/v1/responses/{resp_id}")
async def delete_response(resp_id: str, request: Request):
    if not get_state(request).responses.delete(resp_id):
        raise NotFound(f"response {resp_id!r} not found", param="response_id", code="not_found")
    return {"id": resp_id, "object": "response.deleted", "deleted": True}
