"""AsyncEngine: continuous batching behind an asyncio (and thread-safe) request API.

One engine thread owns a Context and a BatchGenerator and steps the batch (each decode releases
the GIL); callers on any event loop or plain thread submit requests and receive chunks.  A request
that arrives while others generate joins the running batch at the next step.  The context uses a
unified KV cache, so a burst of prompts is prefilled together, and the prompt cache keeps a
finished sequence's cells in its slot for the next request with the same prefix.

The package: ``types`` (what the engine hands out), ``streams`` (the caller's iterators),
``engine`` (the facade that validates and submits, and the engine thread's loop).
"""
from llamagen.engine.engine import AsyncEngine
from llamagen.engine.streams import EngineStream, SyncStream
from llamagen.engine.types import (
    Choice, EngineChunk, EngineResult, EngineStats, PreparedRequest, Usage,
)

__all__ = ["AsyncEngine", "EngineChunk", "EngineResult", "EngineStats", "EngineStream", "Choice",
           "Usage", "SyncStream", "PreparedRequest"]
