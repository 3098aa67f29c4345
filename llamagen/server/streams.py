"""The one place engine streams are consumed.

``ChunkSource`` reads one or more engine streams (several prompts of one completions request,
submitted a window at a time) in pump tasks into a queue, so that the HTTP side can wait for "the next chunk of any stream, or a
keep-alive tick" and a slow client never holds up the engine.  Closing it (always, in a
``finally``) cancels every engine request that has not finished.  ``open_source`` prepares and
submits a request's streams; ``collect`` gathers a non-streamed answer.
"""
from __future__ import annotations

import asyncio
import weakref
from typing import AsyncIterator, Optional, Sequence, Union

import anyio
from starlette.requests import Request

from llamagen.server.errors import APIError, ClientClosed
from llamagen.server.translate import engine_error, generation_error


class _End:
    __slots__ = ("k",)

    def __init__(self, k):
        self.k = k


class _Failed:
    __slots__ = ("k", "exc")

    def __init__(self, k, exc):
        self.k, self.exc = k, exc


Tick = None   # what ChunkSource.events yields when ``ping_interval`` passed without a chunk


class ChunkSource:
    """(k, chunk) pairs from the engine streams of a request's prompts, in arrival order.

    ``pending``: prepared requests (one per prompt) submitted with ``submit`` as earlier ones end,
    so that at most ``window`` sequences of this request are in the engine at once (at least one
    prompt): a request of many prompts takes its turns between other clients' requests instead
    of queueing all its sequences ahead of them.  While ``peers`` (the server's running sources,
    this one among them once started) holds others, at most ``shared`` (default ``window``): on
    a CPU each sequence of a step costs about as much as the first, and every one this request
    adds slows the other clients' streams."""

    def __init__(self, pending: Sequence, submit, n: int = 1, window: Optional[int] = None,
                 shared: Optional[int] = None, peers=None):
        self.n = n
        self.streams: list = []
        self._pending = list(pending)
        self._total = len(self._pending)
        self._submit = submit
        self._per_stream = max(1, n)
        self._window = max(1, (window or self._total * self._per_stream) // self._per_stream)
        self._shared = self._window if shared is None else \
            min(self._window, max(1, shared // self._per_stream))
        self._peers = peers if peers is not None else weakref.WeakSet()
        self._ended = 0
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []
        self._closed = False
        self._unfinished: dict = {}     # stream -> choices without a finish_reason yet

    def _open_next(self) -> None:
        """Submit the next prompt's request and start pumping it (on the event loop)."""
        k = len(self.streams)
        self.streams.append(self._submit(self._pending[k]))
        self._pending[k] = None
        self._pumps.append(asyncio.ensure_future(self._pump(k, self.streams[k])))

    async def _pump(self, k: int, stream) -> None:
        put = self._queue.put_nowait
        try:
            async for chunk in stream:
                put((k, chunk))
        except asyncio.CancelledError:
            raise
        except BaseException as e:   # noqa: BLE001 - handed to the consumer, which reports it
            put(_Failed(k, e))
            return
        put(_End(k))

    def _fill(self) -> None:
        """Submit prompts until the window (alone) or the shared window is in the engine."""
        window = self._window
        if self._shared < window and any(p is not self for p in self._peers):
            window = self._shared
        while len(self.streams) < self._total and len(self.streams) - self._ended < window:
            self._open_next()

    def start(self) -> None:
        """Submit the first window's requests (an engine error is raised here)."""
        self._peers.add(self)
        self._fill()

    async def events(self, ping_interval: Optional[float] = None
                     ) -> AsyncIterator[Union[tuple, None]]:
        """Yield (k, chunk) until every stream ended, or None (a tick) after ``ping_interval``
        seconds without a chunk.  An engine error is raised here."""
        self.start()
        queue = self._queue
        ended = 0
        while ended < self._total:
            try:
                item = queue.get_nowait()       # the common case: no timer, no task
            except asyncio.QueueEmpty:
                if ping_interval is None:
                    item = await queue.get()
                else:
                    try:
                        item = await asyncio.wait_for(queue.get(), ping_interval)
                    except asyncio.TimeoutError:
                        yield Tick
                        continue
            if isinstance(item, _End):
                ended += 1
                self._ended = ended
                if self._unfinished.get(item.k, self.n):
                    # every choice ends with a finish_reason; a stream that stops short of it
                    # would otherwise look like a complete, empty answer
                    raise RuntimeError("the engine ended the request without finishing it")
                self._fill()
            elif isinstance(item, _Failed):
                raise item.exc
            else:
                if item[1].finish_reason is not None:
                    self._unfinished[item[0]] = self._unfinished.get(item[0], self.n) - 1
                yield item
        self._peers.discard(self)     # (every stream ended: no longer a peer of others)

    async def aclose(self) -> None:
        """Cancel what still runs.  Shielded: this runs in ``finally`` blocks of cancelled tasks
        (a client disconnect cancels the response task) and must still reach the engine."""
        self._peers.discard(self)
        if self._closed:
            return
        self._closed = True
        self._pending = []
        with anyio.CancelScope(shield=True):
            for t in self._pumps:
                t.cancel()
            for t in self._pumps:
                try:
                    await t
                except BaseException:   # noqa: BLE001 - a cancelled pump, or its error: both done
                    pass
            for s in self.streams:
                try:
                    await s.aclose()
                except Exception:       # noqa: BLE001 - closing is best effort
                    pass

    def usage(self):
        """(prompt, completion, cached) token totals over the streams (final once ended)."""
        p = c = cached = 0
        for s in self.streams:
            u = s.usage
            p += u.prompt_tokens
            c += u.completion_tokens
            cached += u.cached_tokens
        return p, c, cached

    def draft_usage(self):
        """(drafted, accepted) speculative tokens over the streams (final once ended)."""
        d = a = 0
        for s in self.streams:
            d += s.usage.draft_tokens
            a += s.usage.accepted_draft_tokens
        return d, a


async def wait_disconnect(request: Request) -> None:
    """Return when the client has gone away (the server's http.disconnect message)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, coro):
    """Await ``coro``; if the client disconnects first, cancel it and raise ClientClosed.
    For non-streamed requests: without this a gone client's generation would run to the end."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientClosed("client disconnected")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                try:
                    await task
                except BaseException:   # noqa: BLE001 - its cleanup ran; the result is unwanted
                    pass


async def open_source(st, engine, prompts: Sequence, kwargs: dict, origin: dict, *,
                      n: int = 1, prompt_param: str = "prompt", add_special: bool = True,
                      parse_special: bool = True) -> ChunkSource:
    """Prepare one engine request per prompt off the event loop (``st``: the ServerState, whose
    work.Preparation runs it; the engine validates, tokenizes, converts schemas and checks
    grammars) and return the ChunkSource that submits them, the first window now (twice
    ``engine.n_parallel`` sequences, or ``st.shared_window`` while other requests run: a request
    of many prompts takes turns with others); an error is an APIError."""

    def work():
        return [engine.prepare(p, n=n, add_special=add_special, parse_special=parse_special,
                               **kwargs) for p in prompts]
    try:
        prepared = await st.prep.run(work)
    except APIError:
        raise
    except Exception as e:  # noqa: BLE001 - translated
        raise engine_error(e, {**origin, "n": "n"}, prompt_param) from None
    source = ChunkSource(prepared, engine.stream_prepared, n,
                         window=max(n, 2 * getattr(engine, "n_parallel", 1)),
                         shared=st.shared_window(engine), peers=st.sources)
    try:
        source.start()
    except Exception as e:  # noqa: BLE001 - translated
        await source.aclose()
        raise engine_error(e, {**origin, "n": "n"}, prompt_param) from None
    return source


class Collected:
    """The whole answer of a non-streamed request: text, finish reason and stop sequence per
    choice (keyed by (k, index))."""

    def __init__(self):
        self.texts: dict = {}
        self.finish: dict = {}
        self.stop_sequence: dict = {}
        self.logprobs: dict = {}          # (k, index) -> TokenLogprobs (requests that ask)
        self.prompt_logprobs: dict = {}   # (k, index) -> the prompt's (prompt_logprobs requests)


async def collect(source: ChunkSource, timer) -> Collected:
    out = Collected()
    try:
        async for k, c in source.events():
            key = (k, c.index)
            timer.chunk(key, c)
            out.texts.setdefault(key, []).append(c.text)
            if c.logprobs is not None:
                out.logprobs.setdefault(key, []).extend(c.logprobs)
            if c.prompt_logprobs is not None:
                out.prompt_logprobs[key] = c.prompt_logprobs
            if c.finish_reason is not None:
                out.finish[key] = c.finish_reason
                out.stop_sequence[key] = c.stop_sequence
        timer.done()
    finally:
        await source.aclose()
    return out


async def collected(request: Request, source: ChunkSource, timer) -> Collected:
    """A non-streamed request's whole answer (``collect``, cancelled when the client goes away);
    an engine error becomes the API error it stands for."""
    try:
        return await until_disconnect(request, collect(source, timer))
    except APIError:
        raise
    except Exception as e:  # noqa: BLE001 - translated
        raise generation_error(e) from None


async def one_choice(source: ChunkSource, timer, ping: Optional[float]):
    """The chunks of a one-prompt, one-choice request for an SSE body, each timed, with ``Tick``
    between them when a keep-alive ping is due (the caller writes it)."""
    async for item in source.events(ping):
        if item is Tick:
            yield Tick
            continue
        _, c = item
        timer.chunk(0, c)
        yield c
