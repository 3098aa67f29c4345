"""Log-probabilities: of generated tokens (``SamplingParams(logprobs=k)``) and of given text
(:func:`score`).

A logprob is log-softmax of the model's raw logits at that step, before any sampler (temperature,
top-k, penalties, grammar), as OpenAI and vLLM report them.  They are computed in C without the
GIL; with ``logprobs=None`` (the default) nothing is computed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Tuple

__all__ = ["TopLogprob", "TokenLogprob", "Completion", "ScoreResult", "score"]


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


def score(ctx, texts, *, top_logprobs: int = 0, add_special: bool = True,
          parse_special: bool = False) -> List[ScoreResult]:
    """Score each text (str, UTF-8 bytes or a list of token ids) under the model: the logprob of
    every token given all before it (the first token has none), their sum and the perplexity.

    An item may also be a tuple ``(context, continuation)``: only the continuation's tokens are
    scored, given the context (classification, multiple choice, reranking by likelihood).  The
    continuation is tokenized without special tokens and appended to the context's tokens.

    Several texts are decoded side by side (one sequence each, up to ``ctx.n_seq_max``), each in
    chunks of n_batch tokens; a text must fit one sequence's context.  ``top_logprobs`` (0-20)
    adds the most likely alternatives at each position (OpenAI's ``echo`` with ``logprobs``).
    Takes the context over (like gen_begin): earlier states on it become stale.
    """
    from llamagen import _core
    from llamagen.sampling import MAX_LOGPROBS
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a list of texts (or token lists), got one "
                        + type(texts).__name__)
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or \
            not 0 <= top_logprobs <= MAX_LOGPROBS:
        raise ValueError(f"top_logprobs must be an int from 0 to {MAX_LOGPROBS}, got {top_logprobs!r}")
    texts = list(texts)
    from llamagen.generation import _exclusive
    with _exclusive(ctx):
        return _core._score(ctx, texts, top_logprobs, add_special, parse_special)
