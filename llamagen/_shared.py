"""What every generation entry point shares: owning a context for a call, the number of samples,
their seeds, a progress bar.  Below generation, batch, logprobs, embeddings and engine (which all
import it), above _core and sampling: no cycles between the Python layers (issue 27)."""
from __future__ import annotations

import sys
from typing import List

from llamagen._core import Context
from llamagen.errors import invalid
from llamagen.sampling import SamplingParams

__all__ = ["MAX_N", "check_n", "seeded", "exclusive", "progress_bar"]

MAX_N = 128
_SEED_MOD = 0xFFFFFFFF       # seeds are ints in [0, 2**32 - 2]


def exclusive(ctx):
    """The context's lock, held for a whole call (TypeError for anything but a Context)."""
    if not isinstance(ctx, Context):
        raise TypeError(f"ctx must be a llamagen.Context, got {type(ctx).__name__}")
    return ctx._exclusive()


def check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise invalid(ValueError, "n", f"n must be an int from 1 to {MAX_N}, got {n!r}")
    return n


def seeded(p: SamplingParams, n: int) -> List[SamplingParams]:
    """n copies of ``p``; copy i samples with seed + i (a None seed stays None: fresh entropy)."""
    if n == 1:
        return [p]
    return [p.replace(seed=None if p.seed is None else (p.seed + i) % _SEED_MOD) for i in range(n)]


class _SimpleBar:
    def __init__(self, total, desc):
        self.total, self.n, self.out, self.desc = total, 0, sys.stderr, desc

    def update(self, k):
        self.n += k
        self.out.write(f"\r{self.desc}: {self.n}" + (f"/{self.total}" if self.total else ""))
        self.out.flush()

    def close(self):
        self.out.write("\n")


def progress_bar(total, desc="map_generate", unit="prompt"):
    """tqdm's bar when tqdm is installed, else a counter on stderr."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _SimpleBar(total, desc)
    return tqdm(total=total, desc=desc, unit=unit)
