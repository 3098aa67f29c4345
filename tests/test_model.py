"""llamagen.Model: properties, tokenizer, errors, lifetime."""
from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
import weakref

import pytest

import llamagen
from llamagen import LlamaError, ModelLoadError
from tiny_gguf import BOS_ID, EOS_ID, FIRST_BYTE_ID, N_VOCAB, SPACE, UNK_ID, tiny_vocab

TEXTS = {
    "ascii": "Hello world, the quick brown fox jumps over the lazy dog.",
    "accented": "Ça va? Où est la bibliothèque, Zoë? Straße, naïve café, ñandú, Ærø.",
    "cjk": "日本語のテキスト、中文字符和한국어 문장。",
    "emoji": "I \u2764\ufe0f llamas \U0001F999\U0001F999 and flags \U0001F1EB\U0001F1F7 \U0001F468\u200d\U0001F469\u200d\U0001F467!",
    "code": 'def f(x):\n\tif x >= 0:\n\t\treturn {"k": [x, x ** 2]}  # comment\n    return None\r\n',
    "spaces": "  leading and trailing  spaces   ",
    "controls": "tab\tnewline\nnul\x00bell\x07 end",
}


# -- properties --------------------------------------------------------------------------------

def test_tiny_model_properties(tiny_model, tiny_model_path):
    m = tiny_model
    assert m.path == os.fspath(tiny_model_path)
    assert m.n_vocab == N_VOCAB == len(tiny_vocab()[0])
    assert m.n_ctx_train == 2048
    assert m.n_embd == 64
    assert m.n_layer == 2
    n_vocab, n_embd, n_ff, n_layer = N_VOCAB, 64, 128, 2
    n_embd_kv = 64 // 4 * 2
    per_layer = (2 * n_embd + n_embd * n_embd * 2 + 2 * n_embd * n_embd_kv + 3 * n_embd * n_ff)
    expected_params = 2 * n_vocab * n_embd + n_embd + n_layer * per_layer
    assert m.n_params == expected_params
    assert m.size == 4 * expected_params  # all f32
    assert isinstance(m.description, str) and m.description.startswith("llama")
    assert "F32" in m.description
    assert m.architecture == "llama"
    assert m.chat_template is None
    assert m.bos == BOS_ID
    assert m.eos == EOS_ID
    assert m.add_bos is True
    assert m.closed is False
    assert "n_vocab=" in repr(m)


def test_tiny_model_metadata(tiny_model):
    meta = tiny_model.metadata
    assert isinstance(meta, dict)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["general.architecture"] == "llama"
    assert meta["general.name"] == "llamagen-tiny"
    assert meta["llama.context_length"] == "2048"
    assert meta["llama.embedding_length"] == "64"
    assert meta["llama.block_count"] == "2"
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.bos_token_id"] == str(BOS_ID)
    # a copy: changing it does not change the model's
    meta["general.architecture"] = "changed"
    assert tiny_model.metadata["general.architecture"] == "llama"


def test_tiny_model_eog(tiny_model):
    m = tiny_model
    assert m.is_eog(EOS_ID) is True
    assert m.is_eog(BOS_ID) is False
    assert m.is_eog(UNK_ID) is False
    assert m.is_eog(FIRST_BYTE_ID + ord("a")) is False
    assert [t for t in range(m.n_vocab) if m.is_eog(t)] == [EOS_ID]
    assert m.is_control(BOS_ID) and m.is_control(EOS_ID)
    assert not m.is_control(FIRST_BYTE_ID)


def test_tiny_model_token_text(tiny_model):
    tokens = tiny_vocab()[0]
    for t in (UNK_ID, BOS_ID, EOS_ID, FIRST_BYTE_ID, FIRST_BYTE_ID + 0xFF, N_VOCAB - 1):
        assert tiny_model.token_text(t) == tokens[t]
    assert tiny_model.token_text(FIRST_BYTE_ID + 0x41) == "<0x41>"
    assert tiny_model.token_text(FIRST_BYTE_ID + 256) == SPACE


def test_tiny_variants_differ_by_seed_and_are_deterministic(make_tiny_model):
    a = make_tiny_model(seed=1).read_bytes()
    b = make_tiny_model(seed=1).read_bytes()
    c = make_tiny_model(seed=2).read_bytes()
    assert a == b
    assert a != c and len(a) == len(c)


