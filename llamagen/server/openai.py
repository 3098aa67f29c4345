"""OpenAI's /v1/completions and /v1/chat/completions."""
from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request
from starlette.responses import StreamingResponse

from llamagen.server import sse, streams
from llamagen.server.deps import get_engine, get_state
from llamagen.server.auth import require_api_key
from llamagen.server.errors import InvalidRequest, error_body
from llamagen.server.models import ChatCompletionRequest, CompletionRequest
from llamagen.server.openai_format import (
    chat_logprobs, completion_logprobs, openai_finish, openai_messages, openai_tool_delta,
    tool_finish,
)
from llamagen.server.translate import (
    chat_prompt, generation_error, response_format, sampling_kwargs, thinking_kwargs, tool_origin,
)
from llamagen.tools import ToolStream

router = APIRouter(dependencies=[Depends(require_api_key)])

COMPLETIONS_DEFAULT_MAX_TOKENS = 16   # OpenAI's documented default for /v1/completions


def _usage(source: streams.ChunkSource) -> dict:
    p, c, cached = source.usage()
    out = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
           "prompt_tokens_details": {"cached_tokens": cached}}
    drafted, accepted = source.draft_usage()
    if drafted:
        # speculative decoding, in the fields OpenAI reports Predicted Outputs with
        out["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                            "rejected_prediction_tokens": drafted - accepted}
    return out


def _prompts(prompt) -> list:
    """The prompts of a completions request: a str, a list of str, a list of token ids or a
    list of lists of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequest("prompt must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        return [prompt]
    for i, p in enumerate(prompt):
        if not isinstance(p, str) and not p:
            raise InvalidRequest(f"prompt[{i}] must not be empty", param="prompt")
    return list(prompt)


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _sse(gen) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream", headers=sse.SSE_HEADERS)


async def _stream(source: streams.ChunkSource, path: str, timer, ping: float, include_usage: bool,
                  base: dict, make_choice, head=()):
    """The SSE body shared by both routes: ``head`` chunks, one chunk per engine chunk with text
    or a finish reason, the usage chunk if asked, [DONE]; or, on an error, one error event."""
    usage_null = {"usage": None} if include_usage else {}
    try:
        for choice in head:
            yield sse.data({**base, "choices": [choice], **usage_null})
        async for item in source.events(ping):
            if item is streams.Tick:
                yield sse.PING
                continue
            k, c = item
            timer.chunk((k, c.index), c)
            # (the engine's chunks carry the logprobs of the text they show)
            if c.text or c.finish_reason is not None:
                yield sse.data({**base, "choices": [make_choice(k, c)], **usage_null})
        timer.done()
        if include_usage:
            yield sse.data({**base, "choices": [], "usage": _usage(source)})
        yield sse.DONE
    except Exception as e:  # noqa: BLE001 - the stream has started: report it in-band, then end
        yield sse.data(error_body(path, generation_error(e)))
    finally:
        await source.aclose()


@router.post("/v1/completions")
@router.post("/completions", include_in_schema=False)     # llama-server's alias (litellm without /v1)
async def completions(body: CompletionRequest, request: Request, engine=Depends(get_engine)):
    st = get_state(request)
    if body.suffix:
        raise InvalidRequest("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise InvalidRequest("best_of is not supported (other than best_of == n)", param="best_of")
    prompts = _prompts(body.prompt)
    n = 1 if body.n is None else body.n
    if len(prompts) * n > st.max_request_sequences:
        raise InvalidRequest(
            f"{len(prompts)} prompts x n={n} is {len(prompts) * n} sequences; one request may ask "
            f"for at most {st.max_request_sequences} (the server's --max-request-sequences): "
            "split it", param="n" if n > 1 else "prompt", code="too_many_sequences")
    # (``logprobs``, an int, is SamplingParams' own field: sampling_kwargs passes it on)
    kwargs, origin = sampling_kwargs(body, max_new_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS,
                                     seed=None)
    echo = bool(body.echo)
    if echo and (body.logprobs is not None or body.max_tokens == 0):
        # the prompt's own logprobs (scoring: lm-eval's loglikelihood requests); max_tokens 0
        # answers with the prompt alone
        kwargs["prompt_logprobs"] = body.logprobs or 0
        origin["prompt_logprobs"] = "logprobs"
    response_format(body.response_format, kwargs, origin)
    timer = st.metrics.timer()
    source = await streams.open_source(st, engine, prompts, kwargs, origin, n=n,
                                       prompt_param="prompt")
    echoed = None
    if echo:
        # the text an echo repeats: the prompt as sent (token ids: their text, off the loop)
        echoed = await st.prep.run(
            lambda: [p if isinstance(p, str) else engine.detokenize(p) for p in prompts])
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": st.model_name}

    if body.stream:
        offsets = {}
        started = set()

        def choice(k, c):
            lp = None
            text, lps = c.text, c.logprobs
            if echo and (k, c.index) not in started:
                started.add((k, c.index))
                text = echoed[k] + text
                if c.prompt_logprobs is not None and body.logprobs is not None:
                    lps = c.prompt_logprobs + (lps or [])
            if lps is not None:
                lp, offsets[k, c.index] = completion_logprobs(lps, offsets.get((k, c.index), 0))
            return {"text": text, "index": k * n + c.index, "logprobs": lp,
                    "finish_reason": openai_finish(c.finish_reason)}
        return _sse(_stream(source, request.url.path, timer, st.ping_interval,
                            _include_usage(body), base, choice))

    got = await streams.collected(request, source, timer)
    choices = []
    for (k, i), parts in sorted(got.texts.items()):
        reason = got.finish.get((k, i))
        lps = got.logprobs.get((k, i), []) if body.logprobs is not None else None
        if echo:
            parts = [echoed[k]] + parts
            if lps is not None:
                lps = got.prompt_logprobs.get((k, i), []) + lps
        choices.append({"text": "".join(parts), "index": k * n + i,
                        "logprobs": completion_logprobs(lps, 0)[0] if lps is not None else None,
                        "finish_reason": openai_finish(reason)})
    return {**base, "choices": choices, "usage": _usage(source)}


@router.post("/v1/chat/completions")
@router.post("/chat/completions", include_in_schema=False)
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           engine=Depends(get_engine)):
    st = get_state(request)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    thinking = thinking_kwargs(body.chat_template_kwargs, body.reasoning_format,
                               body.reasoning_effort)
    messages = openai_messages(body.messages)
    prompt = await st.prep.run(lambda: chat_prompt(engine, messages, body.tools, body.tool_choice,
                                                   body.parallel_tool_calls, **thinking))
    # replies are parsed for tool calls and reasoning (reasoning_content), when there can be any
    chat = prompt if prompt.parses else None
    # no max_tokens: until the end of the turn or of the context, as OpenAI does
    kwargs, origin = sampling_kwargs(body, max_new_tokens=_unbounded(engine), seed=None)
    # chat's logprobs is a bool, its k is top_logprobs
    kwargs.pop("logprobs", None)
    if body.logprobs:
        kwargs["logprobs"] = body.top_logprobs or 0
        origin["logprobs"] = "top_logprobs"
    response_format(body.response_format, kwargs, origin)
    tool_origin(prompt, origin)
    timer = st.metrics.timer()
    n = 1 if body.n is None else body.n
    source = await streams.open_source(st, engine, [prompt], kwargs, origin, n=n,
                                       prompt_param="messages")
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": st.model_name, "system_fingerprint": None}

    if body.stream:
        parsers = {}

        def choice(k, c):
            lp = chat_logprobs(c.logprobs) if c.logprobs is not None else None
            if chat is None:
                return {"index": c.index, "delta": {"content": c.text} if c.text else {},
                        "logprobs": lp, "finish_reason": openai_finish(c.finish_reason)}
            ts = parsers.get(c.index)
            if ts is None:
                ts = parsers[c.index] = ToolStream(chat)
            deltas = ts.feed(c.text)
            if c.finish_reason is not None:
                deltas += ts.finish(c.finish_reason)
            out = {"index": c.index, "delta": openai_tool_delta(deltas), "logprobs": lp,
                   "finish_reason": tool_finish(c.finish_reason, ts.message)}
            if ts.parse_error is not None:
                out["parse_error"] = ts.parse_error     # why the reply is text only
            return out
        head = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for i in range(n)]
        return _sse(_stream(source, request.url.path, timer, st.ping_interval,
                            _include_usage(body), base, choice, head))

    got = await streams.collected(request, source, timer)
    choices = []
    for (_, i), parts in sorted(got.texts.items()):
        reason = got.finish.get((0, i))
        lps = got.logprobs.get((0, i), []) if body.logprobs else None
        text = "".join(parts)
        message = {"role": "assistant", "content": text}
        parse_error = None
        if chat is not None:
            # a reply cut short (length) may stop inside a call: parsed as far as it goes
            message, parse_error = chat.reply_and_error(text, reason)
        choice = {"index": i, "message": message,
                  "logprobs": chat_logprobs(lps) if lps is not None else None,
                  "finish_reason": tool_finish(reason, message) if chat is not None
                  else openai_finish(reason)}
        if parse_error is not None:
            choice["parse_error"] = parse_error         # why the reply is text only
        choices.append(choice)
    return {**base, "object": "chat.completion", "choices": choices, "usage": _usage(source)}


def _unbounded(engine) -> int:
    """max_new_tokens when the client gives none: the context size (the engine ends the choice
    with 'length' when the context is full)."""
    return int(engine.n_ctx)
