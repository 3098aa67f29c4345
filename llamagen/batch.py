"""Batched generation for pipelines: many sequences per decode step."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, List, Optional

from llamagen._core import BatchGenerator, Context
from llamagen._util import check_prompt
from llamagen._shared import check_n, exclusive, progress_bar, seeded
from llamagen._results import Completion, TokenLogprob
from llamagen.sampling import SamplingParams, resolve

__all__ = ["BatchGenerator", "BatchResult", "generate_batch", "map_generate"]


@dataclass
class BatchResult:
    """One input's outcome in map_generate (in input order).  text, tokens, finish_reason and
    logprobs are the first sample's; ``choices`` holds all ``n``."""
    index: int
    prompt: Any
    text: str = ""
    finish_reason: Optional[str] = None
    tokens: List[int] = field(default_factory=list)
    error: Optional[BaseException] = None
    logprobs: Optional[List[TokenLogprob]] = None
    choices: List[Completion] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


def generate_batch(ctx: Context, prompts, *, params: Optional[SamplingParams] = None,
                   n_parallel: Optional[int] = None, n: int = 1, return_logprobs: bool = False,
                   **sampling) -> list:
    """Generate for every prompt, batched; the texts in prompt order.

    ``n`` > 1: n samples per prompt (a list of n texts per prompt), sample i with seed + i, the
    prompt prefilled once and its cells copied.  ``return_logprobs=True``: Completion objects
    instead of str (logprobs need ``logprobs=k``; None means 0).  Raises ValueError (naming the
    prompt's index) before decoding anything if a prompt is empty or does not fit one sequence's
    context.
    """
    p = resolve(params, (), sampling)
    n = check_n(n)
    if return_logprobs and p.logprobs is None:
        p = p.replace(logprobs=0)
    if isinstance(prompts, (str, bytes)):
        raise TypeError("prompts must be a list of prompts, got one " + type(prompts).__name__)
    prompts = [check_prompt(x, f"prompt {i}") for i, x in enumerate(prompts)]
    with exclusive(ctx):        # the whole call owns the context: other threads take turns
        outs = _run_batch(ctx, prompts, seeded(p, n), n_parallel)
    if not return_logprobs:
        outs = [[c.text for c in row] for row in outs]
    return [row[0] for row in outs] if n == 1 else outs


def _completion(batch: BatchGenerator, sid: int, text: str) -> Completion:
    return Completion(text=text, tokens=batch.tokens(sid), finish_reason=batch.finish_reason(sid),
                      logprobs=batch.logprobs(sid),
                      n_prompt_tokens=batch.n_prompt_tokens(sid), seed=batch.seed(sid))


def _run_batch(ctx: Context, prompts, ps: List[SamplingParams], n_parallel: Optional[int],
               add_special: bool = True, parse_special: bool = True) -> List[List[Completion]]:
    """Every prompt once per SamplingParams of ``ps``, batched; [[Completion] per prompt]."""
    batch = BatchGenerator(ctx, n_parallel=n_parallel, params=ps[0], add_special=add_special,
                           parse_special=parse_special)
    ids = []
    for i, prompt in enumerate(prompts):
        row = []
        ids.append(row)
        for p in ps:
            try:
                row.append(batch.add(prompt, params=p))
            except ValueError as e:
                for r in ids:
                    for sid in r:
                        batch.cancel(sid)
                raise ValueError(f"prompt {i}: {e}") from e
    texts = {sid: [] for row in ids for sid in row}
    for sid, chunk in batch:
        texts[sid].append(chunk)
    return [[_completion(batch, sid, "".join(texts[sid])) for sid in row] for row in ids]


def map_generate(ctx: Context, iterable: Iterable, *, batch_size: int = 16, progress: bool = False,
                 params: Optional[SamplingParams] = None, n: int = 1,
                 stats: Optional[dict] = None, **sampling) -> Iterator[BatchResult]:
    """Generate for every item of ``iterable`` (a prompt, or a dict {"prompt": ..., **overrides}),
    keeping ``batch_size`` sequences busy, and yield BatchResults in input order.

    Items are read lazily.  An item that cannot run (a prompt too long, bad overrides) yields a
    result with ``error`` set; the others go on.  ``n`` > 1: n samples per item (seed + i, the
    prompt prefilled once), all in ``BatchResult.choices``.  With ``logprobs=k`` each result's
    ``logprobs`` (and each choice's) holds the generated tokens' TokenLogprobs.  ``stats``: a
    dict updated as the generation goes with ``steps``, ``sampled_tokens`` and
    ``sample_seconds`` (the time spent in the sampler chains and grammars).
    """
    p = resolve(params, (), sampling)
    n = check_n(n)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    n_parallel = min(batch_size, ctx.n_seq_max)
    batch = BatchGenerator(ctx, n_parallel=n_parallel, params=p)
    total = len(iterable) if hasattr(iterable, "__len__") else None
    bar = progress_bar(total) if progress else None
    items = enumerate(iter(iterable))
    pending = {}            # seq id -> (BatchResult, choice index)
    left = {}               # item index -> samples still running
    chunks = {}             # seq id -> [str]
    done = {}               # index -> BatchResult, finished but not yet yielded
    next_out = 0
    exhausted = False
    # keep a few more queued than slots so a finishing sequence is replaced at once
    target = n_parallel + max(1, n_parallel // 2)

    def refill():
        nonlocal exhausted
        while not exhausted and len(pending) < target:
            try:
                i, item = next(items)
            except StopIteration:
                exhausted = True
                return
            prompt, overrides = (item.get("prompt"), {k: v for k, v in item.items() if k != "prompt"}) \
                if isinstance(item, dict) else (item, {})
            res = BatchResult(index=i, prompt=prompt)
            sids = []
            try:
                prompt = check_prompt(prompt, f"item {i}'s prompt")
                for q in seeded(resolve(p, (), overrides) if overrides else p, n):
                    sids.append(batch.add(prompt, params=q))
            except (ValueError, TypeError) as e:
                for sid in sids:
                    batch.cancel(sid)
                    batch.forget(sid)
                res.error = e
                done[i] = res
                continue
            res.choices = [None] * n
            left[i] = n
            for c, sid in enumerate(sids):
                pending[sid] = (res, c)
                chunks[sid] = []

    try:
        refill()
        while pending or done:
            while next_out in done:
                res = done.pop(next_out)
                next_out += 1
                if bar is not None:
                    bar.update(1)
                yield res
            if not pending:
                refill()
                if not pending and not done:
                    break
                continue
            out = batch.step()
            if stats is not None:
                stats.update(steps=batch.n_steps, sampled_tokens=batch.n_sampled,
                             draft_tokens=batch.n_drafted, accepted_draft_tokens=batch.n_accepted,
                             sample_seconds=batch.sample_us / 1e6)
            for sid, chunk in out:
                chunks[sid].append(chunk)
                if batch.finish_reason(sid) is not None:
                    res, c = pending.pop(sid)
                    res.choices[c] = _completion(batch, sid, "".join(chunks.pop(sid)))
                    batch.forget(sid)
                    left[res.index] -= 1
                    if left[res.index] == 0:
                        del left[res.index]
                        first = res.choices[0]
                        res.text, res.tokens, res.finish_reason = first.text, first.tokens, first.finish_reason
                        res.logprobs = first.logprobs
                        done[res.index] = res
            refill()
    finally:
        for sid in list(pending):
            batch.cancel(sid)
        if bar is not None:
            bar.close()
