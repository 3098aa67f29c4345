"""llama-server's ``POST /infill``: fill-in-the-middle with the model's FIM tokens (the prompt laid
out by llamagen.infill, as llama-server lays it out), answered in llama-server's /completion shape
(``content``, ``stop``, ``stop_type``, ``tokens_predicted``, ...), streamed as ``data:`` lines."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import StreamingResponse

from llamagen import infill
from llamagen.server import sse, streams
from llamagen.server.auth import require_api_key
from llamagen.server.deps import get_engine, get_state
from llamagen.server.errors import InvalidRequest, NotServed, error_body
from llamagen.server.models import InfillRequest
from llamagen.server.translate import generation_error, sampling_kwargs

router = APIRouter(dependencies=[Depends(require_api_key)])


def _stop_type(reason, stop_sequence):
    if reason == "length":
        return "limit"
    return "word" if stop_sequence else "eos"


@router.post("/infill")
async def infill_route(body: InfillRequest, request: Request, engine=Depends(get_engine)):
    st = get_state(request)
    model = engine.model
    if not infill.supports_infill(model):
        raise NotServed("infill is not supported by this model: it has no "
                                "fill-in-the-middle tokens", param="model")
    extra = body.input_extra or []
    for i, chunk in enumerate(extra):
        if not isinstance(chunk, dict) or not isinstance(chunk.get("text"), str) or \
                not isinstance(chunk.get("filename", ""), str):
            raise InvalidRequest(f"input_extra[{i}] must be {{\"filename\": string, \"text\": "
                                 "string}", param=f"input_extra[{i}]")
    kwargs, origin = sampling_kwargs(body, max_new_tokens=int(engine.n_ctx), seed=None)
    n_predict = kwargs["max_new_tokens"] if ("max_new_tokens" in origin) else 0

    def build():
        return infill.fim_tokens(model, body.input_prefix, body.input_suffix, extra=extra,
                                 prompt=body.prompt or "", n_batch=engine.n_batch,
                                 n_predict=n_predict, n_ctx=int(engine.n_ctx))
    tokens = await st.prep.run(build)
    timer = st.metrics.timer()
    source = await streams.open_source(st, engine, [tokens], kwargs, origin,
                                       prompt_param="input_prefix")

    def final(text, reason, stop_sequence):
        p, c, cached = source.usage()
        return {"index": 0, "content": text, "stop": True, "model": st.model_name,
                "stop_type": _stop_type(reason, stop_sequence),
                "stopping_word": stop_sequence or "", "tokens_predicted": c,
                "tokens_evaluated": p, "tokens_cached": cached, "truncated": False}

    if body.stream:
        async def gen():
            reason = stop_sequence = None
            try:
                async for c in streams.one_choice(source, timer, st.ping_interval):
                    if c is streams.Tick:
                        yield sse.PING
                        continue
                    if c.text:
                        yield sse.data({"index": 0, "content": c.text, "stop": False})
                    if c.finish_reason is not None:
                        reason, stop_sequence = c.finish_reason, c.stop_sequence
                timer.done()
                yield sse.data(final("", reason, stop_sequence))
            except Exception as e:  # noqa: BLE001 - started: one error line, then end
                yield sse.data(error_body(request.url.path, generation_error(e)))
            finally:
                await source.aclose()
        return StreamingResponse(gen(), media_type="text/event-stream", headers=sse.SSE_HEADERS)
    got = await streams.collected(request, source, timer)
    return final("".join(got.texts.get((0, 0), [])), got.finish.get((0, 0)),
                 got.stop_sequence.get((0, 0)))
