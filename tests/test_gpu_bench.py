"""The GPU benchmark tooling (bench/gpu): the synthetic real-shape model writer and the report.

The tiny preset has the real 128,256-token vocabulary (a synthetic byte-level BPE, Llama 3's
special tokens) and a small body, so llama.cpp's tokenizer, llamagen's sampling at a 128k
vocabulary and llamagen.quantize's K-quants are all exercised in a second or two.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

import llamagen

GPU_DIR = Path(__file__).resolve().parent.parent / "bench" / "gpu"
sys.path.insert(0, str(GPU_DIR))

import synth_model  # noqa: E402


@pytest.fixture(scope="module")
def synth_tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "tiny-f16.gguf"
    info = synth_model.write_synth_model(path, "tiny", seed=0)
    return path, info


@pytest.fixture(scope="module")
def synth_model_loaded(synth_tiny):
    with llamagen.Model(synth_tiny[0]) as m:
        yield m


def test_vocabulary_is_llama3_sized_with_its_special_tokens(synth_tiny, synth_model_loaded):
    path, info = synth_tiny
    m = synth_model_loaded
    assert info["vocab_size"] == m.n_vocab == 128256
    assert m.bos == 128000 and m.eos == 128001 and m.eot == 128009
    assert m.token_text(128000) == "<|begin_of_text|>"
    assert m.is_eog(128001) and m.is_eog(128009) and not m.is_eog(1000)
    assert m.is_control(128000) and not m.is_control(5000)
    assert m.add_bos
    assert m.tokenize("hi")[0] == 128000
    assert m.metadata["tokenizer.ggml.model"] == "gpt2"
    assert m.metadata["tokenizer.ggml.pre"] == "llama-bpe"
    assert info["bytes"] == os.path.getsize(path)


def test_vocabulary_is_deterministic_and_merges_reach_every_token():
    tokens, types, merges, ids = synth_model.synth_vocab(seed=3)
    tokens2, _types, merges2, _ids = synth_model.synth_vocab(seed=3)
    assert tokens == tokens2 and merges == merges2
    assert len(tokens) == len(set(tokens)) == 128256
    known = set(tokens[:256])
    for merge in merges:                      # each merge joins two tokens that exist before it
        left, right = merge.split(" ")
        assert left in known and right in known, merge
        known.add(left + right)
    assert known == set(tokens[:128000])
    assert ids == dict(bos=128000, eos=128001, eot=128009)


@pytest.mark.parametrize("text", [
    "Hello world, this is a test.",
    "héllo wörld ✓ 日本語 🙂 \x00\x7f",
    "\n\n\tindented   spaces  ",
    "1234567890 x!@#$%^&*() <|not_special|>",
])
def test_any_text_round_trips(synth_model_loaded, text):
    m = synth_model_loaded
    toks = m.tokenize(text, add_special=False)
    assert toks and all(0 <= t < 128000 for t in toks)
    assert m.detokenize(toks) == text


def test_shapes_and_dtypes(synth_tiny):
    import gpu_bench
    path, info = synth_tiny
    meta, t = gpu_bench.read_gguf_index(path)
    assert t["token_embd.weight"][:2] == ([256, 128256], "F16")        # ggml order (ne0, ne1)
    assert t["blk.0.attn_k.weight"][0] == [256, 128]                   # 2 KV heads of 64
    assert t["blk.1.ffn_down.weight"][0] == [512, 256]
    assert t["blk.0.attn_norm.weight"][1] == "F32"
    assert "output.weight" not in t                                    # tied, like Llama 3.2 1B
    assert info["n_params"] == sum(int(np.prod(s)) for s, _, _ in t.values())
    assert meta["llama.rope.freq_base"] == 500000.0
    assert meta["llama.attention.head_count_kv"] == 2
    assert meta["tokenizer.ggml.tokens"].count == 128256
    assert meta["general.file_type"] == 1                              # MOSTLY_F16


def test_gguf_index_agrees_with_gguf_reader(tmp_path):
    import gpu_bench
    path = synth_model.write_synth_model(tmp_path / "small.gguf", "tiny", vocab_size=1000)["path"]
    q = llamagen.quantize(path, tmp_path / "small-q4.gguf", "Q4_K_M").path
    for p in (path, q):
        _meta, t = gpu_bench.read_gguf_index(p)
        r = gguf.GGUFReader(p)
        assert t == {x.name: (list(map(int, x.shape)), x.tensor_type.name, int(x.n_bytes))
                     for x in r.tensors}


def test_presets_have_the_real_shapes():
    one, eight = synth_model.PRESETS["llama-3.2-1b"], synth_model.PRESETS["llama-3.1-8b"]
    def n(cfg):
        return sum(int(np.prod(shape)) for _, shape, _ in synth_model.tensor_plan(cfg, 128256))

    assert one["tied"] and not eight["tied"]
    assert n(one) == 1_235_814_400          # Llama 3.2 1B
    assert n(eight) == 8_030_261_248        # Llama 3.1 8B


def test_generation_gives_varied_tokens(synth_model_loaded):
    with llamagen.Context(synth_model_loaded, n_ctx=256) as ctx:
        st = llamagen.gen_begin(ctx, "Once upon a time", max_new_tokens=32, seed=1, ignore_eos=True)
        text = "".join(st) + st.end()
        assert len(st.tokens) == 32 and isinstance(text, str)
        assert len(set(st.tokens)) > 10
        t = st.timings
        assert t["sample_ms"] <= t["decode_ms"]


def test_quantize_to_q4_k_m(synth_tiny, tmp_path):
    import gpu_bench
    r = llamagen.quantize(synth_tiny[0], tmp_path / "q4.gguf", "Q4_K_M")
    types = {name: t[1] for name, t in gpu_bench.read_gguf_index(r.path)[1].items()}
    assert types["blk.0.ffn_up.weight"] == "Q4_K"
    assert types["token_embd.weight"] in ("Q6_K", "Q4_K")     # tied: also the output matrix
    assert r.dst_size < r.src_size / 2
    with llamagen.Model(r.path) as m, llamagen.Context(m, n_ctx=128) as ctx:
        st = llamagen.gen_begin(ctx, "x", max_new_tokens=4, ignore_eos=True)
        "".join(st)
        assert len(st.tokens) == 4


def test_bytes_per_token_and_report(synth_tiny, tmp_path):
    import gpu_bench
    path = synth_tiny[0]
    b = gpu_bench.bytes_per_token(str(path), 100)
    assert b["tied"]
    assert 0.9 * os.path.getsize(path) < b["weight_bytes_read"] < os.path.getsize(path)
    assert b["kv_bytes_read"] == 2 * 2 * 128 * 2 * 100
    res = gpu_bench.Results(str(tmp_path))
    res.set("bandwidth", dict(method="x", bytes=2**30, iters=2, ms=1.0, d2d_bytes_per_s=3e12,
                              logits_bytes=513024, d2h_logits_us_pinned=20.0, d2h_logits_us_pageable=None))
    res.set("single", {"tiny": dict(llama_bench_tg128=100.0, llama_bench_stddev=1.0,
                                    greedy=dict(generate=98.0, ratio_vs_llama_bench=0.98, stream=97.0),
                                    default=dict(generate=96.0, ratio_vs_llama_bench=0.96, stream=95.0),
                                    bytes_per_token=b, ceiling_tps=200.0, llama_bench_fraction=0.5)})
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["single"]["tiny"]["greedy"]["generate"] == 98.0
    md = (tmp_path / "RESULTS-gpu.md").read_text()
    assert "## Single stream" in md and "| tiny | 100.0 ± 1.0 | 98.0 | 0.980 |" in md
    assert "3,000 GB/s" in md


def test_time_split_measures_every_engine_and_renders(synth_tiny, tmp_path):
    # the "where the time goes" section: fast, llama.cpp's chain and llama.cpp's backend sampling
    # on one model (CPU here, the GPU in bench/gpu/run.sh), with each engine's tokens compared
    import gpu_bench
    split = gpu_bench.bench_split("tiny", str(synth_tiny[0]), False, None, None)
    rows = {(r["chain"], r["sampler_impl"]): r for r in split["rows"]}
    assert {impl for _c, impl in rows} == {"fast", "llama.cpp", "backend"}
    for (chain, impl), r in rows.items():
        assert r["engine"] == impl
        assert r["tokens_per_s"] > 0 and 0 <= r["sample_ms"] <= r["step_ms"]
    # greedy is an argmax whichever side computes it; llama.cpp's chain is token-identical to fast
    assert rows[("greedy", "backend")]["same_tokens_as_fast"] == 1.0
    assert rows[("default", "llama.cpp")]["same_tokens_as_fast"] == 1.0
    res = gpu_bench.Results(str(tmp_path))
    res.set("split", {"tiny": split})
    md = (tmp_path / "RESULTS-gpu.md").read_text()
    assert "## Where the time goes per token" in md and "| tiny | greedy | backend |" in md


def test_serving_section_runs_both_servers_and_renders(synth_tiny, tmp_path):
    # `llamagen serve` vs `llama-server` with the same slots (CPU here, every layer on the GPU in
    # bench/gpu/run.sh): every stream delivered, both rows and the ratios in the report
    import gpu_bench
    backend = llamagen.build_info()["backend"]
    if not os.path.exists(gpu_bench.tool_exe(backend, "llama-server")):
        from build import build_targets            # as .ci/run does; a no-op once built
        build_targets("llama-server", backend=backend)
    sv = gpu_bench.bench_serve("tiny", str(synth_tiny[0]), False, [1, 3], 6, 1, time.time() + 120,
                               str(tmp_path / "logs"))
    assert set(sv["servers"]) == {"llamagen", "llama-server"}
    for name, x in sv["servers"].items():
        assert "error" not in x, (name, x)
        for n in ("1", "3"):
            r = x["rows"][n]
            assert r["errors"] == 0 and r["tokens_delivered"] == r["tokens_requested"] == 6 * int(n), (name, r)
            assert r["tokens_per_s"] > 0 and r["ttft_p50_ms"] > 0
    assert "--n-gpu-layers 0" in sv["commands"]["llamagen"] and "-ngl 0" in sv["commands"]["llama-server"]
    assert sv["ratios"]["3"]["tokens_per_s"] == pytest.approx(
        sv["servers"]["llamagen"]["rows"]["3"]["tokens_per_s"] / sv["servers"]["llama-server"]["rows"]["3"]["tokens_per_s"])
    res = gpu_bench.Results(str(tmp_path))
    res.set("serve", {"tiny": sv})
    md = (tmp_path / "RESULTS-gpu.md").read_text()
    assert "## Serving: llamagen serve vs llama-server" in md
    assert "| tiny | 3 | llamagen |" in md and "| tiny | 3 | llama-server |" in md
    assert "llamagen serve tiny, 3 streams:" in md          # the comparison among the targets


def test_pytest_args_leave_out_only_what_cannot_be_imported(tmp_path):
    # the GPU image lacks the test-only clients: a module importing one is left out by name (one
    # missing package must not stop the whole run at collection), everything else is kept
    import gpu_bench
    (tmp_path / "helper_here.py").write_text("X = 1\n")
    (tmp_path / "test_needs_missing.py").write_text("import os\nimport llamagen_no_such_package.sub\n")
    (tmp_path / "test_from_missing.py").write_text("from llamagen_no_such_package_2 import x\n")
    (tmp_path / "test_fine.py").write_text(
        "import json\nimport numpy\nimport helper_here\nimport synth_model\nfrom llamagen import Model\n"
        "def test_x():\n    import llamagen_no_such_package_3\n")
    args, left_out = gpu_bench.pytest_args(str(tmp_path))
    ignored = sorted(os.path.basename(a) for a in args if a.startswith("--ignore="))
    assert ignored == ["test_from_missing.py", "test_needs_missing.py"]
    assert any("llamagen_no_such_package not installed" in x for x in left_out)
    # both model packages are installed where the suite runs in full (the test extra): no -m
    assert "-m" not in args
