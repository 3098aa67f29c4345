"""llamagen.Context: parameters, lifetime, and where llama.cpp's log goes."""
from __future__ import annotations

import gc
import logging
import os
import weakref

import pytest

import llamagen
from llamagen import LlamaError
from llamagen._util import physical_cores


def _mappings_of(path) -> int:
    """How many memory mappings of ``path`` this process has (llama.cpp mmaps model files)."""
    target = os.path.realpath(path)
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if line.rstrip("\n").endswith(" " + target))


needs_proc_maps = pytest.mark.skipif(not os.path.exists("/proc/self/maps"),
                                     reason="needs /proc/self/maps (Linux)")


# -- parameters --------------------------------------------------------------------------------

def test_defaults(tiny_model):
    with llamagen.Context(tiny_model) as ctx:
        assert ctx.n_ctx == 2048
        assert ctx.n_ctx_seq == 2048
        assert ctx.n_batch == 512
        assert ctx.n_ubatch == 512
        assert ctx.n_seq_max == 1
        assert ctx.n_threads == physical_cores()
        assert ctx.n_threads_batch == physical_cores()
        assert ctx.model is tiny_model
        assert ctx.closed is False
        assert "n_ctx=2048" in repr(ctx)


def test_physical_cores_is_sane():
    n = physical_cores()
    assert isinstance(n, int)
    assert 1 <= n <= (os.cpu_count() or 1)


def test_explicit_values(tiny_model):
    with llamagen.Context(tiny_model, n_ctx=512, n_batch=256, n_ubatch=128, n_seq_max=1,
                          n_threads=1, n_threads_batch=2) as ctx:
        assert ctx.n_ctx == 512
        assert ctx.n_batch == 256
        assert ctx.n_ubatch == 128
        assert ctx.n_seq_max == 1
        assert ctx.n_threads == 1
        assert ctx.n_threads_batch == 2


def test_multi_sequence_values_are_read_back(tiny_model):
    with llamagen.Context(tiny_model, n_ctx=1024, n_seq_max=4) as ctx:
        assert ctx.n_seq_max == 4
        assert ctx.n_ctx == 1024
        assert ctx.n_ctx_seq == 256  # each sequence gets its share without kv_unified
    with llamagen.Context(tiny_model, n_ctx=1024, n_seq_max=4, kv_unified=True) as ctx:
        assert ctx.n_ctx_seq == 1024


def test_values_padded_by_llama_cpp_are_read_back(tiny_model):
    with llamagen.Context(tiny_model, n_ctx=100, n_batch=64, n_ubatch=128) as ctx:
        assert ctx.n_ctx >= 100 and ctx.n_ctx % 256 == 0  # llama.cpp pads the context
        assert ctx.n_batch == 64
        assert ctx.n_ubatch == 64  # never more than n_batch


def test_n_ctx_zero_takes_training_context(make_tiny_model):
    with llamagen.Model(make_tiny_model(n_ctx_train=4096)) as model:
        assert model.n_ctx_train == 4096
        with llamagen.Context(model, n_ctx=0) as ctx:
            assert ctx.n_ctx == 4096
        with llamagen.Context(model) as ctx:
            assert ctx.n_ctx == 2048


def test_flash_attn_choices(tiny_model):
    for choice in (None, True, False):
        with llamagen.Context(tiny_model, flash_attn=choice, n_ctx=256) as ctx:
            assert ctx.n_ctx == 256


def test_set_n_threads(tiny_model):
    with llamagen.Context(tiny_model, n_ctx=256) as ctx:
        ctx.set_n_threads(1, 3)
        assert (ctx.n_threads, ctx.n_threads_batch) == (1, 3)
        ctx.set_n_threads(2)
        assert (ctx.n_threads, ctx.n_threads_batch) == (2, 2)
        with pytest.raises(ValueError, match="n_threads"):
            ctx.set_n_threads(0)
        with pytest.raises(ValueError, match="n_threads_batch"):
            ctx.set_n_threads(1, 0)


@pytest.mark.parametrize("kwargs, name", [
    ({"n_ctx": -1}, "n_ctx"),
    ({"n_ctx": -4096}, "n_ctx"),
    ({"n_seq_max": 0}, "n_seq_max"),
    ({"n_seq_max": 257}, "n_seq_max"),
    ({"n_seq_max": -1}, "n_seq_max"),
    ({"n_batch": 0}, "n_batch"),
    ({"n_batch": -512}, "n_batch"),
    ({"n_ubatch": 0}, "n_ubatch"),
    ({"n_threads": 0}, "n_threads"),
    ({"n_threads": -2}, "n_threads"),
    ({"n_threads_batch": 0}, "n_threads_batch"),
    ({"flash_attn": "x"}, "flash_attn"),
    ({"flash_attn": 1}, "flash_attn"),
])
def test_bad_params_raise_value_error_naming_the_parameter(tiny_model, kwargs, name):
    with pytest.raises(ValueError) as ei:
        llamagen.Context(tiny_model, **kwargs)
    assert name in str(ei.value)
    assert not isinstance(ei.value, TypeError)


