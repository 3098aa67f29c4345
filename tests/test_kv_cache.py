"""KV cache element types (issue 30): ``Context(type_k=, type_v=)``, the engine's and the server's
``-ctk`` / ``-ctv``; what a cached token costs; perplexity beside llama-perplexity's."""
from __future__ import annotations

import re
import subprocess

import httpx
import pytest

import llamagen
from llamagen import _core
from llamagen._util import KV_TYPES
from llamagen.engine import AsyncEngine

from server_util import serving
from test_logprobs import PPL_TEXT, llama_perplexity_exe, llamagen_perplexity


def test_the_cli_lists_the_types_the_core_takes():
    assert set(KV_TYPES) == set(_core._KV_TYPES)


def _state_per_token(ctx, n):
    return ctx.seq_state_size(0) / n


@pytest.mark.parametrize("tk, tv, ratio", [("q8_0", "q8_0", 0.54), ("q4_0", "q4_0", 0.29),
                                            ("q8_0", "f16", 0.77)])
def test_quantized_cache_costs_less_per_token_and_still_generates(real_model, tk, tv, ratio):
    prompt = real_model.tokenize(PPL_TEXT)[:200]
    sizes = {}
    for k, v in (("f16", "f16"), (tk, tv)):
        with llamagen.Context(real_model, n_ctx=512, type_k=k, type_v=v) as ctx:
            assert (ctx.type_k, ctx.type_v) == (k, v)
            text = llamagen.generate(ctx, prompt, max_new_tokens=16, temp=0)
            assert len(text) > 10
            sizes[k, v] = _state_per_token(ctx, len(prompt) + 15)
    assert sizes[tk, tv] / sizes["f16", "f16"] == pytest.approx(ratio, abs=0.02)


def test_bad_types_are_clear_errors(real_model):
    with pytest.raises(ValueError, match="type_k must be one of") as e:
        llamagen.Context(real_model, type_k="q3_k")
    assert e.value.field == "type_k"
    with pytest.raises(ValueError, match="needs flash attention") as e:
        llamagen.Context(real_model, type_v="q8_0", flash_attn=False)
    assert e.value.field == "type_v"
    with pytest.raises(ValueError, match="type_v"):
        llamagen.Context(real_model, type_v=8)
    # a quantized K alone works without flash attention
    with llamagen.Context(real_model, n_ctx=256, type_k="q8_0", flash_attn=False) as ctx:
        assert llamagen.generate(ctx, "Hello", max_new_tokens=4, temp=0)


@pytest.mark.slow
@pytest.mark.parametrize("tk, tv", [("q8_0", "q8_0"), ("q4_0", "q4_0")])
def test_perplexity_with_a_quantized_cache_matches_llama_perplexity(real_model, real_model_path,
                                                                   tmp_path, tk, tv):
    path = tmp_path / "text.txt"
    path.write_text(PPL_TEXT)
    out = subprocess.run([llama_perplexity_exe(), "-m", str(real_model_path), "-f", str(path),
                          "-c", "128", "-b", "128", "-t", "2", "-ctk", tk, "-ctv", tv, "-fa", "on"],
                         capture_output=True, text=True, timeout=600)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    assert out.returncode == 0 and m, (out.stdout + out.stderr)[-2000:]
    ours = llamagen_perplexity(real_model, PPL_TEXT, 128, type_k=tk, type_v=tv)
    assert ours == pytest.approx(float(m.group(1)), rel=2e-4)
    plain = llamagen_perplexity(real_model, PPL_TEXT, 128)
    assert ours != plain and ours == pytest.approx(plain, rel=0.1)   # changed, not broken


def test_deterministic_mode_with_a_quantized_cache(real_model):
    # batch-invariant kernels read quantized K/V too: alone == beside another sequence
    with llamagen.Context(real_model, n_ctx=1024, n_seq_max=2, kv_unified=True, deterministic=True,
                          type_k="q8_0", type_v="q8_0") as ctx:
        alone = llamagen.generate(ctx, "The history of the bicycle", max_new_tokens=16, temp=0)
        b = llamagen.BatchGenerator(ctx, n_parallel=2, max_new_tokens=16, temp=0)
        a = b.add("The history of the bicycle")
        b.add("Once upon a time, in a faraway land,")
        texts = {}
        for sid, chunk in b:
            texts[sid] = texts.get(sid, "") + chunk
        assert texts[a] == alone


def test_engine_and_server_take_the_types(real_model, real_model_path, tmp_path_factory):
    with AsyncEngine(real_model, n_ctx=1024, n_parallel=2, type_k="q8_0", type_v="q8_0") as e:
        assert (e._ctx.type_k, e._ctx.type_v) == ("q8_0", "q8_0")
        assert e.generate_sync("Hello", max_new_tokens=4, temp=0).tokens
    gen = serving(tmp_path_factory, "kvq", real_model_path, "--ctx-size", 1024, "--parallel", 2,
                  "-ctk", "q8_0", "-ctv", "q4_0")
    srv = next(gen)
    try:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 4},
                       timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        next(gen, None)
