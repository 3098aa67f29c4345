"""Log-probabilities: of generated tokens (``SamplingParams(logprobs=k)``) and of given text
(:func:`score`).

A logprob is log-softmax of the model's raw logits at that step, before any sampler (temperature,
top-k, penalties, grammar), as OpenAI and vLLM report them.  They are computed in C without the
GIL; with ``logprobs=None`` (the default) nothing is computed.
"""
from __future__ import annotations

from typing import List

from llamagen import _core
from llamagen._results import Completion, ScoreResult, TokenLogprob, TopLogprob
from llamagen._shared import exclusive
from llamagen.sampling import MAX_LOGPROBS

__all__ = ["TopLogprob", "TokenLogprob", "Completion", "ScoreResult", "score"]


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
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a list of texts (or token lists), got one "
                        + type(texts).__name__)
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or \
            not 0 <= top_logprobs <= MAX_LOGPROBS:
        raise ValueError(f"top_logprobs must be an int from 0 to {MAX_LOGPROBS}, got {top_logprobs!r}")
    texts = list(texts)
    with exclusive(ctx):
        return _core._score(ctx, texts, top_logprobs, add_special, parse_special)
