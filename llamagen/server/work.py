"""Request preparation off the event loop.

Rendering a chat template, converting a JSON schema, building a grammar and tokenizing a long
prompt run in C++ without the GIL, but on the event loop's thread they would still stop it: while
one large request was prepared, /health did not answer and every stream paused (issue 26).  Routes
run that work through ``off_loop``: in a worker thread, a bounded number at a time, with a time
budget.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, TypeVar

import anyio
from starlette.responses import Response, StreamingResponse

from llamagen.server.errors import Overloaded

T = TypeVar("T")

# The niceness of preparation threads: on a machine whose cores the engine's decode threads keep
# busy, a large preparation (15 MB to tokenize) would take a core's share from decoding and slow
# every stream; at a lower priority it runs in what the engine leaves (and at full speed when the
# engine is idle).  Linux threads have their own niceness; elsewhere this is a no-op.
PREPARE_NICE = 10
_niced = threading.local()


def _yielding(fn, args):
    if not getattr(_niced, "done", False):
        _niced.done = True
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                           max(os.getpriority(os.PRIO_PROCESS, 0), PREPARE_NICE))
        except (AttributeError, OSError):
            pass
    return fn(*args)

DEFAULT_PREPARE_THREADS = 4        # requests prepared at once; more wait (2 cores here)
DEFAULT_PREPARE_TIMEOUT = 30.0     # seconds; the library's own budgets (template, schema) are
                                   # tighter, this bounds a request that waits for a thread too


class Preparation:
    """The worker threads' limiter and time budget of one server."""

    def __init__(self, threads: int = DEFAULT_PREPARE_THREADS,
                 timeout: float = DEFAULT_PREPARE_TIMEOUT):
        if threads < 1:
            raise ValueError("prepare threads must be >= 1")
        if not timeout > 0:
            raise ValueError("prepare timeout must be > 0 seconds")
        self.limiter = anyio.CapacityLimiter(threads)
        self.timeout = timeout

    async def run(self, fn: Callable[..., T], *args, timed: bool = True) -> T:
        """``fn(*args)`` in a worker thread; its exception is raised here.  Past the timeout the
        request gets a 503 (the thread finishes its bounded work in the background).
        ``timed=False``: no timeout, for work bounded by what the engine already did (encoding
        its answer: a 503 then would throw that work away)."""
        try:
            with anyio.fail_after(self.timeout if timed else None):
                return await anyio.to_thread.run_sync(_yielding, fn, args, limiter=self.limiter,
                                                      abandon_on_cancel=True)
        except TimeoutError:
            raise Overloaded(f"preparing the request took more than {self.timeout:g} s",
                             code="preparation_timeout") from None


# Responses bigger than this go to the socket a piece at a time, the event loop free between
# pieces (1,000 per-token embedding answers are hundreds of MB: one write would copy them all
# into the transport's buffer at once)
RESPONSE_PIECE = 1 << 20


def json_response(data: bytes) -> Response:
    """Encoded JSON as a response; a large one is sent in pieces, with its Content-Length, so
    the event loop serves others between them."""
    if len(data) <= RESPONSE_PIECE:
        return Response(data, media_type="application/json")

    async def pieces():
        view = memoryview(data)
        for i in range(0, len(data), RESPONSE_PIECE):
            yield view[i:i + RESPONSE_PIECE]
    return StreamingResponse(pieces(), media_type="application/json",
                             headers={"content-length": str(len(data))})
