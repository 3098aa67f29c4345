"""The server's ASGI middleware, one job each (plain ASGI: no body is read twice, and later
``receive`` calls go to the server, so disconnects still reach the routes)."""
from __future__ import annotations

from llamagen.server.errors import InvalidRequest, PayloadTooLarge, dumps, error_body


class ErrorCount:
    """Counts every error response (status >= 400) for /metrics, the middleware's own included."""

    def __init__(self, app, metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        metrics = self.metrics

        async def counting_send(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                metrics.http_error(message["status"])
            await send(message)
        await self.app(scope, receive, counting_send)


class JsonBody:
    """Every POST body here is JSON: one sent as a form (`curl -d`, as llama-server's users do)
    is read as JSON."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "POST":
            headers = list(scope.get("headers", ()))
            ctype = next((v for k, v in headers if k == b"content-type"), b"")
            if b"json" not in ctype.lower():
                headers = [(k, v) for k, v in headers if k != b"content-type"]
                headers.append((b"content-type", b"application/json"))
                scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)


class BodyLimit:
    """A body over ``max_bytes`` gets 413 before any route reads it (by its Content-Length, or
    as it arrives: the body is buffered, bounded, and replayed to the app)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    @staticmethod
    async def _reject(scope, send, status_cls, message):
        err = status_cls(message)
        body = dumps(error_body(scope.get("path", ""), err))
        await send({"type": "http.response.start", "status": err.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await self._reject(scope, send, InvalidRequest, "invalid Content-Length")
                if declared > limit:
                    return await self._reject(
                        scope, send, PayloadTooLarge,
                        f"request body of {declared} bytes is over the limit of {limit} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":   # a disconnect before the body ended
                return
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return await self._reject(scope, send, PayloadTooLarge,
                                          f"request body is over the limit of {limit} bytes")
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()
        await self.app(scope, replay, send)
