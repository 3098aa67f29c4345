"""The FastAPI application: ``create_app`` builds it around a ``llamagen.AsyncEngine``.

Routes (see docs/server.md): OpenAI's /v1/completions, /v1/chat/completions and /v1/responses,
Anthropic's /v1/messages and /v1/messages/count_tokens, /v1/models, /health, /metrics, /tokenize,
/detokenize, /tokenizer_info, /infill.  Every route but /health needs the API key when keys are configured.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Callable, Iterable, Optional

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.responses import JSONResponse, Response

from llamagen.server import adapters, anthropic, embeddings, infill, openai, responses, slots
from llamagen.server.auth import require_api_key
from llamagen.server.deps import (  # noqa: F401  (re-exported)
    DEFAULT_MAX_REQUEST_SEQUENCES, ServerState, get_engine, get_state,
)
from llamagen.server.errors import InvalidRequest, NotFound, dumps, install_handlers
from llamagen.server.metrics import CONTENT_TYPE
from llamagen.server.middleware import BodyLimit, ErrorCount, JsonBody
from llamagen.server.models import DetokenizeRequest, TokenizeRequest
from llamagen.server.work import (
    DEFAULT_PREPARE_THREADS, DEFAULT_PREPARE_TIMEOUT, Preparation, json_response,
)

log = logging.getLogger("llamagen.server")

DEFAULT_MAX_BODY_BYTES = 16 * 2**20   # far above any prompt a 2**31-token context could hold as JSON
DEFAULT_PING_INTERVAL = 15.0


def create_app(engine=None, *, engine_factory: Optional[Callable[[], object]] = None,
               model_name: Optional[str] = None, api_keys: Iterable[str] = (),
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               ping_interval: float = DEFAULT_PING_INTERVAL,
               on_fatal: Optional[Callable[[BaseException], None]] = None,
               close_engine: Optional[bool] = None, cors_origins: Iterable[str] = (),
               prepare_threads: int = DEFAULT_PREPARE_THREADS,
               prepare_timeout: float = DEFAULT_PREPARE_TIMEOUT,
               max_request_sequences: int = DEFAULT_MAX_REQUEST_SEQUENCES,
               slot_save_path: Optional[str] = None,
               request_window: Optional[int] = None) -> FastAPI:
    """The server app.

    Give either a ready ``engine`` (an AsyncEngine, closed at shutdown only if ``close_engine``)
    or an ``engine_factory`` called in a worker thread at startup (the server answers /health
    with 503 until it returns; the engine it makes is closed at shutdown).  ``on_fatal`` is
    called with the factory's exception if it fails.  ``api_keys``: accepted keys (none: no
    check).  ``ping_interval``: seconds without a chunk before a stream gets a ``: ping``.
    ``cors_origins``: origins whose browser pages may call the API ("*": any); none: no CORS
    headers, so browsers keep other sites' pages out.  ``prepare_threads`` /
    ``prepare_timeout``: requests prepared at once in worker threads (template, schema, grammar,
    tokens) and the seconds one may take, waiting included, before it gets a 503.
    ``max_request_sequences``: the most sequences (prompts x n) one request may ask for (400).
    ``request_window``: sequences of a request of many prompts in the engine at once while other
    requests are there too (None: 1 on the CPU, twice the engine's n_parallel on a GPU; alone,
    twice n_parallel).
    """
    if (engine is None) == (engine_factory is None):
        raise TypeError("create_app needs exactly one of engine and engine_factory")
    if close_engine is None:
        close_engine = engine is None
    if model_name is None:
        model_name = _default_name(engine) if engine is not None else "llamagen"
    keys = [k for k in api_keys]
    for k in keys:
        if not isinstance(k, str) or not k:
            raise ValueError("API keys must be non-empty strings")
    state = ServerState(engine=engine, model_name=model_name, api_keys=keys,
                        ping_interval=ping_interval,
                        preparation=Preparation(prepare_threads, prepare_timeout),
                        max_request_sequences=max_request_sequences,
                        request_window=request_window)
    state.slot_save_path = slot_save_path     # POST /slots/{id}?action=save|restore (slots.py)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = None
        if state.engine is None:
            loading = asyncio.ensure_future(_load(state, engine_factory, on_fatal))
        try:
            yield
        finally:
            # shielded: uvicorn may be cancelling us, and the engine thread must still stop
            with anyio.CancelScope(shield=True):
                if loading is not None:
                    await loading          # a factory in a thread cannot be interrupted
                if close_engine and state.engine is not None:
                    await state.engine.aclose()

    app = FastAPI(title="llamagen", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.llamagen = state
    install_handlers(app)
    # innermost first: the body limit, JSON bodies, then every error response counted
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(JsonBody)
    app.add_middleware(ErrorCount, metrics=state.metrics)
    origins = [o for o in cors_origins]
    for o in origins:
        if not isinstance(o, str) or not o or (o != "*" and "://" not in o):
            raise ValueError(f"a CORS origin is '*' or scheme://host[:port], got {o!r}")
    if origins:
        from starlette.middleware.cors import CORSMiddleware
        # outermost: a browser's preflight is answered before the key check (it carries no key);
        # the request that follows is checked as any other
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], max_age=600)

    app.include_router(_public)
    app.include_router(_protected)
    app.include_router(openai.router)
    app.include_router(embeddings.router)
    app.include_router(anthropic.router)
    app.include_router(responses.router)
    app.include_router(infill.router)
    app.include_router(adapters.router)
    app.include_router(slots.router)
    return app


def _default_name(engine) -> str:
    import os
    path = getattr(engine.model, "path", None)
    return os.path.basename(path) if path else "llamagen"


async def _load(state: ServerState, factory, on_fatal) -> None:
    t0 = time.perf_counter()
    try:
        engine = await asyncio.to_thread(factory)
    except BaseException as e:   # noqa: BLE001 - reported, and the server told to exit
        state.load_error = e
        log.error("the engine could not be created: %s", e)
        if on_fatal is not None:
            on_fatal(e)
        return
    state.engine = engine
    log.info("engine ready in %.1f s (n_ctx %s, %s parallel sequences)",
             time.perf_counter() - t0, getattr(engine, "n_ctx", "?"),
             getattr(engine, "n_parallel", "?"))


# -- routes without generation --------------------------------------------------------------

_public = APIRouter()
_protected = APIRouter(dependencies=[Depends(require_api_key)])


@_public.get("/health")
async def health(request: Request):
    st = get_state(request)
    if st.engine is not None:
        return {"status": "ok"}
    status = "error" if st.load_error is not None else "loading"
    return JSONResponse({"status": status}, status_code=503,
                        headers={"Retry-After": "5"})


def _model_card(st: ServerState) -> dict:
    card = {"id": st.model_name, "object": "model", "created": st.created, "owned_by": "llamagen"}
    e = st.engine
    if e is not None:
        m = e.model
        card["meta"] = {"n_ctx": e.n_ctx, "n_parallel": e.n_parallel, "n_vocab": m.n_vocab,
                        "n_ctx_train": m.n_ctx_train, "description": m.description}
    return card


@_protected.get("/v1/models")
@_protected.get("/models", include_in_schema=False)          # llama-server's alias
async def list_models(request: Request):
    return {"object": "list", "data": [_model_card(get_state(request))]}


@_protected.get("/v1/models/{model_id:path}")
@_protected.get("/models/{model_id:path}", include_in_schema=False)
async def get_model(model_id: str, request: Request):
    st = get_state(request)
    if model_id != st.model_name:
        raise NotFound(f"model {model_id!r} not found; this server serves {st.model_name!r}",
                       param="model", code="model_not_found")
    return _model_card(st)


@_protected.get("/metrics")
async def metrics(request: Request):
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE)


@_protected.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request, engine=Depends(get_engine)):
    if (body.content is None) == (body.prompt is None):
        raise InvalidRequest("give the text as 'content' (llama-server) or 'prompt' (vLLM), "
                             "exactly one of them", param="content")
    vllm = body.prompt is not None
    text, field = (body.prompt, "prompt") if vllm else (body.content, "content")
    # (vLLM adds the model's special tokens unless told not to; llama-server does not)
    add_special = (body.add_special_tokens if body.add_special_tokens is not None else True) \
        if vllm else body.add_special

    def work():
        try:
            tokens = engine.tokenize(text, add_special=add_special,
                                     parse_special=body.parse_special)
        except ValueError as e:         # (a lone surrogate: not UTF-8 text)
            raise InvalidRequest(f"{field}: {e}", param=field) from None
        if vllm:
            return dumps({"count": len(tokens), "max_model_len": engine.n_ctx,
                          "tokens": tokens, "token_strs": None})
        if not body.with_pieces:
            return dumps({"tokens": tokens})
        return dumps({"tokens": [{"id": t, "piece": engine.detokenize([t])} for t in tokens]})
    # (serialized in the worker too: FastAPI's encoder took seconds on the event loop for the
    # millions of ids of a 15 MB text, issue 35)
    return json_response(await get_state(request).prep.run(work))


@_protected.post("/detokenize")
async def detokenize(body: DetokenizeRequest, engine=Depends(get_engine)):
    n_vocab = engine.model.n_vocab
    for i, t in enumerate(body.tokens):
        if not 0 <= t < n_vocab:
            raise InvalidRequest(f"tokens[{i}] = {t} is not a token id (0 to {n_vocab - 1})",
                                 param=f"tokens[{i}]")
    text = engine.detokenize(body.tokens)
    return {"content": text, "prompt": text}        # (llama-server's key, and vLLM's)


@_protected.get("/tokenizer_info")
async def tokenizer_info(engine=Depends(get_engine)):
    """vLLM's tokenizer description, which lm-eval's remote tokenizer reads (``eos_token``,
    ``bos_token`` as text; its /tokenize then maps them back to ids)."""
    m = engine.model

    def piece(t):
        return None if t is None else m.token_to_piece(t, special=True).decode("utf-8", "replace")
    return {"tokenizer_class": "llama.cpp", "eos_token": piece(m.eos), "bos_token": piece(m.bos),
            "pad_token": None, "unk_token": None, "chat_template": m.chat_template,
            "model_max_length": engine.n_ctx, "vocab_size": m.n_vocab, "add_bos_token": m.add_bos}
