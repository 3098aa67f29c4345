"""Streaming load generator for OpenAI-compatible servers (asyncio + httpx, no openai client).

    python bench/server/loadgen.py --url http://127.0.0.1:8080 --concurrency 8 --tokens 128
    python bench/server/loadgen.py --url http://127.0.0.1:8080 --chat

Workloads:

- ``run_concurrent``: N streams of /v1/completions started together, each asking for ``tokens``
  tokens (max_tokens = tokens, ignore_eos = true, default sampling otherwise), each with its own
  short prompt (``prompt_for(i)``: the prompts differ only in the story number).  Wall time runs
  from the first request sent to the last stream's end.
- ``run_chat``: a 4-turn conversation on /v1/chat/completions (each turn sends the previous turns,
  the assistant's replies and a new user message) and then a cold conversation of the same token
  length (the same messages with a different first word: no prefix-cache hit).

How things are counted (the same for every server):

- a *token chunk* is an SSE data event whose first choice carries non-empty text
  (``choices[0].text`` for completions, ``choices[0].delta.content`` for chat); the role-only
  first chat delta, the finish-reason-only last chunk and the usage chunk are not token chunks;
- tokens delivered per stream: ``usage.completion_tokens`` when the server sent usage
  (``stream_options.include_usage``), else the number of token chunks (which undercounts a server
  that merges tokens into one chunk); the summary says which was used;
- time to first token (TTFT): from sending the request to the first token chunk;
- inter-token latency (ITL): gaps between consecutive token chunks of a stream, pooled over all
  streams of the run;
- percentiles interpolate linearly between order statistics (numpy's default).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field

try:
    import httpx
except ImportError:  # pragma: no cover - reported by the runner
    httpx = None

PROMPT_TEMPLATE = "Story number {i}: once upon a time, in a small town by the sea, there lived"

USER_TURNS = [
    "{label} I am planning a walking trip along the coast next spring and would like some advice "
    "about what to pack, how far to walk each day and where to stay.",
    "That is helpful. What should I know about the weather in the early spring, and how do I plan "
    "for rain on the days when the path is long and exposed?",
    "Thanks. Could you suggest a few small towns along the way where I could rest for a day, and "
    "what there is to see or eat in each of them?",
    "Finally, how should I train over the next two months so that the longest days of walking "
    "feel comfortable rather than exhausting?",
]


def prompt_for(i: int) -> str:
    return PROMPT_TEMPLATE.format(i=i)


# -- statistics -------------------------------------------------------------------------------------

def percentile(xs, p):
    """The p-th percentile (0..100) of xs with linear interpolation; None for no data."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    if len(xs) == 1:
        return float(xs[0])
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (k - lo))


@dataclass
class StreamResult:
    """One streamed request, times in seconds from time.perf_counter()."""
    t_sent: float
    chunk_times: list = field(default_factory=list)  # arrival of every token chunk
    t_end: float | None = None
    usage_completion_tokens: int | None = None
    usage_prompt_tokens: int | None = None
    finish_reason: str | None = None
    done: bool = False                # saw data: [DONE]
    error: str | None = None
    text: str = ""
    status: int | None = None

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_times)

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.t_sent if self.chunk_times else None

    def itls(self) -> list:
        c = self.chunk_times
        return [b - a for a, b in zip(c, c[1:])]

    def tokens(self, method: str) -> int:
        if method == "usage" and self.usage_completion_tokens is not None:
            return self.usage_completion_tokens
        return self.n_chunks


def stream_record(r: StreamResult, method: str) -> dict:
    """The per-stream figures kept in the raw JSON (times in ms)."""
    ms = (lambda x: None if x is None else round(x * 1e3, 3))
    return dict(ttft_ms=ms(r.ttft), tokens=r.tokens(method), chunks=r.n_chunks,
                usage_completion_tokens=r.usage_completion_tokens, finish_reason=r.finish_reason,
                done=r.done, error=r.error, duration_ms=ms(None if r.t_end is None else r.t_end - r.t_sent))


def count_method(results) -> str:
    """'usage' when every successful stream reported usage.completion_tokens, else 'chunks'."""
    ok = [r for r in results if r.error is None]
    if ok and all(r.usage_completion_tokens is not None for r in ok):
        return "usage"
    return "chunks"


def summarize(results, wall: float, requested: int) -> dict:
    """Aggregate one run: ``results`` (StreamResult), ``wall`` seconds, ``requested`` tokens per
    stream.  Times in the returned dict are milliseconds."""
    method = count_method(results)
    per = [r.tokens(method) for r in results]
    delivered = sum(per)
    ttfts = [r.ttft for r in results if r.ttft is not None]
    itls = [g for r in results for g in r.itls()]
    ms = (lambda x: None if x is None else x * 1e3)
    return dict(
        streams=len(results),
        tokens_requested=requested * len(results),
        tokens_delivered=delivered,
        token_chunks=sum(r.n_chunks for r in results),
        count_method=method,
        streams_complete=sum(t >= requested for t in per),
        tokens_per_stream_min=min(per) if per else None,
        tokens_per_stream_max=max(per) if per else None,
        errors=sum(r.error is not None for r in results),
        error_samples=sorted({r.error for r in results if r.error})[:3],
        finish_reasons=_counts(r.finish_reason for r in results),
        wall_s=wall,
        tokens_per_s=delivered / wall if wall > 0 else None,
        ttft_p50_ms=ms(percentile(ttfts, 50)),
        ttft_p99_ms=ms(percentile(ttfts, 99)),
        ttft_max_ms=ms(max(ttfts)) if ttfts else None,
        itl_p50_ms=ms(percentile(itls, 50)),
        itl_p99_ms=ms(percentile(itls, 99)),
        itl_samples=len(itls),
    )


