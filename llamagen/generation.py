"""Streaming and whole-text generation (the begin / next / end API and generate())."""
from __future__ import annotations

from typing import Optional

from llamagen import _core
from llamagen._core import Context, GenerationState
from llamagen.sampling import SamplingParams, resolve

__all__ = ["gen_begin", "gen_next", "gen_end", "generate"]


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
    return _core._gen_begin(ctx, prompt, p, add_special, parse_special)


def gen_next(state: GenerationState) -> Optional[str]:
    """The next chunk of text, or None once the generation has finished."""
    return state.next()


def gen_end(state: GenerationState) -> str:
    """Flush the held-back text and free the sampler.  Idempotent."""
    return state.end()


def generate(ctx: Context, prompt, *args, params: Optional[SamplingParams] = None,
             add_special: bool = True, parse_special: bool = True, **kwargs) -> str:
    """The whole generated text; the same text the stream gives for the same parameters."""
    p = resolve(params, args, kwargs)
    text, _state = _core._generate(ctx, prompt, p, add_special, parse_special)
    return text
