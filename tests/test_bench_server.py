"""bench/server: the load generator's statistics and SSE parsing on fake data, and a smoke run
against llama-server when this checkout's build has the binary."""
import asyncio
import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench", "server"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

httpx = pytest.importorskip("httpx")
import loadgen  # noqa: E402


def _runner():
    """bench/server/run.py under its own name (bench/run.py is another "run")."""
    spec = importlib.util.spec_from_file_location("bench_server_run", os.path.join(ROOT, "bench", "server", "run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_stream(t_sent, first, gap, n, usage=None, finish="length"):
    r = loadgen.StreamResult(t_sent=t_sent)
    r.chunk_times = [t_sent + first + k * gap for k in range(n)]
    r.t_end = r.chunk_times[-1] if n else t_sent
    r.usage_completion_tokens = usage
    r.finish_reason = finish
    return r


def test_percentile_interpolates():
    assert loadgen.percentile([], 50) is None
    assert loadgen.percentile([7], 99) == 7
    assert loadgen.percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert loadgen.percentile(range(101), 99) == pytest.approx(99)
    assert loadgen.percentile([10, 0, 5], 100) == 10
    assert loadgen.percentile([0, 10], 99) == pytest.approx(9.9)


def test_summarize_fake_timings():
    # two streams of 4 tokens sent at t=0: first tokens at 0.1 s and 0.3 s, gaps 0.02 s and 0.04 s
    rs = [fake_stream(0.0, 0.1, 0.02, 4, usage=4), fake_stream(0.0, 0.3, 0.04, 4, usage=4)]
    s = loadgen.summarize(rs, wall=0.5, requested=4)
    assert s["count_method"] == "usage"
    assert s["tokens_delivered"] == 8 and s["tokens_requested"] == 8
    assert s["streams_complete"] == 2 and s["errors"] == 0
    assert s["tokens_per_s"] == pytest.approx(16.0)
    assert s["ttft_p50_ms"] == pytest.approx(200.0)
    assert s["ttft_p99_ms"] == pytest.approx(100 + 200 * 0.99)
    assert s["itl_samples"] == 6
    assert s["itl_p50_ms"] == pytest.approx(30.0)        # three 20 ms and three 40 ms gaps
    assert s["itl_p99_ms"] == pytest.approx(40.0)
    assert s["finish_reasons"] == {"length": 2}


def test_summarize_counts_chunks_without_usage_and_short_streams():
    # one stream cut short (an interrupted stream ends with "stop" after 3 of 8 tokens), no usage
    rs = [fake_stream(0.0, 0.1, 0.01, 8), fake_stream(0.0, 0.2, 0.01, 3, finish="stop")]
    s = loadgen.summarize(rs, wall=1.0, requested=8)
    assert s["count_method"] == "chunks"
    assert s["tokens_delivered"] == 11 and s["tokens_requested"] == 16
    assert s["streams_complete"] == 1
    assert s["tokens_per_stream_min"] == 3 and s["tokens_per_stream_max"] == 8
    assert s["finish_reasons"] == {"length": 1, "stop": 1}
    # one stream with usage and one without: chunks for all (consistent counting)
    rs[0].usage_completion_tokens = 8
    assert loadgen.summarize(rs, 1.0, 8)["count_method"] == "chunks"


def _sse(events):
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events).encode()


def _run_stream(body, chat, status=200):
    def handler(request):
        return httpx.Response(status, content=body, headers={"content-type": "text/event-stream"})

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await loadgen.stream_request(client, "http://test/v1/x", {"stream": True}, chat, 5.0)
    return asyncio.run(go())


def test_stream_request_parses_chat_sse():
    ch = lambda **d: {"object": "chat.completion.chunk", "choices": [dict(index=0, delta=d, finish_reason=None)],
                      "usage": None}
    events = [ch(role="assistant", content=""), ch(content="Hel"), ch(content="lo"),
              {"choices": [dict(index=0, delta={}, finish_reason="length")]},
              {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}, "[DONE]"]
    body = b": ping\n\n" + _sse(events)
    r = _run_stream(body, chat=True)
    assert r.error is None and r.done
    assert r.n_chunks == 2 and r.text == "Hello"          # the role chunk and empty deltas do not count
    assert r.usage_completion_tokens == 3 and r.usage_prompt_tokens == 5
    assert r.finish_reason == "length"
    assert r.ttft is not None and r.ttft >= 0


def test_stream_request_completions_errors():
    body = _sse([{"choices": [{"index": 0, "text": "a", "finish_reason": None}]},
                 {"error": {"message": "boom"}}])
    r = _run_stream(body, chat=False)
    assert r.n_chunks == 1 and "boom" in r.error
    r = _run_stream(b'{"error": "no"}', chat=False, status=500)
    assert r.error.startswith("HTTP 500")


def test_report_renders_without_llamagen():
    run = _runner()
    agg = {"concurrent": {"1": dict(tokens_per_s=50.0, ttft_p50_ms=20.0, ttft_p99_ms=25.0, itl_p50_ms=12.0,
                                    itl_p99_ms=15.0, tokens_delivered=128, tokens_requested=128,
                                    streams_complete=1, errors=0, streams=1, count_method="usage",
                                    finish_reasons={"length": 1}, rounds=1)},
           "chat": dict(turns_ttft_ms=[10.0, 11.0, 12.0, 13.0], turns_prompt_tokens=[20, 90, 160, 230],
                        cold_ttft_ms=200.0, cold_prompt_tokens=230, conversations=1, errors=0)}
    res = dict(date="d", command="python bench/server/run.py", elapsed_s=60, machine="m", load_start=[1],
               load_end=[1], threads=2, parallel=1, ctx_slot=1024, versions={}, rounds=1, tokens=128,
               eog_tokens=[1], chat_tokens=64, concurrency=[1], servers=["llama-server"],
               commands={"llama-server": "llama-server -m MODEL"}, aggregate={"llama-server": agg})
    text = run.write_section(res)
    assert text.startswith(run.HEADING)
    assert "| llama-server | 1 | 50.0 | 128 / 128 |" in text
    assert "| 15.4 |" in text                                # cold / turn 4
    assert "\n### " not in text and text.count("\n## ") == 0  # one section only (replace_section)


def _llama_server_exe():
    """llama-server from this checkout's build directory, built first if it is missing."""
    sys.path.insert(0, os.path.join(ROOT, "bench", "native"))
    from build import llama_tool
    return llama_tool("llama-server")


@pytest.mark.real_model
@pytest.mark.slow
def test_smoke_against_llama_server(real_model_path):
    exe = _llama_server_exe()
    run = _runner()
    model = str(real_model_path)
    port = run.free_port()
    argv = run.build_argv("llama-server", run.DEFAULT_CMDS["llama-server"], dict(
        llama_server=exe, model=model, port=port, parallel=2, ctx_total=1024, threads=2))
    with run.Server("llama-server", argv, "/health", os.path.join(ROOT, "bench", "out", "test-llama-server.log")) as s:
        results, wall = asyncio.run(asyncio.wait_for(loadgen.run_concurrent(s.url, 2, 8), 120))
        summary = loadgen.summarize(results, wall, 8)
        chat = asyncio.run(asyncio.wait_for(loadgen.run_chat(s.url, 2), 120))
    assert summary["errors"] == 0, summary["error_samples"]
    assert summary["count_method"] == "usage"
    assert summary["tokens_delivered"] == 16 and summary["streams_complete"] == 2
    assert summary["ttft_p50_ms"] > 0 and summary["itl_samples"] > 0
    assert all(t["error"] is None and t["ttft_ms"] for t in chat["turns"] + [chat["cold"]])
    prompts = [t["prompt_tokens"] for t in chat["turns"]]
    assert prompts == sorted(prompts) and chat["cold"]["prompt_tokens"] == prompts[-1]


def test_short_streams_note():
    run = _runner()
    ok = dict(tokens=8, finish_reason="length", done=True, error=None)
    cut = dict(tokens=1, finish_reason=None, done=True, error=None)
    runs = [{"concurrent": {"4": {"per_stream": [ok, cut, cut, cut]}, "1": {"per_stream": [ok]}}}]
    note = run.short_streams_note(runs, 8)
    assert note.startswith("3 of 5 streams") and "median 1 tokens" in note and "3 of them" in note
    assert run.short_streams_note([{"concurrent": {"1": {"per_stream": [ok]}}}], 8) is None


def test_lcp_isa_args_leave_amx_out(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_run_isa", os.path.join(ROOT, "bench", "run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma f16c bmi2 avx512f avx512_vnni amx_tile amx_int8\n")
    args = mod.lcp_isa_args(str(amx))
    assert args[0] == "-DGGML_NATIVE=OFF"
    assert "-DGGML_AVX512=ON" in args and "-DGGML_AVX512_VNNI=ON" in args and "-DGGML_AVX512_BF16=OFF" in args
    assert not any("AMX" in a for a in args)
    plain = tmp_path / "plain"
    plain.write_text("flags\t\t: fpu sse4_2 avx avx2\n")
    assert mod.lcp_isa_args(str(plain)) == ["-DGGML_NATIVE=ON"]
