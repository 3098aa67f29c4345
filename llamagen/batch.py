"""Batched generation for pipelines: many sequences per decode step."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, List, Optional

from llamagen._core import BatchGenerator, Context
from llamagen._util import check_prompt
from llamagen.sampling import SamplingParams, resolve

__all__ = ["BatchGenerator", "BatchResult", "generate_batch", "map_generate"]


@dataclass
class BatchResult:
    """One input's outcome in map_generate (in input order)."""
    index: int
    prompt: Any
    text: str = ""
    finish_reason: Optional[str] = None
    tokens: List[int] = field(default_factory=list)
    error: Optional[BaseException] = None

    @property
    def ok(self) -> bool:
        return self.error is None


def generate_batch(ctx: Context, prompts, *, params: Optional[SamplingParams] = None,
                   n_parallel: Optional[int] = None, **sampling) -> List[str]:
    """Generate for every prompt, batched; the texts in prompt order.

    Raises ValueError (naming the prompt's index) before decoding anything if a prompt is empty
    or does not fit one sequence's context.
    """
    p = resolve(params, (), sampling)
    if isinstance(prompts, (str, bytes)):
        raise TypeError("prompts must be a list of prompts, got one " + type(prompts).__name__)
    prompts = [check_prompt(x, f"prompt {i}") for i, x in enumerate(prompts)]
    batch = BatchGenerator(ctx, n_parallel=n_parallel, params=p)
    ids = []
    for i, prompt in enumerate(prompts):
        try:
            ids.append(batch.add(prompt))
        except ValueError as e:
            for sid in ids:
                batch.cancel(sid)
            raise ValueError(f"prompt {i}: {e}") from e
    texts = {sid: [] for sid in ids}
    for sid, chunk in batch:
        texts[sid].append(chunk)
    return ["".join(texts[sid]) for sid in ids]


def map_generate(ctx: Context, iterable: Iterable, *, batch_size: int = 16, progress: bool = False,
                 params: Optional[SamplingParams] = None, **sampling) -> Iterator[BatchResult]:
    """Generate for every item of ``iterable`` (a prompt, or a dict {"prompt": ..., **overrides}),
    keeping ``batch_size`` sequences busy, and yield BatchResults in input order.

    Items are read lazily.  An item that cannot run (a prompt too long, bad overrides) yields a
    result with ``error`` set; the others go on.
    """
    p = resolve(params, (), sampling)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    n_parallel = min(batch_size, ctx.n_seq_max)
    batch = BatchGenerator(ctx, n_parallel=n_parallel, params=p)
    total = len(iterable) if hasattr(iterable, "__len__") else None
    bar = _progress(total) if progress else None
    items = enumerate(iter(iterable))
    pending = {}            # seq id -> BatchResult
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
            try:
                sid = batch.add(check_prompt(prompt, f"item {i}'s prompt"), **overrides)
            except (ValueError, TypeError) as e:
                res.error = e
                done[i] = res
                continue
            pending[sid] = res
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
            for sid, chunk in batch.step():
                chunks[sid].append(chunk)
                reason = batch.finish_reason(sid)
                if reason is not None:
                    res = pending.pop(sid)
                    res.text = "".join(chunks.pop(sid))
                    res.finish_reason = reason
                    res.tokens = batch.tokens(sid)
                    batch.forget(sid)
                    done[res.index] = res
            refill()
    finally:
        for sid in list(pending):
            batch.cancel(sid)
        if bar is not None:
            bar.close()


class _SimpleBar:
    def __init__(self, total):
        import sys
        self.total, self.n, self.out = total, 0, sys.stderr

    def update(self, k):
        self.n += k
        self.out.write(f"\rmap_generate: {self.n}" + (f"/{self.total}" if self.total else ""))
        self.out.flush()

    def close(self):
        self.out.write("\n")


def _progress(total):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _SimpleBar(total)
    return tqdm(total=total, desc="map_generate", unit="prompt")
