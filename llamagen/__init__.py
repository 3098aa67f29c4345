"""llamagen: stream tokens out of llama.cpp into Python, fast and correctly."""
from __future__ import annotations

from typing import NamedTuple

from llamagen import _core
from llamagen._core import (
    QUANT_TYPES, BatchGenerator, Context, ControlVector, GenerationState, LoraAdapter, Model,
    QuantizeResult, build_info, quantize, set_template_budget, system_info, template_budget,
)
from llamagen.batch import BatchResult, generate_batch, map_generate
from llamagen.embeddings import EmbedResult, embed, map_embed, rerank
from llamagen.engine import AsyncEngine, EngineChunk, EngineResult, EngineStats, Usage
from llamagen.generation import gen_begin, gen_end, gen_next, gen_resume, generate
from llamagen.logprobs import Completion, ScoreResult, TokenLogprob, TopLogprob, score
from llamagen.structured import schema_to_grammar
from llamagen import chat, tools  # noqa: F401  (llamagen.chat.prepare, llamagen.tools)
from llamagen.sampling import SamplingParams
from llamagen.speculative import Speculative
from llamagen.errors import (
    AdapterLoadError, ContextError, DecodeError, EngineClosedError, GenerationError, GrammarError,
    InvalidParamError, InvalidParamTypeError, KVCacheFullError, LlamaError, ModelLoadError,
    PromptTooLongError, QuantizeError, QueueFullError, RequestCancelledError, StaleStateError,
)

__version__ = "0.1.0"


class Device(NamedTuple):
    """A ggml backend device: name, description, type ("cpu", "gpu", ...), total memory in bytes."""
    name: str
    description: str
    type: str
    memory: int


def backend_devices() -> list[Device]:
    """The compute devices llama.cpp can use in this build."""
    return [Device(*d[:4]) for d in _core._backend_devices()]


__all__ = [
    "Model", "Context", "GenerationState", "SamplingParams", "Speculative", "gen_begin", "gen_next", "gen_end", "gen_resume",
    "generate", "BatchGenerator", "BatchResult", "generate_batch", "map_generate", "Device", "backend_devices", "build_info", "system_info", "__version__",
    "set_template_budget", "template_budget", "LoraAdapter", "ControlVector", "AdapterLoadError",
    "quantize", "QuantizeResult", "QUANT_TYPES",
    "LlamaError", "ModelLoadError", "ContextError", "DecodeError", "KVCacheFullError",
    "StaleStateError", "GrammarError", "QuantizeError", "PromptTooLongError", "QueueFullError",
    "EngineClosedError", "InvalidParamError", "InvalidParamTypeError", "GenerationError",
    "RequestCancelledError", "AsyncEngine", "EngineChunk", "EngineResult", "EngineStats", "Usage",
    "embed", "map_embed", "rerank", "EmbedResult", "score", "ScoreResult", "Completion", "TokenLogprob", "TopLogprob", "schema_to_grammar",
]
