"""What the built extension says about itself, and what ships with it."""
from __future__ import annotations

import importlib.machinery
import os
import re
from pathlib import Path

import pytest

import llamagen

PACKAGE_DIR = Path(llamagen.__file__).resolve().parent
# The backend this test run expects the extension to be built with: the build's own variable
# (bench/gpu/run.sh builds and tests with LLAMAGEN_BACKEND=cuda), "cpu" by default.
EXPECTED_BACKEND = (os.environ.get("LLAMAGEN_TEST_BACKEND") or os.environ.get("LLAMAGEN_BACKEND")
                    or "cpu").strip().lower()
GPU_BUILD = EXPECTED_BACKEND in ("cuda", "metal")


def test_version():
    assert isinstance(llamagen.__version__, str)
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)*", llamagen.__version__)


def test_build_info_keys_and_types():
    info = llamagen.build_info()
    expected = {"backend", "llama_cpp_commit", "llama_cpp_version", "ggml_native", "cuda", "metal",
                "build_type", "compiler", "cmake_args", "gpu_offload", "amx"}
    assert expected <= set(info)
    for key in ("backend", "llama_cpp_commit", "llama_cpp_version", "build_type", "compiler",
                "cmake_args"):
        assert isinstance(info[key], str), key
    for key in ("ggml_native", "cuda", "metal", "gpu_offload", "amx"):
        assert isinstance(info[key], bool), key


def test_build_info_values():
    info = llamagen.build_info()
    assert info["backend"] == EXPECTED_BACKEND
    assert info["llama_cpp_commit"] == "0c1e57098bba"
    assert info["llama_cpp_version"]
    assert info["cuda"] is (EXPECTED_BACKEND == "cuda")
    assert info["metal"] is (EXPECTED_BACKEND == "metal")
    # a CPU build cannot offload layers to a GPU; a GPU build can
    assert info["gpu_offload"] is GPU_BUILD
    assert info["build_type"] == "Release"


def test_amx_kernels_left_out_by_default():
    # ggml's AMX kernels (compiled in by -march=native on Sapphire Rapids and newer) segfault on
    # Q4_K_M models at the pinned commit: the build leaves them out unless LLAMAGEN_AMX=1
    if os.environ.get("LLAMAGEN_AMX") == "1":
        pytest.skip("built with LLAMAGEN_AMX=1")
    assert llamagen.build_info()["amx"] is False
    assert "AMX_INT8 = 1" not in llamagen.system_info()


def test_build_info_returns_a_fresh_dict():
    info = llamagen.build_info()
    info["backend"] = "changed"
    assert llamagen.build_info()["backend"] == EXPECTED_BACKEND


def test_backend_devices():
    devices = llamagen.backend_devices()
    assert isinstance(devices, list) and devices
    for dev in devices:
        assert isinstance(dev, llamagen.Device)
        assert isinstance(dev, tuple) and len(dev) == 4
        assert dev._fields == ("name", "description", "type", "memory")
        assert isinstance(dev.name, str) and dev.name
        assert isinstance(dev.description, str)
        assert isinstance(dev.memory, int) and dev.memory >= 0
    cpus = [d for d in devices if d.type == "cpu"]
    assert len(cpus) == 1
    assert cpus[0].name.lower().startswith("cpu")
    gpus = [d for d in devices if d.type in ("gpu", "igpu")]
    if GPU_BUILD:
        # the GPU with its memory (CUDA0: "NVIDIA H100 80GB HBM3", ...)
        assert gpus, devices
        assert all(d.memory > 2**30 for d in gpus), gpus
    else:
        # a CPU build has no GPU device
        assert not gpus


@pytest.mark.skipif(not GPU_BUILD, reason="a GPU build (LLAMAGEN_BACKEND=cuda/metal) only")
def test_gpu_offloads_every_layer(make_tiny_model, caplog):
    import logging
    path = make_tiny_model(n_layer=3)
    caplog.set_level(logging.INFO, logger="llamagen")
    with llamagen.Model(path, n_gpu_layers=-1) as model:
        lines = [r.getMessage() for r in caplog.records if "offloaded" in r.getMessage()]
        assert any("offloaded 4/4 layers to GPU" in m for m in lines), lines
        with llamagen.Context(model, n_ctx=256) as ctx:
            st = llamagen.gen_begin(ctx, "hello world", max_new_tokens=16, temp=0, ignore_eos=True)
            text = "".join(st) + st.end()
            assert len(st.tokens) == 16 and isinstance(text, str)
    caplog.clear()
    with llamagen.Model(path, n_gpu_layers=0):
        lines = [r.getMessage() for r in caplog.records if "offloaded" in r.getMessage()]
        assert any("offloaded 0/4 layers to GPU" in m for m in lines), lines


def test_system_info():
    info = llamagen.system_info()
    assert isinstance(info, str)
    assert info.strip()
    assert "CPU" in info


def test_llama_cpp_license_ships_next_to_the_extension():
    lic = PACKAGE_DIR / "LICENSE.llama.cpp"
    assert lic.is_file(), f"{lic} is missing: llama.cpp's MIT license must travel with the binary"
    text = lic.read_text(encoding="utf-8")
    assert text.startswith("MIT License")
    assert "ggml authors" in text
    core = Path(llamagen._core.__file__).resolve()
    assert core.parent == lic.parent


