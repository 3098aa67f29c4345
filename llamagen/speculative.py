"""Speculative decoding: draft several tokens, verify them in one decode, keep what the request's
own sampling would have chosen anyway.

``Speculative(type="ngram-mod", n_max=16)`` goes into ``SamplingParams(speculative=...)`` (or
``generate(..., speculative=...)``, ``BatchGenerator.add``, ``AsyncEngine``, ``llamagen serve
--spec-type``).  The drafters are llama.cpp's own (``common/speculative.h``): they look the last
tokens up in the sequence's history (prompt and output) and propose what followed them there.
Each drafted position is then sampled by the request's chain with its RNG, and a draft token is
kept only while it equals the sampled one, so the text is the one plain decoding gives wherever the
logits agree (see docs/speculative.md).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Optional

from llamagen.errors import invalid

__all__ = ["Speculative", "SPEC_TYPES", "coerce", "from_flags"]

# llama.cpp's self-speculative (n-gram) types at the pinned commit, by its names
NGRAM_TYPES = ("ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache")
# ... and its draft-model type (a smaller model sharing the vocabulary drafts greedily)
SPEC_TYPES = NGRAM_TYPES + ("draft-simple",)
# types llama.cpp knows that need an MTP/EAGLE head: named in the refusal
_MODEL_TYPES = ("draft-eagle3", "draft-mtp", "draft-dflash", "draft-dspark")
MAX_DRAFT = 64          # tokens verified in one decode per sequence (llama-server caps at 64 too)
MAX_NGRAM = 1024


def _count(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise invalid(TypeError, f"speculative.{name}",
                      f"speculative.{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if not lo <= value <= hi:
        raise invalid(ValueError, f"speculative.{name}",
                      f"speculative.{name} must be an int from {lo} to {hi}, got {value}")
    return value


@dataclass(frozen=True)
class Speculative:
    """How to draft.  ``type``: one of SPEC_TYPES (llama.cpp's n-gram drafters; ``ngram-mod``
    hashes every ``ngram_n``-gram of the history, ``ngram-simple`` searches the history for the
    last ``ngram_n`` tokens, ``ngram-map-k``/``-k4v`` keep a map of repeated n-grams,
    ``ngram-cache`` a 3-level n-gram cache).  ``n_max``: the most tokens drafted per step;
    ``n_min``: shorter drafts are not verified.  ``ngram_n`` / ``ngram_m`` / ``min_hits``: the
    drafter's n-gram size, its longest proposal and how often a key must have been seen (0:
    llama.cpp's defaults: 24 for ngram-mod, 12 and 48 for the others).  ``adaptive``: after
    drafts that were mostly rejected the draft length shrinks, down to pausing drafting for a
    while, so text the history does not predict costs little.  ``draft-simple`` drafts with
    ``draft_model`` (a ``llamagen.Model`` sharing the target's vocabulary, in a context of its
    own that follows each sequence's tokens).  ``exact``: a verify decode computes each of its rows
    with the kernels a one-row decode takes (CPU), so its logits are plain decoding's bit for bit
    and so is the text, greedy or seeded; False takes the many-row kernels (faster for weight
    types patch 0008 has no multi-row one-row-mode kernel for: Q4_K, Q6_K), whose rounding can
    flip a near-tie (docs/speculative.md).  It applies to single streams and to batch steps
    holding one sequence (a step with several sequences is a many-row batch either way)."""
    type: str = "ngram-mod"
    n_max: int = 16
    n_min: int = 0
    ngram_n: int = 0
    ngram_m: int = 0
    min_hits: int = 0
    adaptive: bool = True
    draft_model: Any = None
    exact: bool = True

    def __post_init__(self):
        s = object.__setattr__
        if not isinstance(self.type, str):
            raise invalid(TypeError, "speculative.type",
                          f"speculative.type must be a str, got {type(self.type).__name__}")
        if self.type not in SPEC_TYPES:
            extra = (" (EAGLE/MTP heads are not supported: use draft-simple with a draft model, "
                     "or an n-gram type)" if self.type in _MODEL_TYPES else "")
            raise invalid(ValueError, "speculative.type",
                          f"speculative.type must be one of {', '.join(SPEC_TYPES)}, got "
                          f"{self.type!r}{extra}")
        s(self, "n_max", _count("n_max", self.n_max, 1, MAX_DRAFT))
        s(self, "n_min", _count("n_min", self.n_min, 0, MAX_DRAFT))
        if self.n_min > self.n_max:
            raise invalid(ValueError, "speculative.n_min",
                          f"speculative.n_min ({self.n_min}) must not exceed n_max ({self.n_max})")
        s(self, "ngram_n", _count("ngram_n", self.ngram_n, 0, MAX_NGRAM))
        s(self, "ngram_m", _count("ngram_m", self.ngram_m, 0, MAX_NGRAM))
        s(self, "min_hits", _count("min_hits", self.min_hits, 0, 65535))
        if self.type == "ngram-mod" and 0 < self.ngram_n < 2:
            raise invalid(ValueError, "speculative.ngram_n",
                          "speculative.ngram_n must be at least 2 for ngram-mod")
        if self.type == "draft-simple" and self.draft_model is None:
            raise invalid(ValueError, "speculative.draft_model",
                          "speculative.type 'draft-simple' needs speculative.draft_model (a "
                          "llamagen.Model sharing the target's vocabulary; llamagen serve "
                          "--model-draft)")
        if self.type != "draft-simple" and self.draft_model is not None:
            raise invalid(ValueError, "speculative.draft_model",
                          f"speculative.draft_model is for type 'draft-simple', not {self.type!r}")
        if not isinstance(self.adaptive, bool):
            raise invalid(TypeError, "speculative.adaptive",
                          f"speculative.adaptive must be True or False, got {self.adaptive!r}")
        if not isinstance(self.exact, bool):
            raise invalid(TypeError, "speculative.exact",
                          f"speculative.exact must be True or False, got {self.exact!r}")

    @property
    def key(self) -> tuple:
        """What makes two configurations share one drafter (everything but the lengths)."""
        return (self.type, self.ngram_n, self.ngram_m, self.min_hits, self.draft_model)

    def to_dict(self) -> dict:
        d = {"type": self.type, "n_max": self.n_max, "n_min": self.n_min,
             "ngram_n": self.ngram_n, "ngram_m": self.ngram_m, "min_hits": self.min_hits,
             "adaptive": self.adaptive, "exact": self.exact}
        if self.draft_model is not None:
            d["draft_model"] = self.draft_model
        return d


def coerce(value) -> Optional[Speculative]:
    """None, a Speculative, a type name ("none": off), or a dict of Speculative's fields ->
    Speculative/None."""
    if value is None or value is False:
        return None
    if isinstance(value, Speculative):
        return value
    if isinstance(value, str):
        return None if value == "none" else Speculative(type=value)
    if isinstance(value, dict):
        unknown = set(value) - set(Speculative.__dataclass_fields__)
        if unknown:
            name = sorted(unknown)[0]
            raise invalid(ValueError, f"speculative.{name}",
                          f"unknown speculative field {name!r} (known: "
                          f"{', '.join(Speculative.__dataclass_fields__)})")
        return Speculative(**value)
    raise invalid(TypeError, "speculative",
                  "speculative must be None, a llamagen.Speculative, a type name or a dict, got "
                  f"{type(value).__name__}")


def from_flags(a, load_model=None) -> Optional[Speculative]:
    """The Speculative that command-line flags ask for (``--spec-type``, ``--spec-draft-max``, ...,
    ``--model-draft``, as parsed onto ``a`` by llamagen's CLI), or None; ValueError naming the
    flag.  ``load_model(path)`` loads the draft model (called last, once the flags check)."""
    draft = getattr(a, "model_draft", None)
    if draft:
        if a.spec_type not in (None, "draft-simple"):
            raise ValueError(f"--model-draft drafts with draft-simple: --spec-type {a.spec_type} "
                             "cannot go with it")
        a.spec_type = "draft-simple"
    elif a.spec_type == "draft-simple":
        raise ValueError("--spec-type draft-simple needs --model-draft (the draft model's path)")
    fields = {"n_max": a.spec_draft_max, "n_min": a.spec_draft_min, "ngram_n": a.spec_ngram_size_n,
              "ngram_m": a.spec_ngram_size_m, "min_hits": a.spec_ngram_min_hits}
    fields = {k: v for k, v in fields.items() if v is not None}
    if a.spec_type is None or a.spec_type == "none":
        if fields:
            raise ValueError("--spec-draft-max and the other --spec-* flags need --spec-type")
        return None
    try:
        Speculative(type=a.spec_type, adaptive=not a.spec_no_adaptive, exact=not a.spec_no_exact,
                    draft_model=object() if draft else None, **fields)
    except (ValueError, TypeError) as e:
        flag = "--spec-" + str(getattr(e, "field", "type")).split(".")[-1].replace("_", "-")
        raise ValueError(f"{flag}: {e}") from None
    if draft:
        if load_model is None:
            raise ValueError("--model-draft: no model loader given")
        try:
            fields["draft_model"] = load_model(draft)
        except Exception as e:  # noqa: BLE001 - a load failure of any kind, one message
            raise ValueError(f"--model-draft {draft!r}: {e}") from None
    try:
        return Speculative(type=a.spec_type, adaptive=not a.spec_no_adaptive,
                           exact=not a.spec_no_exact, **fields)
    except (ValueError, TypeError) as e:
        flag = "--spec-" + str(getattr(e, "field", "type")).split(".")[-1].replace("_", "-")
        raise ValueError(f"{flag}: {e}") from None
