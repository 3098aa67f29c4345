# Raw declarations of the control-vector loader wrapper (llamagen/csrc/lg_adapters.h, over
# llama.cpp's common.h).  No logic here: cimport as a namespace
# (`from llamagen.includes cimport adapters as lgadapt`).
from libc.stdint cimport int32_t
from libcpp.vector cimport vector


cdef extern from "lg_adapters.h" namespace "lgadapt" nogil:
    int32_t cvec_load(const char * const * paths, const float * strengths, int n,
                      vector[float] & data) noexcept
