"""What the engine hands out: chunks, results, usage, stats, and a prepared request."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional

from llamagen._results import TokenLogprob
from llamagen.sampling import SamplingParams

__all__ = ["Usage", "EngineChunk", "Choice", "EngineResult", "EngineStats", "PreparedRequest"]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int        # prompt tokens found in the KV cache (not prefilled)
    # speculative decoding (requests with ``speculative``): drafted tokens verified, and of
    # those the ones accepted (each accepted token saved one decode)
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class EngineChunk:
    """What one step produced for one choice: new text (valid UTF-8, may be empty while bytes
    are held back) and the token ids behind it; ``finish_reason`` on the choice's last chunk."""
    index: int
    text: str
    token_ids: List[int]
    finish_reason: Optional[str] = None     # "stop" or "length" (a failed choice raises)
    stop_sequence: Optional[str] = None     # the stop string that ended the text, if one did
    # (``logprobs=k`` requests) of the tokens behind ``text``: a token whose text is held back
    # comes with the chunk that shows it; the end-of-generation token has none
    logprobs: Optional[List[TokenLogprob]] = None
    # (``prompt_logprobs=k`` requests) on each choice's first chunk: the prompt's tokens, the
    # first with logprob None
    prompt_logprobs: Optional[List[TokenLogprob]] = None


@dataclass
class Choice:
    index: int
    text: str = ""
    tokens: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_sequence: Optional[str] = None
    logprobs: Optional[List[TokenLogprob]] = None


@dataclass
class EngineResult:
    choices: List[Choice]
    usage: Usage
    prompt_logprobs: Optional[List[TokenLogprob]] = None   # (``prompt_logprobs=k`` requests)

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def tokens(self) -> List[int]:
        return self.choices[0].tokens

    @property
    def finish_reason(self) -> Optional[str]:
        return self.choices[0].finish_reason


@dataclass(frozen=True)
class EngineStats:
    n_running: int                 # sequences holding a slot
    n_waiting: int                 # sequences submitted and waiting for one
    kv_used: int                   # KV cells held (live sequences and idle prompt caches)
    kv_size: int
    prompt_tokens_total: int
    generated_tokens_total: int
    prefix_cache_queries: int      # prompt tokens looked up in the prompt cache
    prefix_cache_hits: int         # ... found there (not prefilled)
    requests_total: int
    n_steps: int
    n_stalled_steps: int = 0       # steps that decoded nothing with sequences live (a watchdog)
    draft_tokens_total: int = 0    # speculative decoding: drafted tokens verified
    accepted_draft_tokens_total: int = 0   # ... of those accepted
    ram_cache_bytes: int = 0       # host-RAM tier of the prompt cache: bytes held (cache_ram_mib)
    ram_cache_restored_tokens: int = 0     # prompt tokens restored from it instead of prefilled


class PreparedRequest(NamedTuple):
    """A request checked and tokenized by ``AsyncEngine.prepare``, for ``stream_prepared``."""
    tokens: List[int]
    params: List[SamplingParams]          # one per choice, seeds resolved
