"""Bad input gets a clear Python exception: never a crash, a hang, an OverflowError from a C
conversion or a silently wrong result."""
import math
import os
import re
import struct
import subprocess
import sys

import pytest

import llamagen
from llamagen import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLT_MAX = struct.unpack("<f", struct.pack("<I", 0x7F7FFFFF))[0]     # 3.4028235e38
FLT_MIN = struct.unpack("<f", struct.pack("<I", 0x00800000))[0]     # 1.1754944e-38


@pytest.fixture(scope="module")
def tiny_ctx(tiny_model):
    with llamagen.Context(tiny_model, n_ctx=256, n_threads=1) as ctx:
        yield ctx


def tokens(ctx, n=6, **kw):
    st = llamagen.gen_begin(ctx, "hello world", max_new_tokens=n, **kw)
    list(st)
    st.end()
    return st.tokens


# -- 1. float parameters must survive the conversion to C float ----------------------------------

# every float field, with values outside float32's normal range that its own range check allows
_FLOAT_FIELDS = {
    "temp": (1e39, -1e39, 1e-38, 1e-45, -1e-40),
    "top_p": (1e-40,),
    "min_p": (1e-40,),
    "typical_p": (1e-40,),
    "repeat_penalty": (1e39, 1e-60, 1e-39),
    "frequency_penalty": (1e39, -1e39, 1e-39),
    "presence_penalty": (1e39, -1e39, 1e-39),
    "mirostat_tau": (1e39, 1e-39),
    "mirostat_eta": (1e39, 1e-39),
    "dynatemp_range": (1e39, 1e-39),
    "dynatemp_exponent": (1e39, -1e39, 1e-39),
    "dry_multiplier": (1e39, 1e-39),
    "dry_base": (1e39,),
    "xtc_probability": (1e-40,),
    "xtc_threshold": (1e-40,),
    "top_n_sigma": (1e39, -1e39, 1e-39),
}


@pytest.mark.parametrize("name,value", [(k, v) for k, vs in _FLOAT_FIELDS.items() for v in vs])
def test_float_outside_float32_is_refused(name, value):
    with pytest.raises(ValueError, match=rf"{name} does not fit a 32-bit float"):
        SamplingParams(**{name: value})


@pytest.mark.parametrize("bias", [1e39, -1e39, 3.5e38, 1e-39, -1e-45, 1e-300])
def test_logit_bias_outside_float32_is_refused(bias):
    with pytest.raises(ValueError, match="logit_bias for token 5 does not fit a 32-bit float"):
        SamplingParams(logit_bias={5: bias})


@pytest.mark.parametrize("name", ["temp", "repeat_penalty", "frequency_penalty", "mirostat_tau",
                                  "dry_multiplier", "top_n_sigma"])
def test_float_field_given_a_huge_int_is_a_value_error(name):
    # float(10**400) raises OverflowError: it must come out as the field's ValueError
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: 10**400})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={5: -(10**400)})


@pytest.mark.parametrize("temp", [FLT_MIN, 1e-35, 9.99e-31])
def test_temperature_so_small_that_the_logits_overflow_is_refused(temp):
    # fits a float32, but logit / temp is inf from a logit of 4 (at FLT_MIN) on: random tokens
    with pytest.raises(ValueError, match="temp must be <= 0 .greedy. or at least 1e-30"):
        SamplingParams(temp=temp)
    with pytest.raises(ValueError, match="temp"):
        SamplingParams(temp=temp, mirostat=1)


def test_float32_boundaries_and_special_values_still_accepted():
    p = SamplingParams(temp=1e-30, repeat_penalty=FLT_MAX, frequency_penalty=-FLT_MAX,
                       top_p=FLT_MIN, min_p=0.0, top_n_sigma=0.0, dynatemp_exponent=-FLT_MIN,
                       logit_bias={3: -math.inf, 4: FLT_MAX, 5: -FLT_MAX, 6: 0.0, 7: 1e-30})
    assert p.temp == 1e-30 and p.repeat_penalty == FLT_MAX
    assert dict(p.logit_bias) == {3: -math.inf, 4: FLT_MAX, 5: -FLT_MAX, 6: 0.0, 7: 1e-30}
    assert SamplingParams(temp=0.0).greedy and SamplingParams(temp=-1.0).greedy
    # 3.4028235e38 is FLT_MAX as printed: it rounds to FLT_MAX, not to inf
    assert SamplingParams(logit_bias={5: 3.4028235e38}).logit_bias == ((5, 3.4028235e38),)
    # +inf and NaN stay refused, as before
    for bad in (math.inf, math.nan):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias={5: bad})


