"""The caller's side of a request: an async iterator (EngineStream) or a blocking one
(SyncStream) over the chunks the engine thread delivers; closing either cancels the request."""
from __future__ import annotations

import asyncio
import queue
from collections import deque
from typing import TYPE_CHECKING, Callable, List, Optional

from llamagen.engine.types import Choice, EngineChunk, EngineResult, Usage

if TYPE_CHECKING:       # (the engine imports this module: names for annotations only)
    from llamagen.engine.engine import AsyncEngine, _Request

__all__ = ["EngineStream", "SyncStream"]

_DONE = object()     # the last item of every request


class _StreamBase:
    def __init__(self, engine: AsyncEngine, n_prompt: int):
        self._engine = engine
        self._req: Optional[_Request] = None
        self.n_prompt_tokens = n_prompt
        self._ended = False

    @property
    def id(self) -> int:
        return self._req.id

    @property
    def usage(self) -> Usage:
        return Usage(self.n_prompt_tokens, self._req.completion, self._req.cached,
                     self._req.drafted, self._req.accepted)

    def _take(self, item) -> Optional[EngineChunk]:
        """The chunk, None at the end, or the request's error raised."""
        if item is _DONE or isinstance(item, BaseException):
            self._ended = True
            if item is not _DONE:
                raise item
            return None
        return item

    def cancel(self) -> None:
        """Cancel the request at the engine's next step (any thread)."""
        if self._req is not None and not self._ended:
            self._engine._cancel(self._req)

    def __del__(self):
        try:
            self.cancel()
        except Exception:
            pass

    def _collect(self, chunks) -> EngineResult:
        choices = [Choice(i) for i in range(self._req.n)]
        texts: List[List[str]] = [[] for _ in choices]
        prompt_lps = None
        for c in chunks:
            if c.prompt_logprobs is not None and c.index == 0:
                prompt_lps = c.prompt_logprobs
            ch = choices[c.index]
            texts[c.index].append(c.text)
            ch.tokens.extend(c.token_ids)
            if c.logprobs is not None:
                if ch.logprobs is None:
                    ch.logprobs = []
                ch.logprobs.extend(c.logprobs)
            if c.finish_reason is not None:
                ch.finish_reason = c.finish_reason
                ch.stop_sequence = c.stop_sequence
        for ch, t in zip(choices, texts):
            ch.text = "".join(t)
        return EngineResult(choices, self.usage, prompt_lps)


class EngineStream(_StreamBase):
    """Async iterator of EngineChunks for one request (returned by AsyncEngine.stream)."""

    def __init__(self, engine, n_prompt, loop):
        super().__init__(engine, n_prompt)
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._buf: deque = deque()

    def _deliverer(self) -> Callable[[list], None]:
        """What the engine thread calls with new items.  It holds the queue, not the stream, so
        a dropped stream is collected (and its __del__ cancels the request)."""
        loop, put = self._loop, self._queue.put_nowait

        def deliver(items):
            loop.call_soon_threadsafe(put, items)     # RuntimeError once the loop is closed
        return deliver

    def __aiter__(self):
        return self

    async def __anext__(self) -> EngineChunk:
        if self._ended:
            raise StopAsyncIteration
        if not self._buf:
            try:
                self._buf.extend(await self._queue.get())
            except asyncio.CancelledError:
                self.cancel()
                raise
        chunk = self._take(self._buf.popleft())
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        self.cancel()
        self._ended = True

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    async def collect(self) -> EngineResult:
        """Read the rest of the stream into an EngineResult."""
        return self._collect([c async for c in self])


class SyncStream(_StreamBase):
    """Blocking iterator of EngineChunks (AsyncEngine.stream_sync), for plain threads."""

    def __init__(self, engine, n_prompt):
        super().__init__(engine, n_prompt)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._buf: deque = deque()

    def __iter__(self):
        return self

    def __next__(self) -> EngineChunk:
        if self._ended:
            raise StopIteration
        if not self._buf:
            self._buf.extend(self._queue.get())
        chunk = self._take(self._buf.popleft())
        if chunk is None:
            raise StopIteration
        return chunk

    def close(self) -> None:
        self.cancel()
        self._ended = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def collect(self) -> EngineResult:
        return self._collect(list(self))