def test_tiny_variant_overrides_load(make_tiny_model):
    with llamagen.Model(make_tiny_model(n_ctx_train=4096, n_embd=32, name="other")) as m:
        assert m.n_ctx_train == 4096
        assert m.n_embd == 32
        assert m.metadata["general.name"] == "other"


@pytest.mark.real_model
def test_real_model_properties(real_model, real_model_path):
    m = real_model
    assert m.path == os.fspath(real_model_path)
    assert m.n_vocab == 262144
    assert m.n_ctx_train == 32768
    assert m.n_embd == 640
    assert m.n_layer == 18
    assert 260_000_000 < m.n_params < 280_000_000
    assert 200_000_000 < m.size < os.path.getsize(real_model_path)
    assert m.description.startswith("gemma3")
    assert "270M" in m.description and "Q4_K" in m.description
    assert m.architecture == "gemma3"
    assert m.chat_template is None or isinstance(m.chat_template, str)
    assert m.bos == 2
    assert m.eos == 1
    assert m.add_bos is True
    assert m.token_text(m.bos) == "<bos>"
    assert m.token_text(m.eos) == "<eos>"


@pytest.mark.real_model
def test_real_model_metadata(real_model):
    meta = real_model.metadata
    assert meta["general.architecture"] == "gemma3"
    assert meta["gemma3.context_length"] == "32768"
    assert meta["gemma3.block_count"] == "18"
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.bos_token_id"] == "2"
    assert len(meta) >= 20


@pytest.mark.real_model
def test_real_model_eog(real_model):
    m = real_model
    end_of_turn = m.tokenize("<end_of_turn>", add_special=False, parse_special=True)
    assert len(end_of_turn) == 1
    assert m.is_eog(m.eos) is True
    assert m.is_eog(end_of_turn[0]) is True
    assert m.is_eog(m.bos) is False
    hello = m.tokenize("hello", add_special=False)
    assert not any(m.is_eog(t) for t in hello)


# -- tokenize / detokenize -------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TEXTS))
def test_tiny_round_trip(tiny_model, name):
    text = TEXTS[name]
    tokens = tiny_model.tokenize(text, add_special=False)
    assert tokens and all(isinstance(t, int) and 0 <= t < tiny_model.n_vocab for t in tokens)
    assert BOS_ID not in tokens
    assert tiny_model.detokenize(tokens) == text


@pytest.mark.parametrize("name", ["accented", "cjk", "emoji"])
def test_tiny_non_ascii_uses_byte_fallback(tiny_model, name):
    text = TEXTS[name]
    tokens = tiny_model.tokenize(text, add_special=False)
    byte_tokens = [t for t in tokens if FIRST_BYTE_ID <= t < FIRST_BYTE_ID + 256]
    non_ascii = sum(len(ch.encode()) for ch in text if ord(ch) > 127)
    assert len(byte_tokens) == non_ascii


def test_tiny_uses_merged_pieces(tiny_model):
    tokens = tiny_model.tokenize("hello world the", add_special=False)
    assert [tiny_model.token_text(t) for t in tokens] == [SPACE + "hello", SPACE + "world", SPACE + "the"]


def test_tiny_add_special(tiny_model):
    with_bos = tiny_model.tokenize("hello", add_special=True)
    without = tiny_model.tokenize("hello", add_special=False)
    assert with_bos == [BOS_ID] + without
    assert tiny_model.tokenize("hello") == with_bos  # add_special defaults to True
    assert tiny_model.tokenize("", add_special=True) == [BOS_ID]
    assert tiny_model.tokenize("", add_special=False) == []
    # the BOS renders as nothing unless special tokens are unparsed
    assert tiny_model.detokenize([BOS_ID]) == ""
    assert tiny_model.detokenize([BOS_ID], unparse_special=True) == "<s>"
    assert tiny_model.detokenize([BOS_ID] + without, remove_special=True).strip() == "hello"


def test_tiny_parse_special(tiny_model):
    text = "</s>hi"
    parsed = tiny_model.tokenize(text, add_special=False, parse_special=True)
    assert parsed[0] == EOS_ID
    assert tiny_model.detokenize(parsed[1:]).strip() == "hi"
    plain = tiny_model.tokenize(text, add_special=False, parse_special=False)
    assert EOS_ID not in plain
    assert tiny_model.detokenize(plain) == text


def test_tokenize_accepts_bytes(tiny_model):
    text = TEXTS["accented"]
    expected = tiny_model.tokenize(text, add_special=False)
    assert tiny_model.tokenize(text.encode(), add_special=False) == expected
    assert tiny_model.tokenize(bytearray(text.encode()), add_special=False) == expected
    assert tiny_model.tokenize(memoryview(text.encode()), add_special=False) == expected