@pytest.mark.parametrize("impl", ["fast", "llama.cpp"])
def test_float32_extremes_that_remain_allowed_behave(tiny_ctx, impl):
    # the largest allowed bias forces its token; the smallest allowed temperature is greedy
    assert set(tokens(tiny_ctx, logit_bias={5: 3e38}, sampler_impl=impl)) == {5}
    greedy = tokens(tiny_ctx, temp=0.0, sampler_impl=impl)
    assert tokens(tiny_ctx, temp=1e-30, sampler_impl=impl) == greedy
    assert tokens(tiny_ctx, temp=1e-30, mirostat=2, sampler_impl=impl) == greedy
    assert 5 not in tokens(tiny_ctx, n=12, logit_bias={5: -math.inf}, temp=1.5, sampler_impl=impl)


# -- 2. integer parameters must fit the C int32 they go to ---------------------------------------

_INT_FIELDS = {
    # field: (values out of range, its special values that must stay accepted)
    "max_new_tokens": ((2**31, 2**64, 10**30), (1, 2**31 - 1)),
    "top_k": ((2**31, -(2**31) - 1, 2**64), (0, -1, -(2**31), 2**31 - 1)),
    # the windows: longer than the context is the context (tests/test_robustness.py)
    "repeat_last_n": ((2**31, 2**63, -2), (-1, 0, 2**24, 2**31 - 1)),
    "min_keep": ((2**31, 2**64), (0, 2**31 - 1)),
    "dry_allowed_length": ((2**31, 2**40), (0, 2**31 - 1)),
    "dry_penalty_last_n": ((2**31, 2**40, -2), (-1, 0, 2**24, 2**31 - 1)),
}


@pytest.mark.parametrize("name,value", [(k, v) for k, (bad, _ok) in _INT_FIELDS.items() for v in bad])
def test_int_outside_int32_is_refused(name, value):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})


def test_int_error_message_for_a_huge_int_is_short():
    # 10**5000 is past Python's int-to-str limit: the message must still name the field
    with pytest.raises(ValueError, match="top_k must be .* got an int of 16610 bits"):
        SamplingParams(top_k=10**5000)


@pytest.mark.parametrize("name,value", [(k, v) for k, (bad, _ok) in _INT_FIELDS.items() for v in bad[:1]])
def test_generation_with_too_large_int_is_a_value_error(tiny_ctx, name, value):
    # before: accepted by SamplingParams, then a bare OverflowError from gen_begin / generate
    kw = {name: value}
    if name.startswith("dry_"):
        kw["dry_multiplier"] = 1.0          # otherwise the DRY values are not used
    with pytest.raises(ValueError, match=name):
        llamagen.gen_begin(tiny_ctx, "hello", **kw)
    with pytest.raises(ValueError, match=name):
        llamagen.generate(tiny_ctx, "hello", **kw)
    batch = llamagen.BatchGenerator(tiny_ctx)
    with pytest.raises(ValueError, match=name):
        batch.add("hello", **kw)


@pytest.mark.parametrize("impl", ["fast", "llama.cpp"])
def test_int32_limits_and_special_values_still_work(tiny_ctx, impl):
    for name, (_bad, ok) in _INT_FIELDS.items():
        for v in ok:
            if name == "max_new_tokens":
                continue
            kw = {name: v, "dry_multiplier": 0.5, "repeat_penalty": 1.1}
            assert len(tokens(tiny_ctx, n=3, sampler_impl=impl, **kw)) == 3, kw
    # no token limit in practice: the context (256) ends the generation
    st = llamagen.gen_begin(tiny_ctx, "hello", max_new_tokens=2**31 - 1, ignore_eos=True,
                            sampler_impl=impl)
    list(st)
    assert st.finish_reason == "length" and 0 < len(st.tokens) < 256
    assert SamplingParams(seed=None).seed is None