def test_n_seq_max_256_is_allowed(tiny_model):
    with llamagen.Context(tiny_model, n_ctx=256 * 16, n_seq_max=256) as ctx:
        assert ctx.n_seq_max == 256


def test_n_ctx_smaller_than_n_seq_max(tiny_model):
    with pytest.raises(ValueError, match="n_seq_max"):
        llamagen.Context(tiny_model, n_ctx=2, n_seq_max=4)


@pytest.mark.parametrize("kwargs, name", [
    ({"n_ctx": 512.0}, "n_ctx"),
    ({"n_ctx": "512"}, "n_ctx"),
    ({"n_batch": 1.5}, "n_batch"),
    ({"n_ubatch": None}, "n_ubatch"),
    ({"n_seq_max": True}, "n_seq_max"),
    ({"n_threads": "4"}, "n_threads"),
    ({"n_threads_batch": 2.0}, "n_threads_batch"),
])
def test_non_int_params_raise_type_error(tiny_model, kwargs, name):
    with pytest.raises(TypeError) as ei:
        llamagen.Context(tiny_model, **kwargs)
    assert name in str(ei.value)


def test_model_must_be_a_model(tiny_model):
    with pytest.raises(TypeError):
        llamagen.Context(None)
    with pytest.raises(TypeError):
        llamagen.Context("model.gguf")


def test_context_on_closed_model_raises(tiny_model_path):
    model = llamagen.Model(tiny_model_path)
    model.close()
    with pytest.raises(LlamaError):
        llamagen.Context(model)


# -- lifetime ----------------------------------------------------------------------------------

@needs_proc_maps
def test_context_keeps_its_model_alive(make_tiny_model):
    path = make_tiny_model(seed=11)
    model = llamagen.Model(path)
    assert _mappings_of(path) >= 1
    ctx = llamagen.Context(model, n_ctx=256)
    model.close()
    # the model is closed for the user ...
    assert model.closed
    with pytest.raises(LlamaError):
        model.tokenize("hi")
    with pytest.raises(LlamaError):
        model.n_embd
    # ... but its memory stays while the context uses it
    assert _mappings_of(path) >= 1
    assert ctx.model is model
    assert ctx.n_ctx == 256
    ctx.clear()
    assert ctx.n_batch == 256  # clamped to n_ctx
    ctx.close()
    # the last user is gone: now the model is freed
    assert _mappings_of(path) == 0
    with pytest.raises(LlamaError):
        model.tokenize("hi")


@needs_proc_maps
def test_model_freed_only_after_all_contexts_close(make_tiny_model):
    path = make_tiny_model(seed=12)
    model = llamagen.Model(path)
    a = llamagen.Context(model, n_ctx=256)
    b = llamagen.Context(model, n_ctx=256)
    model.close()
    a.close()
    assert _mappings_of(path) >= 1
    assert b.n_ctx == 256
    b.close()
    assert _mappings_of(path) == 0


@needs_proc_maps
def test_model_close_after_contexts_close_frees(make_tiny_model):
    path = make_tiny_model(seed=13)
    model = llamagen.Model(path)
    with llamagen.Context(model, n_ctx=256):
        pass
    assert _mappings_of(path) >= 1  # the model itself is still open
    model.close()
    assert _mappings_of(path) == 0


def test_context_holds_a_reference_to_its_model(tiny_model_path):
    model = llamagen.Model(tiny_model_path)
    ref = weakref.ref(model)
    ctx = llamagen.Context(model, n_ctx=256)
    del model
    gc.collect()
    assert ref() is not None
    assert ctx.model.n_vocab > 0
    assert ctx.n_ctx == 256
    ctx.close()
    del ctx
    gc.collect()
    assert ref() is None


@needs_proc_maps
def test_dropped_context_releases_its_model(make_tiny_model):
    path = make_tiny_model(seed=14)
    model = llamagen.Model(path)
    ctx = llamagen.Context(model, n_ctx=256)
    model.close()
    del ctx  # never closed explicitly
    gc.collect()
    assert _mappings_of(path) == 0


@needs_proc_maps
def test_context_in_a_reference_cycle_releases_its_model(make_tiny_model):
    """The cycle collector must not drop the context's model before the context is freed."""

    class MyContext(llamagen.Context):
        pass

    path = make_tiny_model(seed=15)
    model = llamagen.Model(path)
    ctx = MyContext(model, n_ctx=256)
    ctx.self_ref = ctx
    ref = weakref.ref(ctx)
    del ctx
    gc.collect()
    assert ref() is None
    model.close()
    assert _mappings_of(path) == 0

    # the same with the model reachable only through the cycle
    model = llamagen.Model(path)
    ctx = MyContext(model, n_ctx=256)
    ctx.self_ref = ctx
    model_ref = weakref.ref(model)
    del ctx, model
    gc.collect()
    assert model_ref() is None
    assert _mappings_of(path) == 0


