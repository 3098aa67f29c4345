"""llamagen.quantize (llama_model_quantize) and `llamagen quantize`: types written, sizes, the
quantized model loads and generates, and bad inputs raise the documented exceptions (never abort)."""
from __future__ import annotations

import json
import os
import time

import gguf
import pytest

import llamagen
from llamagen import cli
from tiny_gguf import QUANTIZABLE, write_tiny_gguf

WEIGHTS_2D = ("token_embd.weight", "output.weight", "attn_q.weight", "attn_k.weight",
              "attn_v.weight", "attn_output.weight", "ffn_gate.weight", "ffn_up.weight",
              "ffn_down.weight")


@pytest.fixture(scope="module")
def qdir(tmp_path_factory):
    return tmp_path_factory.mktemp("quantize")


@pytest.fixture(scope="module")
def src_f32(qdir):
    return write_tiny_gguf(qdir / "src-f32.gguf", seed=5, **QUANTIZABLE)


@pytest.fixture(scope="module")
def src_f16(qdir):
    return write_tiny_gguf(qdir / "src-f16.gguf", seed=5, dtype="f16", **QUANTIZABLE)


def tensor_types(path) -> dict[str, str]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: t.tensor_type.name for t in reader.tensors}


def file_type(path) -> int:
    reader = gguf.GGUFReader(str(path))
    return int(reader.fields["general.file_type"].parts[-1][0])


def is_2d_weight(name: str) -> bool:
    return name.endswith(WEIGHTS_2D)


def generate_some(path, n=8):
    with llamagen.Model(path) as model, llamagen.Context(model, n_ctx=128) as ctx:
        st = llamagen.gen_begin(ctx, "hello world", max_new_tokens=n, temp=0, ignore_eos=True)
        text = "".join(st) + st.end()
        return model.n_params, st.tokens, text


def leftovers(folder):
    return [f for f in os.listdir(folder) if f.endswith(".partial")]


# -- what gets written ---------------------------------------------------------------------------

@pytest.mark.parametrize("src_name", ["src_f32", "src_f16"])
@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_K_M"])
def test_quantize_types_sizes_and_generation(request, qdir, src_name, ftype):
    src = request.getfixturevalue(src_name)
    dst = qdir / f"{src_name}-{ftype}.gguf"
    r = llamagen.quantize(src, dst, ftype)
    assert isinstance(r, llamagen.QuantizeResult)
    assert r.path == str(dst) and r.ftype == ftype
    assert r.src_size == os.path.getsize(src)
    assert r.dst_size == os.path.getsize(dst)
    assert 0 < r.dst_size < r.src_size
    assert r.seconds >= 0
    assert file_type(dst) == llamagen.QUANT_TYPES[ftype]

    types = tensor_types(dst)
    assert set(types) == set(tensor_types(src))
    for name, t in types.items():
        if not is_2d_weight(name):
            assert t == "F32", (name, t)          # norms are never quantized
        elif ftype == "Q8_0":
            assert t == "Q8_0", (name, t)
        else:
            # Q4_K_M: Q4_K, with Q6_K for output.weight and some attn_v / ffn_down
            assert t in ("Q4_K", "Q6_K"), (name, t)
    if ftype == "Q4_K_M":
        assert types["output.weight"] == "Q6_K"
        assert sum(t == "Q4_K" for t in types.values()) > len(types) // 2

    n_params, tokens, _text = generate_some(dst)
    assert len(tokens) == 8
    assert n_params == generate_some(src, n=1)[0]
    assert not leftovers(qdir)


def test_names_are_case_insensitive_aliases_and_numbers(qdir, src_f16):
    r = llamagen.quantize(src_f16, qdir / "lower.gguf", "q4_k_m")
    assert r.ftype == "Q4_K_M"
    r = llamagen.quantize(src_f16, qdir / "alias.gguf", " Q4_K ")
    assert r.ftype == "Q4_K_M"                     # llama-quantize's alias
    r = llamagen.quantize(src_f16, qdir / "number.gguf", 7)
    assert r.ftype == "Q8_0"
    assert tensor_types(qdir / "number.gguf")["blk.0.attn_q.weight"] == "Q8_0"
    r = llamagen.quantize(src_f16, qdir / "default.gguf")
    assert r.ftype == "Q4_K_M"