@pytest.mark.parametrize("tok", [2**31, 2**40, 2**63, 2**64 + 5])
def test_logit_bias_token_id_beyond_int32_is_a_value_error(tiny_ctx, tok):
    # token ids never give OverflowError: the same ValueError as any id outside the vocabulary
    with pytest.raises(ValueError, match="token"):
        SamplingParams(logit_bias={tok: 1.0})
    with pytest.raises(ValueError, match="token"):
        llamagen.generate(tiny_ctx, "hello", logit_bias={tok: 1.0})
    with pytest.raises(ValueError, match="token"):         # and as a small one
        llamagen.generate(tiny_ctx, "hello", logit_bias={2**31 - 1: 1.0})


@pytest.mark.parametrize("name,what", [("stop", "a str or a list of str"),
                                       ("dry_sequence_breakers", "a str or a list of str"),
                                       ("logit_bias", "a dict {token id: bias}")])
def test_collection_field_given_a_number_is_a_type_error_naming_it(name, what):
    # was: TypeError: 'int' object is not iterable
    with pytest.raises(TypeError, match=re.escape(f"{name} must be {what}, got int")):
        SamplingParams(**{name: 5})


# -- 3. the command line: one error line and exit status 2 for bad input, never a traceback ------

def run_cli(*args, stdin=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "llamagen", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, input=stdin, timeout=120)