def test_exactly_one_extension_module():
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    found = []
    for root, dirs, files in os.walk(PACKAGE_DIR):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found += [Path(root, f) for f in files if f.endswith(suffixes)]
    assert len(found) == 1, found
    assert found[0].name.split(".")[0] == "_core"
    assert found[0].resolve() == Path(llamagen._core.__file__).resolve()


def test_core_module_constants():
    assert llamagen._core.MAX_PARALLEL_SEQUENCES == 256
    assert isinstance(llamagen._core.DEFAULT_SEED, int)


# -- our patches to the pinned llama.cpp (third_party/llama_cpp-*.patch) -------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _fetch_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("fetch_llama_cpp",
                                                  ROOT / "third_party" / "fetch_llama_cpp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_patches_are_applied_to_the_unpacked_source():
    fetch = _fetch_module()
    patches = fetch.patch_files()
    assert [Path(p).name for p in patches] == ["llama_cpp-0001-ggml-cpu-flash-attn-no-split-kv.patch",
                                               "llama_cpp-0002-ggml-cpu-batch-invariant.patch",
                                               "llama_cpp-0003-jinja-limits.patch",
                                               "llama_cpp-0004-tokenizer-linear-partition.patch",
                                               "llama_cpp-0005-grammar-valid-utf8.patch",
                                               "llama_cpp-0006-autoparser-output-cap.patch",
                                               "llama_cpp-0007-grammar-clone-linear.patch",
                                               "llama_cpp-0008-ggml-cpu-one-row.patch",
                                               "llama_cpp-0009-ggml-cpu-sgemm-vnni512.patch",
                                               "llama_cpp-0010-ggml-cpu-fa-unified-cache.patch"]
    if os.environ.get("LLAMAGEN_LLAMA_CPP_DIR"):
        pytest.skip("built against the user's own llama.cpp checkout (built as it is)")
    cpu = ROOT / "third_party" / "llama.cpp" / "ggml" / "src" / "ggml-cpu"
    ops = (cpu / "ops.cpp").read_text()
    assert "LLAMAGEN_FA_SPLIT_KV" in ops
    assert "lg_fa_next_unmasked" in ops
    assert "ggml_compute_forward_flash_attn_ext_f16_canonical" in ops
    assert "batch_invariant" in (cpu / "repack.cpp").read_text()
    src = ROOT / "third_party" / "llama.cpp"
    assert "lg_budget_scope" in (src / "common" / "jinja" / "utils.h").read_text()
    assert "std::distance(buffer.begin(), it)" not in (src / "src" / "llama-vocab.cpp").read_text()
    assert "C0, C1 and F5-FF never start UTF-8" in (src / "src" / "llama-grammar.cpp").read_text()
    assert "sorted index of the rules' storage" in (src / "src" / "llama-grammar.cpp").read_text()
    assert "LG_MAX_ANALYSIS_BYTES" in (src / "common" / "chat-auto-parser-helpers.cpp").read_text()
    assert "params->batch_invariant" in (cpu / "tiled" / "tiled.cpp").read_text()
    assert "params->one_row" in (cpu / "llamafile" / "sgemm.cpp").read_text()
    assert "lg_vec_dot_q5_0_q8_0_x2" in (cpu / "ggml-cpu.c").read_text()
    assert "void lg_matmul(int64_t m, int64_t n)" in (cpu / "llamafile" / "sgemm.cpp").read_text()
    jinja = ROOT / "third_party" / "llama.cpp" / "common" / "jinja" / "runtime.cpp"
    assert "lg_macro_depth" in jinja.read_text()
    # the unpacked tree is stamped with the pin and the patches: a changed patch unpacks afresh
    stamp = (ROOT / "third_party" / "llama.cpp" / fetch.MARKER).read_text().strip()
    assert stamp == fetch.load_pin()["stamp"]


def test_a_patch_that_does_not_apply_is_refused(tmp_path, monkeypatch):
    fetch = _fetch_module()
    tree = tmp_path / "tree"
    (tree / "ggml").mkdir(parents=True)
    (tree / "ggml" / "x.c").write_text("int a = 1;\n")
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "llama_cpp-0001-bad.patch").write_text(
        "--- a/ggml/x.c\n+++ b/ggml/x.c\n@@ -1 +1 @@\n-int a = 2;\n+int a = 3;\n")
    monkeypatch.setattr(fetch, "PATCHES", str(patches))
    with pytest.raises(fetch.FetchError, match="llama_cpp-0001-bad.patch does not apply"):
        fetch._apply_patches(str(tree))
    (patches / "llama_cpp-0001-bad.patch").write_text(
        "--- a/ggml/x.c\n+++ b/ggml/x.c\n@@ -1 +1 @@\n-int a = 1;\n+int a = 3;\n")
    fetch._apply_patches(str(tree))
    assert (tree / "ggml" / "x.c").read_text() == "int a = 3;\n"