def test_other_types(qdir, src_f16):
    for ftype, expect in (("Q6_K", {"Q6_K"}), ("Q5_K_M", {"Q5_K", "Q6_K"}), ("BF16", {"BF16"}),
                          ("Q4_0", {"Q4_0", "Q6_K"})):
        dst = qdir / f"other-{ftype}.gguf"
        llamagen.quantize(src_f16, dst, ftype)
        got = {t for n, t in tensor_types(dst).items() if is_2d_weight(n)}
        assert got <= expect and got, (ftype, got)


def test_pure_and_output_tensor_options(qdir, src_f16):
    pure = qdir / "pure.gguf"
    llamagen.quantize(src_f16, pure, "Q4_K_M", pure=True)
    assert {t for n, t in tensor_types(pure).items() if is_2d_weight(n)} == {"Q4_K"}
    keep = qdir / "keep-output.gguf"
    llamagen.quantize(src_f16, keep, "Q8_0", quantize_output_tensor=False)
    types = tensor_types(keep)
    assert types["output.weight"] == "F16"
    assert types["blk.0.ffn_up.weight"] == "Q8_0"


def test_copy_keeps_the_tensor_types(qdir, src_f16):
    dst = qdir / "copy.gguf"
    r = llamagen.quantize(src_f16, dst, "copy")
    assert r.ftype == "COPY"
    assert tensor_types(dst) == tensor_types(src_f16)
    assert generate_some(dst)[1] == generate_some(src_f16)[1]


def test_existing_dst_is_replaced(qdir, src_f16):
    dst = qdir / "replaced.gguf"
    dst.write_bytes(b"old content")
    r = llamagen.quantize(src_f16, dst, "Q8_0")
    assert r.dst_size == dst.stat().st_size > 100
    assert tensor_types(dst)["blk.0.attn_q.weight"] == "Q8_0"


def test_n_threads(qdir, src_f16):
    a = llamagen.quantize(src_f16, qdir / "t1.gguf", "Q4_K_M", n_threads=1)
    b = llamagen.quantize(src_f16, qdir / "t3.gguf", "Q4_K_M", n_threads=3)
    assert (qdir / "t1.gguf").read_bytes() == (qdir / "t3.gguf").read_bytes()
    assert a.dst_size == b.dst_size
    for bad in (0, -1):
        with pytest.raises(ValueError, match="n_threads"):
            llamagen.quantize(src_f16, qdir / "bad.gguf", "Q8_0", n_threads=bad)
    with pytest.raises(TypeError):
        llamagen.quantize(src_f16, qdir / "bad.gguf", "Q8_0", n_threads=2.0)


# -- bad inputs ----------------------------------------------------------------------------------

def test_unknown_type_names_the_valid_ones(qdir, src_f16):
    with pytest.raises(ValueError, match="Q4_K_M") as e:
        llamagen.quantize(src_f16, qdir / "x.gguf", "Q4_K_X")
    assert "Q8_0" in str(e.value) and "F16" in str(e.value)
    with pytest.raises(ValueError, match="llama_ftype"):
        llamagen.quantize(src_f16, qdir / "x.gguf", 999)
    with pytest.raises(ValueError):
        llamagen.quantize(src_f16, qdir / "x.gguf", 4)   # a removed type number
    for bad in (4.0, None, True):
        with pytest.raises(TypeError):
            llamagen.quantize(src_f16, qdir / "x.gguf", bad)
    assert not (qdir / "x.gguf").exists()


def test_missing_paths(qdir, src_f16):
    with pytest.raises(FileNotFoundError):
        llamagen.quantize(qdir / "no-such.gguf", qdir / "y.gguf")
    with pytest.raises(FileNotFoundError):
        llamagen.quantize(qdir, qdir / "y.gguf")                     # a directory
    with pytest.raises(FileNotFoundError):
        llamagen.quantize(src_f16, qdir / "no-such-dir" / "y.gguf")
    with pytest.raises(ValueError, match="directory"):
        llamagen.quantize(src_f16, qdir)
    assert not (qdir / "y.gguf").exists()