@pytest.fixture(scope="module")
def not_utf8_grammar(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli") / "latin1.gbnf"
    p.write_bytes(b'root ::= "\xe9"\n')
    return p


@pytest.mark.parametrize("extra,message", [
    (["--grammar-file", "{dir}"], "cannot read --grammar-file .*: Is a directory"),
    (["--grammar-file", "{dir}/missing.gbnf"], "cannot read --grammar-file .*: No such file"),
    (["--grammar-file", "{latin1}"], "is not UTF-8 text"),
    (["--top-k", "99999999999"], "top_k must be an int in"),
    (["--max-new-tokens", str(2**31)], "max_new_tokens"),
    (["--min-keep", str(2**64)], "min_keep"),
    (["--temp", "1e39"], "temp does not fit a 32-bit float"),
    (["--logit-bias", "99999999999=1"], "logit_bias token"),
    (["--logit-bias", "abc"], "--logit-bias takes TOKEN=BIAS"),
    (["--logit-bias", "5"], "--logit-bias takes TOKEN=BIAS"),
    (["--n-gpu-layers", "99999999999"], "argument --n-gpu-layers: must fit a 32-bit int"),
    (["--n-ctx", "-99999999999"], "argument --n-ctx: must fit a 32-bit int"),
])
def test_cli_bad_input_is_one_error_line_and_status_2(tiny_model_path, not_utf8_grammar, tmp_path,
                                                       extra, message):
    extra = [x.format(dir=tmp_path, latin1=not_utf8_grammar) for x in extra]
    r = run_cli("generate", "-m", str(tiny_model_path), "hi", "--max-new-tokens", "3", *extra)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(("llamagen: error: ", "llamagen generate: error: ")), last
    assert re.search(message, last), last


def test_cli_still_generates(tiny_model_path):
    r = run_cli("generate", "-m", str(tiny_model_path), "hello", "--max-new-tokens", "4",
                "--temp", "0", "--top-k", str(2**31 - 1), "--logit-bias", "5=-inf")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.endswith("\n")


def test_cli_llama_cpp_failure_is_one_error_line_and_status_1(tiny_model_path, monkeypatch,
                                                              capsys):
    # a LlamaError that is not a ValueError (context, decode): status 1, as quantize already had
    from llamagen import cli

    def fail(*a, **k):
        raise llamagen.KVCacheFullError(1, "no room in the KV cache")

    monkeypatch.setattr(llamagen, "gen_begin", fail)
    assert cli.main(["generate", "-m", str(tiny_model_path), "hi", "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llamagen: error: no room in the KV cache") and "Traceback" not in err


# -- 4. GGUF files llama.cpp would abort on are refused before they reach it ---------------------

def _write(make_tiny_model, monkeypatch, keys=None, **kw):
    """A tiny model whose hyper-parameter keys are written with ``keys`` ({"head_count_kv": 3,
    "feed_forward_length": [128, 0], ...}: ints or per-layer lists) instead of the values its
    weights were made with (``kw``, passed to write_tiny_gguf).  A key write_tiny_gguf does not
    write ("key_length") is added."""
    import gguf
    keys = dict(keys or {})
    extra = {k: keys.pop(k) for k in list(keys) if k in ("key_length", "value_length")}
    with monkeypatch.context() as m:
        for key, value in keys.items():
            orig = getattr(gguf.GGUFWriter, "add_" + key)
            m.setattr(gguf.GGUFWriter, "add_" + key,
                      lambda self, *_a, _orig=orig, _v=value: _orig(self, _v))
        if extra:
            orig_rope = gguf.GGUFWriter.add_rope_dimension_count

            def add_rope(self, n):
                orig_rope(self, n)
                for key, value in extra.items():
                    getattr(self, "add_" + key)(value)
            m.setattr(gguf.GGUFWriter, "add_rope_dimension_count", add_rope)
        return make_tiny_model(**kw)


# loads, makes a context, generates, then quantizes: in a child, where an abort is only a status
_CHILD = r"""
import sys, llamagen
path, dst = sys.argv[1], sys.argv[2]
try:
    with llamagen.Model(path) as m, llamagen.Context(m, n_ctx=128, n_threads=1) as c:
        llamagen.generate(c, "hello", max_new_tokens=3)
    print("model: ok")
except Exception as e:
    print(f"model: {type(e).__name__}: {e}")
try:
    llamagen.quantize(path, dst, "Q8_0", n_threads=1)
    print("quantize: ok")
except Exception as e:
    print(f"quantize: {type(e).__name__}: {e}")
"""


def _load_in_child(path, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    dst = tmp_path / "q8.gguf"
    r = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(dst)], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, f"the process died ({r.returncode}): {r.stderr[-2000:]}"
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    return lines["model"], lines["quantize"], dst


# (keys written, write_tiny_gguf arguments, the reason expected).  Before check_loadable knew
# them, all but the last four killed the process (GGML_ASSERT -> abort, or SIGFPE in quantize);
# those four were llama.cpp errors that did not say what is wrong (or a ContextError).
_IMPOSSIBLE = {
    # repro_8 / repro_11: n_ff = 0 (weights of shape [64, 0]): Model() asserted, quantize SIGFPE
    "n_ff=0": (None, dict(n_ff=0), r"'blk\.0\.ffn_gate\.weight' has a dimension of 0 .*"
                                   r"llama\.feed_forward_length is 0"),
    # empty weights with a sane key: quantize still divided by zero
    "empty ffn weights": (dict(feed_forward_length=128), dict(n_ff=0), "has a dimension of 0"),
    # repro_8: 4 heads sharing 3 KV heads: Context() asserted ggml_can_mul_mat(k, q)
    "n_head_kv=3": (None, dict(n_head_kv=3), r"head_count \(4\) is not a multiple of "
                                             r"llama\.attention\.head_count_kv \(3\)"),
    "more KV heads than heads": (None, dict(n_head=2, n_head_kv=4), "is not a multiple of"),
    # the same, per layer
    "per-layer n_head_kv": (dict(head_count=[4, 4], head_count_kv=[2, 3]), {},
                            r"is not a multiple of .* \(3\) in layer 1"),
    # a llama layer without KV heads: Context() asserted
    "per-layer n_head_kv 0": (dict(head_count_kv=[2, 0]), {},
                              r"head_count_kv is 0 in layer 1: every layer of a llama model"),
    # repro_8: n_embd = 1 with one head: rope over 1 dimension asserted at the first decode
    "n_embd=1": (None, dict(n_embd=1, n_head=1, n_head_kv=1),
                 r"rope\.dimension_count is 1 \(rotary embeddings need an even number"),
    # not aborts: "failed to allocate buffer for kv cache", "invalid n_rot: 16, expected 0", ...
    "n_head_kv=0": (None, dict(n_head_kv=0), "has a dimension of 0|head_count_kv is 0"),
    # heads of size 0
    "embedding_length < head_count": (dict(embedding_length=2), {},
                                      r"embedding_length \(2\) / attention\.head_count \(4\) "
                                      r"leaves attention heads of size 0"),
    "key_length 0": (dict(key_length=0), {}, r"llama\.attention\.key_length is 0"),
    "value_length 0": (dict(value_length=0), {}, r"llama\.attention\.value_length is 0"),
}


@pytest.mark.parametrize("case", list(_IMPOSSIBLE))
def test_gguf_with_impossible_hyper_parameters_is_refused_before_llama_cpp(
        make_tiny_model, monkeypatch, tmp_path, case):
    from llamagen._gguf import check_loadable
    keys, kw, message = _IMPOSSIBLE[case]
    path = _write(make_tiny_model, monkeypatch, keys, **kw)
    reason = check_loadable(path)
    assert reason is not None and re.search(message, reason), reason
    model, quant, dst = _load_in_child(path, tmp_path)
    assert model.startswith("ModelLoadError: ") and reason in model, model
    assert quant.startswith("ModelLoadError: ") and reason in quant, quant
    assert not dst.exists() and not list(tmp_path.glob("*.partial"))


_VALID = {
    "default": (None, {}),
    "per-layer arrays": (dict(head_count=[4, 4], head_count_kv=[2, 2],
                              feed_forward_length=[128, 128]), {}),
    "8 heads, 2 KV heads": (None, dict(n_head=8, n_head_kv=2)),
    "multi-head (no GQA)": (None, dict(n_head=4, n_head_kv=4)),
    "heads of size 2": (None, dict(n_embd=2, n_head=1, n_head_kv=1)),
    "head sizes given": (dict(key_length=16, value_length=16), {}),
    "wide": (None, dict(n_embd=256, n_ff=512, n_head=4, n_head_kv=2)),
}


@pytest.mark.parametrize("case", list(_VALID))
def test_valid_tiny_models_still_load_generate_and_quantize(make_tiny_model, monkeypatch,
                                                            tmp_path, case):
    from llamagen._gguf import check_loadable
    keys, kw = _VALID[case]
    path = _write(make_tiny_model, monkeypatch, keys, **kw)
    assert check_loadable(path) is None
    assert _load_in_child(path, tmp_path)[:2] == ("ok", "ok")


def test_real_model_passes_the_checks(real_model_path):
    from llamagen._gguf import check_loadable, read_gguf
    assert check_loadable(real_model_path) is None
    _version, meta, tensors = read_gguf(real_model_path)
    assert meta["gemma3.attention.head_count"] == 4 and meta["gemma3.attention.head_count_kv"] == 1
    assert len(tensors) > 100 and all(0 not in t.dims for t in tensors)


def test_gguf_reader_reads_per_layer_int_arrays(make_tiny_model, monkeypatch):
    from llamagen._gguf import GGUFArray, read_gguf
    path = _write(make_tiny_model, monkeypatch, dict(head_count=[4, 4], head_count_kv=[2, 1]))
    _version, meta, _t = read_gguf(path, tensors=False)
    kv = meta["llama.attention.head_count_kv"]
    assert isinstance(kv, GGUFArray) and kv.count == 2 and kv.values == (2, 1)
    # long and non-integer arrays are still skipped, not read (the token strings' array keeps
    # only where it starts, for the duplicate-token check: (offset, count))
    toks = meta["tokenizer.ggml.tokens"]
    assert isinstance(toks.values, tuple) and len(toks.values) == 2 and toks.values[1] == toks.count
    assert meta["tokenizer.ggml.scores"].values is None


def _hparams_only(path, arch, **keys):
    """A GGUF with only an architecture's hyper-parameter keys (as converters write them)."""
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in keys.items():
        if isinstance(value, list):
            w.add_array(f"{arch}.{key}", value)
        else:
            w.add_uint32(f"{arch}.{key}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch,keys", [
    # Mamba and RWKV files write a feed-forward length and a head count of 0
    ("mamba", dict(block_count=24, embedding_length=768, feed_forward_length=0, head_count=0)),
    ("rwkv6", dict(block_count=24, embedding_length=2048, feed_forward_length=7168,
                   head_count=0)),
    # hybrids mark their recurrent layers with 0 KV heads
    ("jamba", dict(block_count=4, embedding_length=4096, feed_forward_length=14336,
                   head_count=32, head_count_kv=[0, 0, 0, 8])),
    ("lfm2", dict(block_count=4, embedding_length=1024, feed_forward_length=6656, head_count=16,
                  head_count_kv=[0, 0, 8, 0])),
    ("deci", dict(block_count=3, embedding_length=8192, head_count=[64, 0, 64],
                  head_count_kv=[8, 0, 0], feed_forward_length=[28672, 0, 14336])),
    # per-layer KV heads (gemma 4), no KV key at all (gpt2), one KV head for 71 (falcon)
    ("gemma4", dict(block_count=6, embedding_length=2816, head_count=16, key_length=512,
                    value_length=512, head_count_kv=[8, 8, 8, 8, 8, 2], rope_dimension_count=512)),
    ("gpt2", dict(block_count=12, embedding_length=768, feed_forward_length=3072, head_count=12)),
    ("falcon", dict(block_count=32, embedding_length=4544, head_count=71, head_count_kv=1)),
])
def test_hyper_parameters_of_real_architectures_are_not_refused(tmp_path, arch, keys):
    from llamagen._gguf import check_loadable
    full = {"head_count": "attention.head_count", "head_count_kv": "attention.head_count_kv",
            "key_length": "attention.key_length", "value_length": "attention.value_length",
            "rope_dimension_count": "rope.dimension_count"}
    keys = {full.get(k, k): v for k, v in keys.items()}
    assert check_loadable(_hparams_only(tmp_path / f"{arch}.gguf", arch, **keys)) is None
    # and the same checks do refuse the one impossible thing in such a file
    bad = dict(keys, **{"attention.head_count": 6, "attention.head_count_kv": 4})
    reason = check_loadable(_hparams_only(tmp_path / f"{arch}-bad.gguf", arch, **bad))
    assert reason and "is not a multiple of" in reason


# -- 5. prompts of the wrong type: a TypeError naming what a prompt may be -----------------------

_NOT_PROMPTS = [None, 42, 3.5, {1: 2}, {5, 6}, (t for t in [5, 6]), object()]


@pytest.mark.parametrize("bad", _NOT_PROMPTS, ids=lambda x: type(x).__name__)
def test_prompt_of_the_wrong_type_is_a_clear_type_error(tiny_ctx, bad):
    message = r"prompt must be a str, bytes or a sequence of token ids .*got " + type(bad).__name__
    with pytest.raises(TypeError, match=message):
        llamagen.generate(tiny_ctx, bad)
    with pytest.raises(TypeError, match=message):
        llamagen.gen_begin(tiny_ctx, bad)
    with pytest.raises(TypeError, match=r"prompt 1 must be a str, bytes or a sequence"):
        llamagen.generate_batch(tiny_ctx, ["hello", bad], max_new_tokens=2)


def test_map_generate_reports_a_bad_prompt_in_its_result(tiny_ctx):
    items = ["hello", {"temp": 0.0}, None, {"prompt": "world", "temp": 0.0}]
    res = list(llamagen.map_generate(tiny_ctx, items, max_new_tokens=2))
    assert [r.ok for r in res] == [True, False, False, True]
    for r in res[1:3]:
        assert isinstance(r.error, TypeError)
        assert re.match(rf"item {r.index}'s prompt must be a str, bytes or a sequence of token ids",
                        str(r.error)), r.error


def test_accepted_prompt_types_still_work(tiny_model, tiny_ctx):
    import array

    import numpy as np
    ids = tiny_model.tokenize("hello world")
    want = llamagen.generate(tiny_ctx, ids, max_new_tokens=4, temp=0.0)
    for same in (tuple(ids), np.array(ids, dtype=np.int32), array.array("i", ids)):
        assert llamagen.generate(tiny_ctx, same, max_new_tokens=4, temp=0.0) == want
    text = llamagen.generate(tiny_ctx, "hello world", max_new_tokens=4, temp=0.0)
    assert llamagen.generate(tiny_ctx, b"hello world", max_new_tokens=4, temp=0.0) == text
    # a bytearray is text, as in Model.tokenize, not a list of byte-sized token ids
    assert llamagen.generate(tiny_ctx, bytearray(b"hello world"), max_new_tokens=4,
                             temp=0.0) == text
    assert llamagen.generate_batch(tiny_ctx, ["hello world", ids], max_new_tokens=4,
                                   temp=0.0) == [text, want]


def test_generate_batch_refuses_one_string_for_its_list(tiny_ctx):
    # list("hello") would be five one-letter prompts
    with pytest.raises(TypeError, match="prompts must be a list of prompts, got one str"):
        llamagen.generate_batch(tiny_ctx, "hello", max_new_tokens=2)


def test_truth_values_and_mirostat_modes_are_strict():
    # bool("no") is True: a string is not taken as a truth value
    for bad in ("no", "false", "", None, 2, [1]):
        with pytest.raises(TypeError, match="ignore_eos"):
            SamplingParams(ignore_eos=bad)
    for ok, want in ((True, True), (False, False), (1, True), (0, False)):
        assert SamplingParams(ignore_eos=ok).ignore_eos is want
    for bad in (1.0, 2.0, "1", True):
        with pytest.raises(ValueError, match="mirostat"):
            SamplingParams(mirostat=bad)
