"""Prometheus metrics, named in vLLM's style under a ``llamagen:`` prefix, each with a
``model_name`` label.

Engine-wide numbers (requests running / waiting, token counters, KV cache use, prefix cache) are
read from ``engine.stats()`` at scrape time; latencies are measured here, in the HTTP layer, from
the moment a request was accepted to the chunks it sends.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets, with a few finer ones at the bottom: small models on a GPU answer in milliseconds
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineCollector:
    """Gauges and counters read from the engine at scrape time (none while it loads)."""

    def __init__(self, model_name: str, get_engine: Callable[[], Optional[object]]):
        self.model_name = model_name
        self.get_engine = get_engine

    def describe(self):
        return []

    def collect(self):
        engine = self.get_engine()
        if engine is None:
            return
        s = engine.stats()
        label = [self.model_name]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"llamagen:{name}", doc, labels=["model_name"])
            g.add_metric(label, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(f"llamagen:{name}", doc, labels=["model_name"])
            c.add_metric(label, value)
            return c

        yield gauge("num_requests_running", "Requests generating in the batch now.", s.n_running)
        yield gauge("num_requests_waiting", "Requests waiting for a free sequence slot.", s.n_waiting)
        yield gauge("kv_cache_usage_perc", "KV cache use, 0 to 1 (cells in use / cells).",
                    s.kv_used / s.kv_size if s.kv_size else 0.0)
        yield counter("prompt_tokens", "Prompt tokens of finished and running requests.",
                      s.prompt_tokens_total)
        yield counter("generation_tokens", "Generated tokens.", s.generated_tokens_total)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      s.prefix_cache_hits)
        yield gauge("prompt_cache_ram_bytes", "Host RAM held by evicted prompt caches (--cache-ram).",
                    s.ram_cache_bytes)
        yield counter("prompt_cache_ram_restored_tokens", "Prompt tokens restored from host RAM "
                      "instead of prefilled.", s.ram_cache_restored_tokens)
        yield counter("requests", "Requests the engine accepted.", s.requests_total)
        yield counter("engine_stalled_steps", "Engine steps that decoded nothing while requests "
                      "held sequences (a watchdog: stays 0 in a healthy engine).", s.n_stalled_steps)
        yield counter("spec_draft_tokens", "Speculative decoding: drafted tokens verified.",
                      s.draft_tokens_total)
        yield counter("spec_accepted_tokens", "Speculative decoding: drafted tokens accepted "
                      "(each saved one decode).", s.accepted_draft_tokens_total)
        yield gauge("spec_acceptance_rate", "Accepted / drafted tokens since the start (0 before "
                    "any draft).", s.accepted_draft_tokens_total / s.draft_tokens_total
                    if s.draft_tokens_total else 0.0)


class Metrics:
    def __init__(self, model_name: str, get_engine: Callable[[], Optional[object]]):
        # a registry per app: two servers in one process (tests) must not share counters
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        r = self.registry
        self.ttft = Histogram("llamagen:time_to_first_token_seconds",
                              "Time from accepting a request to its first generated text.",
                              ["model_name"], buckets=_TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("llamagen:inter_token_latency_seconds",
                             "Time between a choice's successive chunks of text, per token.",
                             ["model_name"], buckets=_ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("llamagen:e2e_request_latency_seconds",
                             "Time from accepting a request to its last token.",
                             ["model_name"], buckets=_E2E_BUCKETS, registry=r).labels(model_name)
        self._success = Counter("llamagen:request_success",
                                "Finished choices, by finish reason (stop, length, cancelled, "
                                "error).", ["model_name", "finished_reason"], registry=r)
        self._http_errors = Counter("llamagen:http_request_errors",
                                    "Requests answered with an error status.",
                                    ["model_name", "status"], registry=r)
        r.register(_EngineCollector(model_name, get_engine))

    def finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def http_error(self, status: int) -> None:
        self._http_errors.labels(self.model_name, str(status)).inc()

    def timer(self) -> "RequestTimer":
        return RequestTimer(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Latencies of one request: call ``chunk`` for every engine chunk, ``done`` at the end."""
    __slots__ = ("m", "t0", "first", "last")

    def __init__(self, m: Metrics):
        self.m = m
        self.t0 = time.perf_counter()
        self.first = False
        self.last: dict = {}

    def chunk(self, key, chunk) -> None:
        n = len(chunk.token_ids)
        if chunk.finish_reason is not None:
            self.m.finished(chunk.finish_reason)
        if not n:
            return
        now = time.perf_counter()
        if not self.first:
            self.first = True
            self.m.ttft.observe(now - self.t0)
        prev = self.last.get(key)
        if prev is not None:
            per = (now - prev) / n
            for _ in range(n):
                self.m.itl.observe(per)
        self.last[key] = now

    def done(self) -> None:
        self.m.e2e.observe(time.perf_counter() - self.t0)
