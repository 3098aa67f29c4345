"""API-key check, as a FastAPI dependency: ``Authorization: Bearer KEY`` (OpenAI's clients) or
``x-api-key: KEY`` (Anthropic's).  Keys are compared in constant time."""
from __future__ import annotations

import hmac

from fastapi import Request

from llamagen.server.errors import Unauthorized


def _offered(request: Request) -> list[bytes]:
    out = []
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, cred = auth.partition(" ")
        if scheme.lower() == "bearer" and cred.strip():
            out.append(cred.strip().encode())
    key = request.headers.get("x-api-key")
    if key:
        out.append(key.strip().encode())
    return out


def require_api_key(request: Request) -> None:
    keys = request.app.state.llamagen.api_keys
    if not keys:
        return
    offered = _offered(request)
    if not offered:
        raise Unauthorized("missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'")
    ok = False
    for o in offered:
        for k in keys:
            # no early exit: the time taken does not tell which key, or how much of it, matched
            ok |= hmac.compare_digest(o, k)
    if not ok:
        raise Unauthorized("invalid API key")
