# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: embedsignature=True, freethreading_compatible=False
# distutils: language = c++
"""The compiled core of llamagen: one extension module that links llama.cpp statically.

Every C call goes through the `llama` / `ggml` namespaces declared in llamagen/includes/.  The
pieces are split over .pxi files included below (uvloop style) so they compile into this single
module and share one copy of ggml's global state.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.pythread cimport (
    NOWAIT_LOCK, WAIT_LOCK, PyThread_acquire_lock, PyThread_allocate_lock, PyThread_free_lock,
    PyThread_release_lock, PyThread_type_lock,
)
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport INT32_MAX, INT32_MIN, int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset, strlen
from libcpp cimport bool as cbool
from libcpp.algorithm cimport binary_search, sort
from libcpp.string cimport string
from libcpp.vector cimport vector

from llamagen.includes cimport chat as lgchat, sampling_engine as fs, ggml, llama
from llamagen.includes cimport embed as lgembd, logprobs as lglp, schema as lgschema
from llamagen.includes cimport ctx as lgctx
from llamagen.includes cimport spec as lgspec
from llamagen.includes cimport adapters as lgadapt

import logging as _logging
import os as _os
import threading as _threading

from llamagen.errors import (
    AdapterLoadError, ContextError, DecodeError, GrammarError, KVCacheFullError, LlamaError,
    ModelLoadError, PromptTooLongError, QuantizeError, StaleStateError, UnknownSequenceError,
    invalid,
)
from llamagen._gbnf import check as _gbnf_check
from llamagen._gguf import check_adapter as _gguf_check_adapter
from llamagen._gguf import check_loadable as _gguf_check_loadable
from llamagen.structured import check_schema as _check_schema
from llamagen._util import check_prompt as _check_prompt, lru_get as _lru_get, lru_put as _lru_put
from llamagen import structured as _structured

cdef extern from "llamagen_build_info.h":
    const char * LLAMAGEN_BUILD_BACKEND
    const char * LLAMAGEN_BUILD_LLAMA_CPP_COMMIT
    const char * LLAMAGEN_BUILD_GGML_NATIVE
    const char * LLAMAGEN_BUILD_GGML_CUDA
    const char * LLAMAGEN_BUILD_GGML_METAL
    const char * LLAMAGEN_BUILD_TYPE
    const char * LLAMAGEN_BUILD_COMPILER
    const char * LLAMAGEN_BUILD_CMAKE_ARGS

include "_log.pxi"
include "_errors.pxi"
include "_model.pxi"
include "_adapters.pxi"
include "_chat.pxi"
include "_context.pxi"
include "_sampling.pxi"
include "_utf8.pxi"
include "_seq.pxi"
include "_speculative.pxi"
include "_ramcache.pxi"
include "_generation.pxi"
include "_resume.pxi"
include "_batch.pxi"
include "_batch_spec.pxi"
include "_prompt_cache.pxi"
include "_logprobs.pxi"
include "_embed.pxi"
include "_quantize.pxi"


# ---------------------------------------------------------------------------------------------
# process-wide setup and information

llama.llama_log_set(_log_callback, NULL)
llama.llama_backend_init()


def _flag(const char * value):
    v = value.decode().strip().upper()
    return v in ("ON", "1", "TRUE", "YES")


def build_info():
    """What this extension was built with: backend, llama.cpp commit and build flags."""
    return {
        "backend": LLAMAGEN_BUILD_BACKEND.decode(),
        "llama_cpp_commit": LLAMAGEN_BUILD_LLAMA_CPP_COMMIT.decode(),
        "llama_cpp_version": llama.llama_version().decode(),
        "ggml_native": _flag(LLAMAGEN_BUILD_GGML_NATIVE),
        "cuda": _flag(LLAMAGEN_BUILD_GGML_CUDA),
        "metal": _flag(LLAMAGEN_BUILD_GGML_METAL),
        "build_type": LLAMAGEN_BUILD_TYPE.decode(),
        "compiler": LLAMAGEN_BUILD_COMPILER.decode(),
        "cmake_args": LLAMAGEN_BUILD_CMAKE_ARGS.decode(),
        "gpu_offload": bool(llama.llama_supports_gpu_offload()),
        # ggml's AMX kernels compiled in (off unless built with LLAMAGEN_AMX=1: see CMakeLists.txt)
        "amx": bool(ggml.ggml_cpu_has_amx_int8()),
    }


def system_info():
    """llama.cpp's system information line (SIMD features, backends)."""
    return llama.llama_print_system_info().decode("utf-8", "replace")


_DEVICE_TYPES = {
    ggml.GGML_BACKEND_DEVICE_TYPE_CPU: "cpu",
    ggml.GGML_BACKEND_DEVICE_TYPE_GPU: "gpu",
    ggml.GGML_BACKEND_DEVICE_TYPE_IGPU: "igpu",
    ggml.GGML_BACKEND_DEVICE_TYPE_ACCEL: "accel",
    ggml.GGML_BACKEND_DEVICE_TYPE_META: "meta",
}


def _backend_devices():
    """(name, description, type, total memory in bytes) for every ggml backend device."""
    cdef size_t i, free_mem, total_mem
    cdef ggml.ggml_backend_dev_t dev
    out = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        free_mem = total_mem = 0
        ggml.ggml_backend_dev_memory(dev, &free_mem, &total_mem)
        out.append((ggml.ggml_backend_dev_name(dev).decode("utf-8", "replace"),
                    ggml.ggml_backend_dev_description(dev).decode("utf-8", "replace"),
                    _DEVICE_TYPES.get(ggml.ggml_backend_dev_type(dev), "unknown"),
                    int(total_mem), int(free_mem)))
    return out


MAX_PARALLEL_SEQUENCES = llama.llama_max_parallel_sequences()
DEFAULT_SEED = llama.LLAMA_DEFAULT_SEED