def test_detokenize_accepts_any_int_sequence(tiny_model):
    tokens = tiny_model.tokenize("hello world", add_special=False)
    assert tiny_model.detokenize(tuple(tokens)) == "hello world"
    assert tiny_model.detokenize([]) == ""


def test_long_text_round_trip(tiny_model):
    text = (TEXTS["ascii"] + " " + TEXTS["emoji"] + "\n") * 200
    tokens = tiny_model.tokenize(text, add_special=False)
    assert len(tokens) > 5000
    assert tiny_model.detokenize(tokens) == text


def test_detokenize_invalid_utf8_becomes_replacement_char(tiny_model):
    # a lone lead byte of a 2-byte sequence cannot decode
    assert tiny_model.detokenize([FIRST_BYTE_ID + 0xC3]) == "\ufffd"
    assert tiny_model.detokenize([FIRST_BYTE_ID + 0xC3, FIRST_BYTE_ID + 0xA9]) == "é"


@pytest.mark.real_model
@pytest.mark.parametrize("name", sorted(TEXTS))
def test_real_round_trip(real_model, name):
    text = TEXTS[name]
    tokens = real_model.tokenize(text, add_special=False)
    assert tokens and all(0 <= t < real_model.n_vocab for t in tokens)
    assert real_model.detokenize(tokens) == text
    with_bos = real_model.tokenize(text)
    assert with_bos == [real_model.bos] + tokens
    assert real_model.detokenize(with_bos, remove_special=True) == text


@pytest.mark.real_model
def test_real_tokenizer_is_not_byte_fallback(real_model):
    # the real vocabulary has whole words and CJK characters: far fewer tokens than bytes
    for name in ("ascii", "cjk"):
        text = TEXTS[name]
        assert len(real_model.tokenize(text, add_special=False)) < len(text.encode()) / 2


@pytest.mark.real_model
def test_real_parse_special(real_model):
    m = real_model
    text = "<start_of_turn>user\nhi<end_of_turn>"
    parsed = m.tokenize(text, add_special=False, parse_special=True)
    start = m.tokenize("<start_of_turn>", add_special=False, parse_special=True)
    assert len(start) == 1
    assert parsed[0] == start[0]
    assert m.token_text(start[0]) == "<start_of_turn>"
    assert m.is_control(start[0])
    plain = m.tokenize(text, add_special=False, parse_special=False)
    assert start[0] not in plain
    assert len(plain) > len(parsed)
    assert m.detokenize(plain) == text
    # control tokens render only when asked to
    assert m.detokenize(parsed, unparse_special=True) == text
    assert "<start_of_turn>" not in m.detokenize(parsed)


@pytest.mark.real_model
def test_real_bos_text_parsed_only_with_parse_special(real_model):
    m = real_model
    assert m.tokenize("<bos>", add_special=False, parse_special=True) == [m.bos]
    plain = m.tokenize("<bos>", add_special=False, parse_special=False)
    assert m.bos not in plain and len(plain) > 1
    # add_special adds exactly one BOS; the parsed one is a second
    assert m.tokenize("<bos>x", add_special=True, parse_special=True)[:2] == [m.bos, m.bos]


# -- token_to_piece ----------------------------------------------------------------------------

def test_token_to_piece_returns_bytes(tiny_model):
    tokens = tiny_model.tokenize("hello world", add_special=False)
    pieces = [tiny_model.token_to_piece(t) for t in tokens]
    assert all(isinstance(p, bytes) for p in pieces)
    assert pieces == [b" hello", b" world"]


def test_token_to_piece_byte_token_is_partial_utf8(tiny_model):
    text = "é日\U0001F999"
    tokens = tiny_model.tokenize(text, add_special=False)
    pieces = [tiny_model.token_to_piece(t) for t in tokens]
    byte_pieces = [p for t, p in zip(tokens, pieces) if FIRST_BYTE_ID <= t < FIRST_BYTE_ID + 256]
    assert len(byte_pieces) == len(text.encode())
    assert all(len(p) == 1 for p in byte_pieces)
    with pytest.raises(UnicodeDecodeError):
        byte_pieces[0].decode("utf-8")
    assert b"".join(byte_pieces) == text.encode()
    assert tiny_model.token_to_piece(FIRST_BYTE_ID + 0xC3) == b"\xc3"


