"""Sampler configurations as the benchmarks take them (``{name: {SamplingParams field: value}}``,
``{name: SamplingParams}`` or a list of ``{"name": ..., field: value}``), shared by the speed
sweep (bench.py) and the quality sweep (quality.py)."""
from __future__ import annotations

from typing import Any, Iterable, List, Mapping, Optional, Tuple, Union

from llamagen.sampling import FIELDS, SamplingParams

ConfigSpec = Union[Mapping[str, Any], SamplingParams]
Configs = Union[Mapping[str, ConfigSpec], Iterable[Mapping[str, Any]]]

_PLOT_HINT = 'plotting needs matplotlib: pip install "llamagen[plot]"'


def _normalize_configs(configs: Optional[Configs], default: Mapping[str, Mapping[str, Any]]
                       ) -> List[Tuple[str, ConfigSpec]]:
    """[(name, fields dict or SamplingParams)] from any accepted form (None: ``default``);
    structural errors raise."""
    if configs is None:
        return [(name, dict(spec)) for name, spec in default.items()]
    out: List[Tuple[str, ConfigSpec]] = []
    if isinstance(configs, Mapping):
        for name, spec in configs.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"configuration names must be non-empty strings, got {name!r}")
            if not isinstance(spec, (Mapping, SamplingParams)):
                raise TypeError(f"configuration {name!r} must be a dict of SamplingParams fields "
                                f"or a SamplingParams, got {type(spec).__name__}")
            out.append((name, spec if isinstance(spec, SamplingParams) else dict(spec)))
    elif isinstance(configs, (str, bytes)) or not isinstance(configs, Iterable):
        raise TypeError("configs must be a dict {name: fields}, a list of {'name': ..., fields}, "
                        f"or None, got {type(configs).__name__}")
    else:
        seen = set()
        for i, item in enumerate(configs):
            if not isinstance(item, Mapping):
                raise TypeError(f"configuration #{i} must be a dict with a 'name', "
                                f"got {type(item).__name__}")
            fields = dict(item)
            name = fields.pop("name", None)
            if not isinstance(name, str) or not name:
                raise ValueError(f"configuration #{i} needs a non-empty string 'name'")
            if name in seen:
                raise ValueError(f"configuration name {name!r} is used twice")
            seen.add(name)
            out.append((name, fields))
    return out


def _check_fields(fields: Mapping[str, Any], name: str) -> None:
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ValueError(f"configuration {name!r}: unknown sampling parameter(s): "
                         f"{', '.join(unknown)} (valid: {', '.join(FIELDS)})")


def _make_params(name: str, spec: ConfigSpec, max_new_tokens: int, ignore_eos: bool) -> SamplingParams:
    if isinstance(spec, SamplingParams):
        return spec.replace(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)
    _check_fields(spec, name)
    fields = {"max_new_tokens": max_new_tokens, "ignore_eos": ignore_eos}
    fields.update(spec)
    return SamplingParams(**fields)


def _require_matplotlib():
    try:
        from matplotlib.figure import Figure
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError as e:
        raise ImportError(_PLOT_HINT) from e
    return Figure
