"""Server-sent events framing: ``data:`` and ``event:`` frames, the keep-alive comment, the end
marker and the response headers.  Consuming engine streams is server/streams.py."""
from __future__ import annotations

from typing import Any

from llamagen.server.errors import dumps

PING = b": ping\n\n"          # an SSE comment: every client ignores it (a data ping would not parse)
DONE = b"data: [DONE]\n\n"

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def data(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def event(name: str, obj: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + dumps(obj) + b"\n\n"