def test_src_and_dst_the_same_file(qdir, src_f16, tmp_path):
    before = src_f16.read_bytes()
    with pytest.raises(ValueError, match="same file"):
        llamagen.quantize(src_f16, src_f16)
    with pytest.raises(ValueError, match="same file"):
        llamagen.quantize(src_f16, os.path.join(os.path.dirname(src_f16), ".", src_f16.name))
    link = tmp_path / "link.gguf"
    link.symlink_to(src_f16)
    with pytest.raises(ValueError, match="same file"):
        llamagen.quantize(src_f16, link)
    assert src_f16.read_bytes() == before


def _bad_files(folder, good):
    data = good.read_bytes()
    files = {
        "empty": b"",
        "garbage": bytes(range(256)) * 8,
        "text": b"this is not a model\n" * 50,
        "magic-then-garbage": b"GGUF" + bytes(range(255, -1, -1)) * 8,
        "truncated-header": data[:4000],
        "truncated-data": data[: len(data) // 2],
    }
    out = {}
    for name, content in files.items():
        p = folder / f"bad-{name}.gguf"
        p.write_bytes(content)
        out[name] = p
    return out


def test_bad_model_files_raise_model_load_error(qdir, src_f32):
    for name, path in _bad_files(qdir, src_f32).items():
        dst = qdir / f"out-{name}.gguf"
        with pytest.raises(llamagen.ModelLoadError) as e:
            llamagen.quantize(path, dst, "Q4_K_M")
        assert str(path) in str(e.value), name
        assert e.value.reason, name
        assert not dst.exists(), name
    assert not leftovers(qdir)


def test_unknown_architecture(qdir):
    src = write_tiny_gguf(qdir / "alien.gguf", arch="llamagen-no-such-arch")
    with pytest.raises(llamagen.ModelLoadError, match="architecture"):
        llamagen.quantize(src, qdir / "alien-q8.gguf", "Q8_0")
    assert not (qdir / "alien-q8.gguf").exists()


def test_requantizing_needs_allow_requantize(qdir, src_f16):
    q8 = qdir / "rq-q8.gguf"
    llamagen.quantize(src_f16, q8, "Q8_0")
    dst = qdir / "rq-q4.gguf"
    with pytest.raises(llamagen.QuantizeError, match="requantiz") as e:
        llamagen.quantize(q8, dst, "Q4_K_M")
    assert isinstance(e.value, llamagen.LlamaError)
    assert e.value.ftype == "Q4_K_M" and "falling back" not in e.value.reason
    assert not dst.exists() and not leftovers(qdir)
    r = llamagen.quantize(q8, dst, "Q4_K_M", allow_requantize=True)
    assert tensor_types(dst)["blk.0.attn_q.weight"] == "Q4_K"
    assert len(generate_some(r.path)[1]) == 8


def test_type_that_needs_an_importance_matrix(qdir, src_f16):
    dst = qdir / "iq2.gguf"
    with pytest.raises(llamagen.QuantizeError, match="imatrix|importance"):
        llamagen.quantize(src_f16, dst, "IQ2_XXS")
    assert not dst.exists() and not leftovers(qdir)


def test_fallback_types_for_rows_not_divisible_by_256(qdir):
    # the default tiny model (n_embd 64): llama.cpp falls back to other types, and succeeds
    src = write_tiny_gguf(qdir / "small.gguf")
    dst = qdir / "small-q4km.gguf"
    llamagen.quantize(src, dst, "Q4_K_M")
    assert "Q4_K" not in tensor_types(dst).values()
    assert len(generate_some(dst)[1]) == 8


# -- command line --------------------------------------------------------------------------------

def test_cli_quantize(qdir, src_f16, capsys):
    dst = qdir / "cli.gguf"
    assert cli.main(["quantize", str(src_f16), str(dst), "q8_0", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert str(dst) in out and "Q8_0" in out and "MiB" in out
    assert tensor_types(dst)["blk.0.attn_q.weight"] == "Q8_0"

    dst2 = qdir / "cli-default.gguf"
    assert cli.main(["quantize", str(src_f16), str(dst2), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ftype"] == "Q4_K_M" and res["path"] == str(dst2)
    assert res["dst_size"] == dst2.stat().st_size

    assert cli.main(["quantize", "--list-types"]) == 0
    assert "Q4_K_M" in capsys.readouterr().out.split()


def test_cli_quantize_errors(qdir, src_f16, capsys):
    assert cli.main(["quantize", str(src_f16), str(qdir / "e.gguf"), "Q9_K"]) == 2
    assert "unknown quantization type" in capsys.readouterr().err
    assert cli.main(["quantize", str(qdir / "missing.gguf"), str(qdir / "e.gguf")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = qdir / "cli-garbage.gguf"
    bad.write_bytes(b"nope" * 100)
    assert cli.main(["quantize", str(bad), str(qdir / "e.gguf")]) == 1
    assert "could not load model" in capsys.readouterr().err
    assert cli.main(["quantize", str(src_f16)]) == 2
    assert not (qdir / "e.gguf").exists()


def test_quantize_releases_the_gil(qdir):
    import threading
    src = write_tiny_gguf(qdir / "gil.gguf", dtype="f16", n_embd=512, n_ff=1024, n_layer=4,
                         n_head=8, n_head_kv=4)
    done = threading.Event()
    ticks = []

    def quantize():
        t0 = time.perf_counter()
        llamagen.quantize(src, qdir / "gil-q4.gguf", "Q4_K_M", n_threads=1)
        ticks.append(time.perf_counter() - t0)
        done.set()

    t = threading.Thread(target=quantize)
    count = 0
    t.start()
    while not done.is_set():
        count += 1
    t.join()
    seconds = ticks[0]
    assert seconds > 0.05, "the model is too small for this test"
    # with the GIL held for the whole call the loop would barely run
    assert count > 20_000 * seconds, (count, seconds)


@pytest.mark.parametrize("n_layer", [0, 513])
def test_layer_count_llama_cpp_would_abort_on(qdir, n_layer):
    # llama.cpp GGML_ASSERTs 0 < n_layer <= 512 while loading hyper-parameters (the process
    # would die): refused before the call, by quantize and by Model alike
    path = qdir / f"layers-{n_layer}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_block_count(n_layer)
    w.add_head_count(4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(llamagen.ModelLoadError, match="block_count"):
        llamagen.quantize(path, qdir / f"layers-{n_layer}-q8.gguf", "Q8_0")
    with pytest.raises(llamagen.ModelLoadError, match="block_count"):
        llamagen.Model(path)
    assert not (qdir / f"layers-{n_layer}-q8.gguf").exists()


def test_gguf_header_reader(qdir, src_f16):
    from llamagen._gguf import GGUFFormatError, check_loadable, read_gguf
    version, meta, tensors = read_gguf(src_f16)
    reader = gguf.GGUFReader(str(src_f16))
    assert version == 3
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 2 and meta["llama.embedding_length"] == 256
    assert meta["tokenizer.ggml.tokens"].count == len(reader.fields["tokenizer.ggml.tokens"].data)
    assert [(t.name, list(t.dims), t.type) for t in tensors] == \
        [(t.name, [int(x) for x in t.shape], int(t.tensor_type)) for t in reader.tensors]
    assert check_loadable(src_f16) is None
    for name, path in _bad_files(qdir, src_f16).items():
        assert check_loadable(path) is None, name       # left to llama.cpp's own errors
        if name != "truncated-data":
            with pytest.raises(GGUFFormatError):
                read_gguf(path)


def test_incomplete_or_invalid_models(qdir, src_f32):
    # a GGUF without the hyper-parameters, and one whose weights hold NaN: load errors, no crash
    bare = qdir / "bare.gguf"
    w = gguf.GGUFWriter(str(bare), "llama")
    w.add_block_count(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(llamagen.ModelLoadError, match="holds no tensors"):
        llamagen.quantize(bare, qdir / "bare-q8.gguf", "Q8_0")
    nan = qdir / "nan.gguf"
    data = bytearray(src_f32.read_bytes())
    data[-4096:] = b"\xff\xff\xff\x7f" * 1024          # float32 NaNs in output.weight's last rows
    nan.write_bytes(bytes(data))
    with pytest.raises(llamagen.ModelLoadError, match="invalid data"):
        llamagen.quantize(nan, qdir / "nan-q8.gguf", "Q8_0")
    assert not leftovers(qdir)
