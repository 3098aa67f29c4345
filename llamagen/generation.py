"""Streaming and whole-text generation (the begin / next / end API and generate())."""
from __future__ import annotations

from typing import Optional

from llamagen import _core
from llamagen._core import Context, GenerationState
from llamagen._shared import MAX_N, check_n, seeded  # noqa: F401  (MAX_N, check_n: re-exported)
from llamagen._shared import exclusive as _exclusive
from llamagen.batch import _run_batch
from llamagen._results import Completion
from llamagen.sampling import SamplingParams, resolve

__all__ = ["gen_begin", "gen_next", "gen_end", "gen_resume", "generate"]


def gen_begin(ctx: Context, prompt, *args, params: Optional[SamplingParams] = None,
              add_special: bool = True, parse_special: bool = True, **kwargs) -> GenerationState:
    """Tokenize ``prompt``, build the sampler chain, clear the KV cache and prefill the prompt.

    Sampling parameters come as keywords (max_new_tokens=256, temp=0.8, top_k=50, top_p=0.9,
    seed=42, min_p=0.0, typical_p=1.0, repeat_penalty=1.0, repeat_last_n=64,
    frequency_penalty=0.0, presence_penalty=0.0, mirostat=0, mirostat_tau=5.0, mirostat_eta=0.1,
    grammar=None, stop, logit_bias, ignore_eos, DRY/XTC/top-n-sigma ... see SamplingParams),
    positionally in that order, or as a ready ``params=SamplingParams(...)`` (keywords then
    override its fields).  ``prompt`` is a str (or UTF-8 bytes) or a list of token ids.
    """
    p = resolve(params, args, kwargs)
    with _exclusive(ctx):                  # waits for another thread's whole generate()
        return _core._gen_begin(ctx, prompt, p, add_special, parse_special)


def gen_resume(ctx: Context, saved, *, lora=None) -> GenerationState:
    """Go on with a generation ``GenerationState.save`` saved (its bytes or file), on ``ctx`` (any
    context of the same model, even in another process): its KV cells are loaded into sequence 0,
    its sampler rebuilt and brought to where it was, and the stream continues with the tokens
    the saved one would have produced.  ``lora``: the adapters it ran with, when it had any
    (adapters cannot be saved).  Takes the context over, like gen_begin.  ValueError for what
    is not such a save, or one of another model; LlamaError when the cells do not fit ``ctx``."""
    return _core._gen_resume(ctx, saved, lora)


def gen_next(state: GenerationState) -> Optional[str]:
    """The next chunk of text, or None once the generation has finished."""
    return state.next()


def gen_end(state: GenerationState) -> str:
    """Flush the held-back text and free the sampler.  Idempotent."""
    return state.end()


def generate(ctx: Context, prompt, *args, params: Optional[SamplingParams] = None,
             add_special: bool = True, parse_special: bool = True, n: int = 1,
             return_logprobs: bool = False, **kwargs):
    """The whole generated text; the same text the stream gives for the same parameters.

    ``n`` > 1: a list of n texts, sample i drawn with seed + i (reproducible and distinct), the
    prompt prefilled once: on a context with n_seq_max >= 2 its cells are copied to up to
    n_seq_max sequences decoded side by side, else the samples run one after another on the
    kept prompt.  ``return_logprobs=True``: Completion objects (text, tokens, finish_reason,
    logprobs, ...) instead of str; logprobs need ``logprobs=k`` (None means 0: the chosen
    tokens' logprobs only).
    """
    p = resolve(params, args, kwargs)
    n = check_n(n)
    if return_logprobs and p.logprobs is None:
        p = p.replace(logprobs=0)
    with _exclusive(ctx):        # the whole call owns the context: other threads take turns
        return _generate(ctx, prompt, p, n, return_logprobs, add_special, parse_special)


def _generate(ctx, prompt, p, n, return_logprobs, add_special, parse_special):
    if n == 1:
        text, st = _core._generate(ctx, prompt, p, add_special, parse_special)
        return _completion(text, st) if return_logprobs else text
    ps = seeded(p, n)
    if ctx.n_seq_max >= 2:
        outs = _run_batch(ctx, [prompt], ps, min(n, ctx.n_seq_max), add_special, parse_special)[0]
        return outs if return_logprobs else [c.text for c in outs]
    pairs = _core._generate_n(ctx, prompt, ps, add_special, parse_special)
    return [_completion(t, st) if return_logprobs else t for t, st in pairs]


def _completion(text: str, st: GenerationState) -> Completion:
    return Completion(text=text, tokens=st.tokens, finish_reason=st.finish_reason,
                      logprobs=st.logprobs,
                      n_prompt_tokens=st.n_prompt_tokens, seed=st.seed)
