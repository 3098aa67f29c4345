"""OpenAI's /v1/embeddings and llama-server's /v1/rerank (a server started with --embeddings;
--pooling rank and a reranker model for /v1/rerank)."""
from __future__ import annotations

import base64

import numpy as np
import orjson

from fastapi import APIRouter, Depends, Request

from llamagen.errors import PromptTooLongError
from llamagen.server.deps import get_engine, get_state
from llamagen.server.auth import require_api_key
from llamagen.server.errors import InvalidRequest, NotServed, dumps
from llamagen.server.models import EmbeddingRequest, RerankRequest
from llamagen.server.translate import engine_error
from llamagen.server.work import json_response

router = APIRouter(dependencies=[Depends(require_api_key)])


def _inputs(inp) -> list:
    """The texts of a request: a str, a list of str, a list of token ids or a list of lists."""
    if isinstance(inp, str):
        inp = [inp]
    elif not inp:
        raise InvalidRequest("input must not be empty", param="input")
    elif isinstance(inp[0], int):
        inp = [inp]
    for i, x in enumerate(inp):
        if not x:
            raise InvalidRequest(f"input[{i}] must not be empty", param="input")
    return list(inp)


async def _engine_call(call, param: str):
    """Await an embedding job; an error about one item (its ``index``) becomes a 400 naming
    ``param[index]``, anything else (the engine closed) its usual translation."""
    try:
        return await call
    except (ValueError, TypeError) as e:
        msg, idx = str(e), getattr(e, "index", None)
        if idx is not None and msg.startswith(f"text {idx}"):
            msg = f"{param}[{idx}]" + msg[len(f"text {idx}"):]
        code = "context_length_exceeded" if isinstance(e, PromptTooLongError) else None
        raise InvalidRequest(msg, param=param, code=code) from None
    except Exception as e:  # noqa: BLE001 - translated (the engine closed)
        raise engine_error(e, {}, param) from None


@router.post("/v1/embeddings")
@router.post("/embeddings", include_in_schema=False)
async def embeddings(body: EmbeddingRequest, request: Request, engine=Depends(get_engine)):
    st = get_state(request)
    if not getattr(engine, "embeddings", False):
        raise NotServed("this server does not compute embeddings: start it with "
                        "`llamagen serve --embeddings`", code="embeddings_not_enabled")
    if getattr(engine, "reranks", False):
        raise NotServed("this server reranks (--pooling rank): use /v1/rerank",
                        code="embeddings_not_enabled")
    fmt = body.encoding_format or "float"
    if fmt not in ("float", "base64"):
        raise InvalidRequest(f"encoding_format must be 'float' or 'base64', got {fmt!r}",
                             param="encoding_format")
    texts = _inputs(body.input)
    n_embd = engine.model.n_embd_out
    if body.dimensions is not None and body.dimensions != n_embd:
        raise InvalidRequest(f"dimensions: this model's embeddings have {n_embd} dimensions "
                             "(shortening is not supported)", param="dimensions")
    res = await _engine_call(engine.embed(texts), "input")

    def body():
        # a thousand vectors are a million numbers: encoded in a worker thread, straight to
        # JSON bytes, one vector per call (a C encoder call holds the GIL: one call for all of
        # them stopped the event loop for seconds, as FastAPI's encoder did on it, issue 35).
        # orjson writes a float32 array as the shortest text that reads back as the same float32
        # (json's float64 text: 0.94 s and 46 MB per 100 vectors of 41 x 576 floats; orjson's
        # 0.06 s and 26 MB)
        parts = []
        for i, v in enumerate(res.vectors):
            if fmt == "base64":
                vec = base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
                parts.append(dumps({"object": "embedding", "index": i, "embedding": vec}))
            else:
                parts.append(orjson.dumps(
                    {"object": "embedding", "index": i,
                     "embedding": np.ascontiguousarray(v, dtype=np.float32)},
                    option=orjson.OPT_SERIALIZE_NUMPY))
        n = res.total_tokens
        tail = dumps({"model": st.model_name, "usage": {"prompt_tokens": n, "total_tokens": n}})
        return b'{"object":"list","data":[' + b",".join(parts) + b"]," + tail[1:]
    # (not timed: the engine's work is done; a 503 would throw it away)
    return json_response(await st.prep.run(body, timed=False))


@router.post("/v1/rerank")
@router.post("/v1/reranking", include_in_schema=False)
@router.post("/rerank", include_in_schema=False)
@router.post("/reranking", include_in_schema=False)
async def rerank(body: RerankRequest, request: Request, engine=Depends(get_engine)):
    st = get_state(request)
    if not getattr(engine, "reranks", False):
        raise NotServed("this server does not rerank: start it with `llamagen serve --embeddings "
                        "--pooling rank` and a reranker model", code="rerank_not_enabled")
    if not body.documents:
        raise InvalidRequest("documents must not be empty", param="documents")
    if body.top_n is not None and body.top_n < 1:
        raise InvalidRequest(f"top_n must be at least 1, got {body.top_n}", param="top_n")
    res = await _engine_call(engine.rerank(body.query, body.documents), "documents")
    results = []
    for i, row in enumerate(res.vectors):
        r = {"index": i, "relevance_score": float(row[0])}
        if body.return_documents:
            r["document"] = {"text": body.documents[i]}
        results.append(r)
    results.sort(key=lambda r: -r["relevance_score"])      # stable: ties keep input order
    if body.top_n is not None:
        results = results[:body.top_n]
    n = res.total_tokens
    return {"model": st.model_name, "object": "list", "results": results,
            "usage": {"prompt_tokens": n, "total_tokens": n}}
