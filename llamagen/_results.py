"""The result types of generation and scoring (TopLogprob, TokenLogprob, Completion,
ScoreResult): plain data, imported by the compiled core and by every layer above it, so they live
below all of them (llamagen.logprobs re-exports them)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Tuple

__all__ = ["TopLogprob", "TokenLogprob", "Completion", "ScoreResult"]


class TopLogprob(NamedTuple):
    """One of the most likely tokens at a step."""
    token: int
    logprob: float
    piece: bytes            # what the token renders to (special tokens included)

    @property
    def text(self) -> str:
        return self.piece.decode("utf-8", "replace")


class TokenLogprob(NamedTuple):
    """A token with its logprob and the ``k`` most likely tokens at its step (most likely first).
    For scored text the first token has no logprob (``None``): nothing precedes it."""
    token: int
    logprob: Optional[float]
    piece: bytes
    top: Tuple[TopLogprob, ...] = ()

    @property
    def text(self) -> str:
        return self.piece.decode("utf-8", "replace")


@dataclass
class Completion:
    """One generation with its details (``generate(..., return_logprobs=True)``); ``logprobs`` is
    None when the parameters had ``logprobs=None``."""
    text: str
    tokens: List[int]
    finish_reason: Optional[str]
    logprobs: Optional[List[TokenLogprob]]
    n_prompt_tokens: int
    seed: Optional[int] = None

    @property
    def sum_logprob(self) -> float:
        """Log-likelihood of the generated tokens under the model (nan without logprobs)."""
        if self.logprobs is None:
            return math.nan
        return math.fsum(t.logprob for t in self.logprobs)


@dataclass
class ScoreResult:
    """How likely a text is under the model: per token logprobs given the tokens before it.
    Tokens that are only context have None: the first token, or a (context, continuation)
    pair's context."""
    tokens: List[int]
    logprobs: List[Optional[float]]
    top: Optional[List[Tuple[TopLogprob, ...]]] = field(default=None, repr=False)
    pieces: Optional[List[bytes]] = field(default=None, repr=False)

    @property
    def n_scored(self) -> int:
        return sum(1 for x in self.logprobs if x is not None)

    @property
    def sum_logprob(self) -> float:
        """Log-likelihood of the scored tokens (0.0 when none is scored)."""
        return math.fsum(x for x in self.logprobs if x is not None)

    @property
    def mean_logprob(self) -> float:
        return self.sum_logprob / self.n_scored if self.n_scored else math.nan

    @property
    def perplexity(self) -> float:
        """exp(-mean logprob): llama-perplexity's figure for the same tokens (nan for one token)."""
        return math.exp(-self.mean_logprob) if self.n_scored else math.nan

    def token_logprobs(self) -> List[TokenLogprob]:
        """The scores as TokenLogprobs (OpenAI's ``echo`` shape); alternatives need ``top_logprobs``."""
        pieces = self.pieces or [b""] * len(self.tokens)
        top = self.top or [()] * len(self.tokens)
        return [TokenLogprob(t, lp, pc, tp)
                for t, lp, pc, tp in zip(self.tokens, self.logprobs, pieces, top)]


# their public home (pickles and reprs name it): llamagen.logprobs re-exports them
for _cls in (TopLogprob, TokenLogprob, Completion, ScoreResult):
    _cls.__module__ = "llamagen.logprobs"
del _cls
