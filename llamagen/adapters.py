"""LoRA adapters and control vectors for a whole engine: loading what the server's flags name,
and reading a request's adapter set (by adapter or by its index in the engine's list, as
llama-server numbers them).  The adapters themselves are llamagen.LoraAdapter /
llamagen.ControlVector (the compiled core); docs/adapters.md."""
from __future__ import annotations

import numbers
import os
from typing import Iterable, List, Optional, Sequence, Tuple

from llamagen._core import ControlVector, LoraAdapter, Model
from llamagen.errors import invalid

__all__ = ["load_loras", "lora_arg", "parse_scaled", "control_vector_from"]


def parse_scaled(items: Iterable[str], flag: str) -> List[Tuple[str, float]]:
    """llama-server's ``FNAME:SCALE,...`` flag values -> [(path, scale)] (ValueError naming
    ``flag`` for a malformed one)."""
    out = []
    for value in items:
        for item in value.split(","):
            path, sep, scale = item.rpartition(":")
            if not sep or not path:
                raise ValueError(f"{flag} takes FNAME:SCALE[,FNAME:SCALE...], got {item!r}")
            try:
                out.append((path, float(scale)))
            except ValueError:
                raise ValueError(f"{flag}: the scale of {path!r} is not a number: {scale!r}") from None
    return out


def _split(items: Iterable[str]) -> List[str]:
    return [p for v in items for p in v.split(",") if p]


def load_loras(model: Model, specs: Optional[Sequence]) -> List[Tuple[LoraAdapter, float]]:
    """Adapters for ``model``: each spec a path, a (path, scale) pair or a LoraAdapter (scale 1).
    A bad file raises AdapterLoadError / FileNotFoundError before anything is served."""
    out = []
    for spec in specs or ():
        scale = 1.0
        if isinstance(spec, tuple):
            spec, scale = spec
        if isinstance(spec, LoraAdapter):
            if spec.model is not model:
                raise invalid(ValueError, "lora", f"the LoRA adapter {spec.path!r} was loaded for another model")
            out.append((spec, float(scale)))
        else:
            out.append((LoraAdapter(model, os.fspath(spec)), float(scale)))
    return out


def lora_arg(adapters: Sequence[LoraAdapter], value):
    """A request's ``lora`` as SamplingParams takes it: {adapter: scale} where ``value`` may name
    adapters by their index in ``adapters`` ({0: 0.5}, as llama-server's ``[{"id", "scale"}]``)
    or by object; adapters it does not name are off (scale 0), as in llama-server."""
    if value is None or isinstance(value, LoraAdapter):
        return value
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = [(v, 1.0) if isinstance(v, (LoraAdapter, numbers.Integral)) else v for v in value]
    else:
        return value                    # (SamplingParams explains what it takes)
    out = []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            return value
        key, scale = item
        if isinstance(key, numbers.Integral) and not isinstance(key, bool):
            if not 0 <= key < len(adapters):
                have = (f"ids 0 to {len(adapters) - 1}" if adapters else
                        "none: the server was started without --lora")
                raise invalid(ValueError, "lora", f"lora names adapter id {key}; the loaded adapters have {have}")
            key = adapters[key]
        out.append((key, scale))
    return out


def control_vector_from(spec) -> Optional[ControlVector]:
    """A ControlVector from a ControlVector, a path, or a list of paths / (path, strength)."""
    if spec is None or isinstance(spec, ControlVector):
        return spec
    return ControlVector(spec)


def flag_specs(a) -> Tuple[list, Optional[list], Optional[Tuple[int, int]], bool]:
    """What ``llamagen serve``'s adapter flags ask for: (lora specs, control vector specs,
    layer range, init without apply)."""
    loras = [(p, 1.0) for p in _split(a.lora or ())] + parse_scaled(a.lora_scaled or (), "--lora-scaled")
    cvecs = [(p, 1.0) for p in _split(a.control_vector or ())] + \
        parse_scaled(a.control_vector_scaled or (), "--control-vector-scaled")
    layers = tuple(a.control_vector_layer_range) if a.control_vector_layer_range else None
    return loras, (cvecs or None), layers, bool(getattr(a, "lora_init_without_apply", False))