def test_token_to_piece_special(tiny_model):
    assert tiny_model.token_to_piece(BOS_ID) == b""
    assert tiny_model.token_to_piece(BOS_ID, special=True) == b"<s>"
    assert tiny_model.token_to_piece(EOS_ID, special=True) == b"</s>"


@pytest.mark.real_model
def test_real_token_to_piece(real_model):
    m = real_model
    byte_c3 = next(t for t in range(200, 600) if m.token_text(t) == "<0xC3>")
    piece = m.token_to_piece(byte_c3)
    assert piece == b"\xc3" and len(piece) == 1
    with pytest.raises(UnicodeDecodeError):
        piece.decode("utf-8")
    byte_a9 = byte_c3 - 0xC3 + 0xA9
    assert m.token_text(byte_a9) == "<0xA9>"
    assert m.detokenize([byte_c3, byte_a9]) == "é"
    tokens = m.tokenize(TEXTS["cjk"], add_special=False)
    assert b"".join(m.token_to_piece(t) for t in tokens) == TEXTS["cjk"].encode()
    assert m.token_to_piece(m.bos) == b""
    assert m.token_to_piece(m.bos, special=True) == b"<bos>"


# -- bad inputs --------------------------------------------------------------------------------

def test_missing_path_raises_file_not_found(tmp_path):
    path = tmp_path / "does-not-exist.gguf"
    with pytest.raises(FileNotFoundError) as ei:
        llamagen.Model(path)
    assert str(path) in str(ei.value)


def _assert_load_error(path):
    with pytest.raises(ModelLoadError) as ei:
        llamagen.Model(path)
    err = ei.value
    assert isinstance(err, ValueError)
    assert isinstance(err, LlamaError)
    assert str(path) in str(err)
    assert err.path == path or os.fspath(err.path) == os.fspath(path)
    return err


def test_directory_raises_model_load_error(tmp_path):
    _assert_load_error(tmp_path)


