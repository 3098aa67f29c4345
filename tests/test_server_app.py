"""The server app in-process, over a stand-in engine: what a real model cannot show quickly
(the 503 while the engine loads, keep-alive pings during a long silence, a failed load)."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import openai
import pytest
from fastapi.testclient import TestClient

from llamagen.chat import ChatPrompt
from llamagen.engine import EngineChunk, EngineStats, Usage
from llamagen.server import create_app


class _Model:
    n_vocab = 100
    n_ctx_train = 512
    description = "stand-in"
    bos = 1
    path = "/models/stand-in.gguf"


class _Stream:
    def __init__(self, text, delay):
        self.text, self.delay = text, delay
        self.n_prompt_tokens = 3
        self.closed = False
        self._i = 0

    @property
    def usage(self):
        return Usage(3, self._i, 0)

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._i >= len(self.text) or self.closed:
            raise StopAsyncIteration
        await asyncio.sleep(self.delay)
        self._i += 1
        last = self._i == len(self.text)
        return EngineChunk(0, self.text[self._i - 1], [7], "length" if last else None)

    async def aclose(self):
        self.closed = True


class StandIn:
    """The parts of AsyncEngine the HTTP layer uses."""
    model = _Model()
    n_ctx = 512
    n_parallel = 2

    def __init__(self, text="abc", delay=0.0):
        self.text, self.delay = text, delay
        self.closed = False
        self.streams = []

    def tokenize(self, text, add_special=True, parse_special=False):
        return ([1] if add_special else []) + [10 + ord(c) % 80 for c in text]

    def detokenize(self, tokens):
        return "".join(chr(t - 10) for t in tokens if t >= 10)

    def prepare_chat(self, messages, **kw):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        return ChatPrompt(prompt=text, sampling={}, tools=False, tool_choice="auto",
                          format="", generation_prompt="<assistant>", tokens=self.tokenize(text))

    def prepare(self, prompt, params=None, *, n=1, add_special=True, parse_special=True, **kw):
        return prompt

    def stream_prepared(self, prepared):
        s = _Stream(self.text, self.delay)
        self.streams.append(s)
        return s

    def stats(self):
        return EngineStats(0, 0, 0, self.n_ctx, 0, 0, 0, 0, 0, 0)

    async def aclose(self):
        self.closed = True


def test_health_is_503_while_the_engine_loads_then_200():
    gate = threading.Event()
    engine = StandIn()

    def factory():
        gate.wait(10)
        return engine
    app = create_app(engine_factory=factory, model_name="m")
    with TestClient(app) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        r = c.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"]["type"] == "server_error"
        gate.set()
        deadline = time.monotonic() + 5
        while c.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.get("/health").json() == {"status": "ok"}
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "abc"
    assert engine.closed            # the lifespan closed what the factory made


def test_a_failed_load_is_reported_and_fatal():
    seen = []

    def factory():
        raise ValueError("n_ctx too small")
    app = create_app(engine_factory=factory, model_name="m", on_fatal=seen.append)
    with TestClient(app) as c:
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert isinstance(seen[0], ValueError)
        assert c.get("/health").json() == {"status": "error"}
        r = c.post("/v1/messages", json={"max_tokens": 1, "messages": [
            {"role": "user", "content": "x"}]})
        assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded_error"


def test_keep_alive_pings_are_comments_the_client_ignores():
    engine = StandIn(text="hi!", delay=0.25)
    app = create_app(engine, model_name="m", ping_interval=0.05)
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "stream": True})
        assert ": ping\n\n" in r.text
        assert "data: ping" not in r.text and "event: ping" not in r.text
        client = openai.OpenAI(base_url=str(c.base_url) + "/v1", api_key="x", http_client=c,
                               max_retries=0)
        chunks = list(client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "hi!"
        r = c.post("/v1/messages", json={"max_tokens": 5, "stream": True, "messages": [
            {"role": "user", "content": "x"}]})
        assert r.text.count("event: message_start") == 1 and ": ping\n\n" in r.text
    assert all(s.closed or s._i == 3 for s in engine.streams)


def test_engine_passed_in_is_not_closed_by_the_app():
    engine = StandIn()
    with TestClient(create_app(engine)) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "stand-in.gguf"
    assert not engine.closed


def test_api_keys_must_be_non_empty_strings():
    with pytest.raises(ValueError):
        create_app(StandIn(), api_keys=[""])
    with pytest.raises(TypeError):
        create_app()


def test_cors_headers_only_for_the_origins_given():
    site = "http://localhost:3000"
    pre = {"Origin": site, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type"}
    with TestClient(create_app(StandIn(), model_name="m", api_keys=["k"])) as c:
        r = c.options("/v1/completions", headers=pre)
        assert "access-control-allow-origin" not in r.headers        # no flag: browsers keep out
    with TestClient(create_app(StandIn(), model_name="m", api_keys=["k"], cors_origins=[site])) as c:
        r = c.options("/v1/completions", headers=pre)               # the preflight carries no key
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == site
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3},
                   headers={"Origin": site, "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == site
        r = c.post("/v1/completions", json={"prompt": "x"}, headers={"Origin": site})
        # the key is still checked, and the page can read why it failed
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == site
        r = c.options("/v1/completions", headers={**pre, "Origin": "http://evil.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    with TestClient(create_app(StandIn(), model_name="m", cors_origins=["*"])) as c:
        r = c.get("/v1/models", headers={"Origin": "http://anything.example"})
        assert r.headers["access-control-allow-origin"] == "*"
    for bad in ("localhost:3000", ""):
        with pytest.raises(ValueError, match="CORS origin"):
            create_app(StandIn(), model_name="m", cors_origins=[bad])


def test_an_unexpected_error_is_a_500_and_counted():
    class Broken(StandIn):
        def tokenize(self, text, add_special=True, parse_special=False):
            raise RuntimeError("a bug")
    app = create_app(Broken(), model_name="m")
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/tokenize", json={"content": "x"})
        assert r.status_code == 500 and r.json()["error"]["message"] == "internal error: RuntimeError"
        c.post("/v1/completions", json={"prompt": 5})              # a 400, counted as before
        metrics = c.get("/metrics").text
    assert 'llamagen:http_request_errors_total{model_name="m",status="500"} 1.0' in metrics
    assert 'llamagen:http_request_errors_total{model_name="m",status="400"} 1.0' in metrics


def test_preparation_runs_off_the_event_loop_with_a_time_budget():
    # a request whose preparation (template, schema, tokens) outlasts --prepare-timeout gets a
    # 503; /health answers meanwhile, and the others' preparation goes on
    gate = threading.Event()

    class Slow(StandIn):
        def prepare(self, prompt, params=None, **kw):
            if prompt == "slow":
                gate.wait(5)
            return prompt
    app = create_app(Slow(), model_name="m", prepare_timeout=0.3, prepare_threads=2)
    with TestClient(app) as c:
        t0 = time.monotonic()
        r = c.post("/v1/completions", json={"prompt": "slow"})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "preparation_timeout"
        assert 0.3 <= time.monotonic() - t0 < 3
        assert c.get("/health").status_code == 200
        assert c.post("/v1/completions", json={"prompt": "x"}).json()["choices"][0]["text"] == "abc"
        gate.set()
    with pytest.raises(ValueError, match="prepare timeout"):
        create_app(StandIn(), prepare_timeout=0)


def test_a_reply_the_chat_parser_cannot_take_comes_back_as_text_with_the_reason(tiny_model):
    # model output nesting past the parser's limit (issue 26): the reply is its text, and the
    # choice says why (before: the reason was lost; earlier still, a SIGSEGV)
    from pathlib import Path
    import llamagen
    template = (Path(__file__).resolve().parents[1] / "examples" / "chatml-tools.jinja").read_text()
    deep = "[" * 600 + "]" * 600
    text = '<tool_call>\n{"name": "f", "arguments": {"a": ' + deep + '}}\n</tool_call>'

    class Tools(StandIn):
        def prepare_chat(self, messages, **kw):
            return llamagen.tools.prepare(tiny_model, messages, template=template, **kw)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": tools}
    with TestClient(create_app(Tools(text=text), model_name="m")) as c:
        r = c.post("/v1/chat/completions", json=body).json()
        choice = r["choices"][0]
        assert choice["message"]["content"] == text and "tool_calls" not in choice["message"]
        assert "512 levels" in choice["parse_error"], choice.get("parse_error")
        r = c.post("/v1/chat/completions", json={**body, "stream": True})
        chunks = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
        assert "512 levels" in chunks[-1]["choices"][0]["parse_error"]
        assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == text
        a = c.post("/v1/messages", json={"model": "m", "max_tokens": 10, "messages": body["messages"],
                                         "tools": [{"name": "f", "input_schema": {"type": "object"}}]})
        assert "512 levels" in a.json()["parse_error"], a.json()