def _counts(xs) -> dict:
    out: dict = {}
    for x in xs:
        out[str(x)] = out.get(str(x), 0) + 1
    return out


# -- the client -------------------------------------------------------------------------------------

def _chunk_text(obj: dict, chat: bool):
    ch = obj.get("choices") or []
    if not ch:
        return None, None
    c = ch[0]
    if chat:
        text = (c.get("delta") or {}).get("content")
    else:
        text = c.get("text")
    return text, c.get("finish_reason")


async def stream_request(client, url: str, payload: dict, chat: bool, timeout: float) -> StreamResult:
    """POST ``payload`` (stream = true) to ``url`` and time every token chunk."""
    res = StreamResult(t_sent=time.perf_counter())
    try:
        async with client.stream("POST", url, json=payload, timeout=timeout) as resp:
            res.status = resp.status_code
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                res.error = f"HTTP {resp.status_code}: {body[:200]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue                         # event:, id:, comments (": ping"), blanks
                data = line[5:].strip()
                if data == "[DONE]":
                    res.done = True
                    break
                now = time.perf_counter()
                try:
                    obj = json.loads(data)
                except ValueError:
                    res.error = f"non-JSON data event: {data[:100]}"
                    break
                if "error" in obj and not obj.get("choices"):
                    res.error = f"stream error: {json.dumps(obj['error'])[:200]}"
                    break
                text, finish = _chunk_text(obj, chat)
                if text:
                    res.chunk_times.append(now)
                    res.text += text
                if finish:
                    res.finish_reason = finish
                usage = obj.get("usage")
                if usage:
                    res.usage_completion_tokens = usage.get("completion_tokens")
                    res.usage_prompt_tokens = usage.get("prompt_tokens")
    except Exception as e:  # noqa: BLE001 - every failure is data for the report
        res.error = f"{type(e).__name__}: {e}"[:200]
    finally:
        res.t_end = time.perf_counter()
    return res


def _client(n: int):
    if httpx is None:
        raise RuntimeError("httpx is not installed (pip install httpx)")
    limits = httpx.Limits(max_connections=max(n, 1) + 4, max_keepalive_connections=max(n, 1) + 4)
    return httpx.AsyncClient(limits=limits, trust_env=False)


def completion_payload(prompt: str, tokens: int, extra: dict | None = None) -> dict:
    p = dict(prompt=prompt, max_tokens=tokens, stream=True, ignore_eos=True,
             stream_options={"include_usage": True})
    p.update(extra or {})
    return p


async def run_concurrent(base_url: str, n: int, tokens: int, extra: dict | None = None,
                         timeout: float = 300.0) -> tuple[list, float]:
    """n concurrent /v1/completions streams; returns (StreamResults, wall seconds)."""
    url = base_url.rstrip("/") + "/v1/completions"
    async with _client(n) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*[
            stream_request(client, url, completion_payload(prompt_for(i), tokens, extra), False, timeout)
            for i in range(n)])
        wall = max(r.t_end for r in results) - t0
    return list(results), wall


def chat_messages(turn: int, replies: list, label: str) -> list:
    """Messages for turn ``turn`` (1-based): user turns 1..turn, with replies[0..turn-2] between."""
    msgs = []
    for k in range(turn):
        text = USER_TURNS[k].format(label=label) if k == 0 else USER_TURNS[k]
        msgs.append({"role": "user", "content": text})
        if k < turn - 1:
            msgs.append({"role": "assistant", "content": replies[k]})
    return msgs


async def run_chat(base_url: str, tokens: int = 64, extra: dict | None = None, label: str = "A)",
                   cold_label: str = "B)", timeout: float = 300.0) -> dict:
    """4 turns of one conversation (each turn ``tokens`` tokens), then a cold request with turn 4's
    messages but a different first word.  TTFTs in ms; prompt_tokens where the server reports them."""
    url = base_url.rstrip("/") + "/v1/chat/completions"
    out = dict(turns=[], cold=None)
    replies: list = []
    async with _client(1) as client:
        msgs = []
        for turn in range(1, len(USER_TURNS) + 1):
            msgs = chat_messages(turn, replies, label)
            p = dict(messages=msgs, max_tokens=tokens, stream=True, ignore_eos=True,
                     stream_options={"include_usage": True}, **(extra or {}))
            r = await stream_request(client, url, p, True, timeout)
            replies.append(r.text)
            out["turns"].append(_chat_row(r))
        cold = [dict(m) for m in msgs]
        cold[0]["content"] = cold_label + cold[0]["content"][len(label):]
        p = dict(messages=cold, max_tokens=tokens, stream=True, ignore_eos=True,
                 stream_options={"include_usage": True}, **(extra or {}))
        r = await stream_request(client, url, p, True, timeout)
        out["cold"] = _chat_row(r)
    return out


def _chat_row(r: StreamResult) -> dict:
    return dict(ttft_ms=None if r.ttft is None else r.ttft * 1e3, prompt_tokens=r.usage_prompt_tokens,
                completion_tokens=r.tokens(count_method([r])), chars=len(r.text), error=r.error)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--concurrency", default="1", help="comma-separated stream counts")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--chat", action="store_true", help="run the multi-turn chat workload instead")
    ap.add_argument("--extra", default="{}", help="JSON merged into every request body")
    a = ap.parse_args(argv)
    extra = json.loads(a.extra)
    if a.chat:
        print(json.dumps(asyncio.run(run_chat(a.url, 64, extra)), indent=1))
        return 0
    for n in [int(x) for x in a.concurrency.split(",")]:
        results, wall = asyncio.run(run_concurrent(a.url, n, a.tokens, extra))
        s = summarize(results, wall, a.tokens)
        print(json.dumps(dict(concurrency=n, **s)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
