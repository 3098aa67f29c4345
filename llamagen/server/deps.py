"""What the routes depend on (FastAPI's "bigger applications" layout): the server's shared
state and the engine, as dependencies.  Routers import this module, never app.py."""
from __future__ import annotations

import time
import weakref
from typing import Iterable, Optional

from fastapi import Request

import llamagen

from llamagen.server.responses_format import ResponseStore
from llamagen.server.errors import Overloaded
from llamagen.server.metrics import Metrics
from llamagen.server.work import Preparation


# sequences one request may ask for (prompts x n): 1,000 prompts x n=128 was 128,000 sequences,
# submitted at once, and the next client waited 185 s (issue 35)
DEFAULT_MAX_REQUEST_SEQUENCES = 1024


class ServerState:
    """What the routes share, at ``app.state.llamagen``."""

    def __init__(self, *, engine, model_name: str, api_keys: Iterable[str], ping_interval: float,
                 preparation: Optional[Preparation] = None,
                 max_request_sequences: int = DEFAULT_MAX_REQUEST_SEQUENCES,
                 request_window: Optional[int] = None):
        self.engine = engine
        self.max_request_sequences = max_request_sequences     # prompts x n of one request
        # sequences of a request of many prompts in the engine while others are there too
        # (None: decided by shared_window once the engine is up)
        self.request_window = request_window
        self.sources: weakref.WeakSet = weakref.WeakSet()   # requests generating now (streams.py)
        self.prep = preparation or Preparation()     # request preparation off the event loop
        self.load_error: Optional[BaseException] = None
        self.model_name = model_name
        self.api_keys = tuple(k.encode() for k in api_keys)
        self.ping_interval = ping_interval
        self.created = int(time.time())
        self.metrics = Metrics(model_name, lambda: self.engine)
        self.responses = ResponseStore()      # for previous_response_id (Responses API)
        self.slot_save_path: Optional[str] = None     # --slot-save-path (slots.py)

    def shared_window(self, engine) -> int:
        """--request-window, else 1 where the model runs on the CPU (each sequence of a step
        costs about as much as the first there: others' streams stay within ~2x) and twice the
        engine's slots on a GPU (extra rows nearly free)."""
        if self.request_window is None:
            gpu = getattr(getattr(engine, "model", None), "n_gpu_layers", 0) != 0 and \
                any(d.type == "gpu" for d in llamagen.backend_devices())
            self.request_window = 2 * getattr(engine, "n_parallel", 1) if gpu else 1
        return self.request_window


def get_state(request: Request) -> ServerState:
    return request.app.state.llamagen


def get_engine(request: Request):
    """The engine, or 503 while it is being created."""
    st = get_state(request)
    if st.engine is None:
        if st.load_error is not None:
            raise Overloaded(f"the model failed to load: {st.load_error}", retry_after=60)
        raise Overloaded("the model is loading", retry_after=5, code="loading")
    return st.engine