def test_empty_file_raises_model_load_error(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    _assert_load_error(path)


def test_truncated_gguf_raises_model_load_error(tmp_path, tiny_model_path):
    data = tiny_model_path.read_bytes()
    half = tmp_path / "half.gguf"
    half.write_bytes(data[: len(data) // 2])
    _assert_load_error(half)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(data[:64])
    _assert_load_error(header_only)
    one_short = tmp_path / "one-short.gguf"
    one_short.write_bytes(data[:-1])
    _assert_load_error(one_short)


def test_random_bytes_raise_model_load_error(tmp_path):
    import numpy as np

    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(1234).bytes(100_000))
    _assert_load_error(path)
    # GGUF magic followed by garbage
    path2 = tmp_path / "magic.gguf"
    path2.write_bytes(b"GGUF" + np.random.default_rng(5).bytes(10_000))
    _assert_load_error(path2)


def test_unsupported_architecture_raises_model_load_error(unsupported_arch_path):
    err = _assert_load_error(unsupported_arch_path)
    assert "llamagen-no-such-arch" in str(err)


def test_load_error_accepts_str_and_bytes_paths(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    for p in (str(path), os.fsencode(path)):
        with pytest.raises(ModelLoadError):
            llamagen.Model(p)


def test_model_loads_from_str_and_bytes_path(tiny_model_path):
    for p in (str(tiny_model_path), os.fsencode(tiny_model_path)):
        with llamagen.Model(p) as m:
            assert m.n_vocab == N_VOCAB


@pytest.mark.parametrize("bad", [-1, N_VOCAB, N_VOCAB + 1, 2**31 - 1, -(2**31), 2**31, 2**40, -(2**63)])
def test_token_ids_outside_vocab_raise_value_error(tiny_model, bad):
    m = tiny_model
    with pytest.raises(ValueError):
        m.detokenize([bad])
    with pytest.raises(ValueError):
        m.detokenize([BOS_ID, bad, EOS_ID])
    with pytest.raises(ValueError):
        m.token_to_piece(bad)
    with pytest.raises(ValueError):
        m.is_eog(bad)
    with pytest.raises(ValueError):
        m.is_control(bad)
    with pytest.raises(ValueError):
        m.token_text(bad)


@pytest.mark.real_model
def test_real_token_ids_outside_vocab_raise_value_error(real_model):
    n = real_model.n_vocab
    assert real_model.token_to_piece(n - 1) is not None
    for bad in (-1, n):
        with pytest.raises(ValueError):
            real_model.detokenize([bad])
        with pytest.raises(ValueError):
            real_model.token_to_piece(bad)
        with pytest.raises(ValueError):
            real_model.is_eog(bad)


def test_non_int_token_ids_raise_type_error(tiny_model):
    with pytest.raises(TypeError):
        tiny_model.detokenize(["a"])
    with pytest.raises(TypeError):
        tiny_model.detokenize([1.5])
    with pytest.raises(TypeError):
        tiny_model.token_to_piece("1")
    with pytest.raises(TypeError):
        tiny_model.is_eog(None)


@pytest.mark.parametrize("bad", [None, 123, 1.5, ["hello"], object()])
def test_tokenize_non_str_raises_type_error(tiny_model, bad):
    with pytest.raises(TypeError):
        tiny_model.tokenize(bad)


# -- lifetime ----------------------------------------------------------------------------------

def test_close_is_idempotent_and_use_after_close_raises(tiny_model_path):
    m = llamagen.Model(tiny_model_path)
    assert m.tokenize("hi", add_special=False)
    m.close()
    assert m.closed is True
    m.close()
    m.close()
    assert m.closed is True
    assert "closed" in repr(m)
    for op in (lambda: m.tokenize("hi"), lambda: m.detokenize([5]), lambda: m.token_to_piece(5),
               lambda: m.is_eog(2), lambda: m.n_ctx_train, lambda: m.n_embd, lambda: m.metadata,
               lambda: m.description, lambda: m.bos, lambda: m.chat_template):
        with pytest.raises(LlamaError):
            op()
    with pytest.raises(LlamaError):
        m.__enter__()


def test_context_manager_closes(tiny_model_path):
    with llamagen.Model(tiny_model_path) as m:
        assert isinstance(m, llamagen.Model)
        assert not m.closed
        assert m.tokenize("hi", add_special=False)
    assert m.closed
    with pytest.raises(LlamaError):
        m.tokenize("hi")


def test_context_manager_closes_on_exception(tiny_model_path):
    with pytest.raises(RuntimeError):
        with llamagen.Model(tiny_model_path) as m:
            raise RuntimeError("boom")
    assert m.closed


def test_model_is_garbage_collected(tiny_model_path):
    m = llamagen.Model(tiny_model_path)
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None


def test_many_models_load_and_free(tiny_model_path):
    for _ in range(50):
        with llamagen.Model(tiny_model_path) as m:
            assert m.n_vocab == N_VOCAB


# -- the GIL -----------------------------------------------------------------------------------

class _CounterAtRecord(logging.Handler):
    """Notes the counter's value whenever llama.cpp logs (i.e. from inside the C load call)."""

    def __init__(self, counter):
        super().__init__(level=logging.DEBUG)
        self.counter = counter
        self.values = []

    def emit(self, record):
        self.values.append(self.counter[0])


@pytest.mark.real_model
def test_model_load_releases_the_gil(real_model_path):
    """A Python thread keeps running while the main thread is inside llama_model_load_from_file.

    The switch interval is raised far above the load time, so a thread holding the GIL is never
    forced to hand it over: the counter can only advance during a load if the load releases it.
    The counter is sampled before and after each load, and at the first and last log line
    llama.cpp writes from inside the load call (so Python code around the call cannot explain an
    advance).
    """
    counter = [0]
    stop = threading.Event()

    def count():
        while not stop.is_set():
            counter[0] += 1
            time.sleep(0.0002)  # really sleeps, so the loading thread gets the GIL at once

    logger = logging.getLogger("llamagen")
    old_level, old_propagate = logger.level, logger.propagate
    handler = _CounterAtRecord(counter)
    old_interval = sys.getswitchinterval()
    thread = threading.Thread(target=count, daemon=True)
    thread.start()
    try:
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
        logger.propagate = False  # only our handler: other handlers' code could drop the GIL
        sys.setswitchinterval(30.0)
        deltas, inside = [], []
        for _ in range(3):
            handler.values.clear()
            before = counter[0]
            m = llamagen.Model(real_model_path)
            after = counter[0]
            m.close()
            deltas.append(after - before)
            assert len(handler.values) > 10, "llama.cpp logged nothing at DEBUG during the load"
            inside.append(handler.values[-1] - handler.values[0])
    finally:
        sys.setswitchinterval(old_interval)
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
        stop.set()
        thread.join()
    assert all(d > 0 for d in deltas), deltas
    assert all(d > 0 for d in inside), f"counter frozen inside the C load call: {inside}"