def test_close_is_idempotent_and_use_after_close_raises(tiny_model):
    ctx = llamagen.Context(tiny_model, n_ctx=256)
    ctx.close()
    assert ctx.closed
    ctx.close()
    ctx.close()
    assert ctx.closed
    assert "closed" in repr(ctx)
    for op in (lambda: ctx.n_ctx, lambda: ctx.n_batch, lambda: ctx.n_ubatch, lambda: ctx.n_seq_max,
               lambda: ctx.n_threads, lambda: ctx.n_ctx_seq, ctx.clear,
               lambda: ctx.set_n_threads(1)):
        with pytest.raises(LlamaError):
            op()
    with pytest.raises(LlamaError):
        ctx.__enter__()
    # the model is unaffected
    assert tiny_model.tokenize("hi", add_special=False)


def test_context_manager(tiny_model):
    with llamagen.Context(tiny_model, n_ctx=256) as ctx:
        assert isinstance(ctx, llamagen.Context)
        assert not ctx.closed
    assert ctx.closed
    with pytest.raises(LlamaError):
        ctx.n_ctx
    with pytest.raises(KeyError):
        with llamagen.Context(tiny_model, n_ctx=256) as ctx2:
            raise KeyError("boom")
    assert ctx2.closed


@pytest.mark.real_model
def test_real_model_context(real_model):
    with llamagen.Context(real_model, n_ctx=1024) as ctx:
        assert ctx.n_ctx == 1024
        assert ctx.n_threads == physical_cores()
        assert ctx.model is real_model
        ctx.clear()
    assert not real_model.closed


# -- logging -----------------------------------------------------------------------------------

def test_llama_cpp_log_goes_to_the_llamagen_logger(tiny_model_path, caplog):
    caplog.set_level(logging.DEBUG, logger="llamagen")
    with llamagen.Model(tiny_model_path) as model:
        with llamagen.Context(model, n_ctx=256):
            pass
    records = [r for r in caplog.records if r.name == "llamagen"]
    assert records, "no llama.cpp log records reached logging.getLogger('llamagen')"
    messages = [r.getMessage() for r in records]
    assert any("llama_model_loader" in m for m in messages)
    assert any("llama_context" in m for m in messages)
    assert {r.levelno for r in records} & {logging.DEBUG, logging.INFO}
    # whole lines: pieces of a line are joined, no trailing newlines
    assert all(not m.endswith("\n") for m in messages)
    assert all(m for m in messages)


def test_info_level_drops_debug_lines(tiny_model_path, caplog):
    caplog.set_level(logging.INFO, logger="llamagen")
    with llamagen.Model(tiny_model_path):
        pass
    records = [r for r in caplog.records if r.name == "llamagen"]
    assert records
    assert all(r.levelno >= logging.INFO for r in records)


@pytest.mark.real_model
def test_nothing_on_stderr_at_default_level(tiny_model_path, real_model_path, capfd):
    logger = logging.getLogger("llamagen")
    assert logger.level == logging.NOTSET  # default: inherits WARNING from the root
    capfd.readouterr()
    with llamagen.Model(tiny_model_path) as model:
        with llamagen.Context(model, n_ctx=256) as ctx:
            ctx.clear()
    with llamagen.Model(real_model_path) as model:
        model.tokenize("hello", add_special=False)
    out, err = capfd.readouterr()
    assert err == ""
    assert out == ""


@pytest.mark.real_model
def test_progress_dots_are_not_logged_as_warnings(real_model_path, tiny_model_path, caplog):
    """llama.cpp's loading progress dots continue the line before them; a warning logged earlier
    must not turn them into a WARNING line."""
    caplog.set_level(logging.WARNING, logger="llamagen")
    for path in (real_model_path, tiny_model_path):
        with llamagen.Model(path):
            pass
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "llamagen" and r.levelno >= logging.WARNING]
    assert any("control-looking token" in m for m in warnings)  # gemma3's one real warning
    assert not [m for m in warnings if m.strip(". \n") == ""], warnings


def test_load_error_reason_comes_from_the_log(unsupported_arch_path, capfd):
    capfd.readouterr()
    with pytest.raises(llamagen.ModelLoadError) as ei:
        llamagen.Model(unsupported_arch_path)
    assert "unknown model architecture" in str(ei.value)
    assert ei.value.reason
    out, err = capfd.readouterr()
    assert err == "" and out == ""
