# Raw declarations from ggml's public headers that llamagen uses.  No logic here.
from libc.stdint cimport int64_t
from libcpp cimport bool as cbool


cdef extern from "ggml.h" nogil:
    cdef enum ggml_log_level:
        GGML_LOG_LEVEL_NONE
        GGML_LOG_LEVEL_DEBUG
        GGML_LOG_LEVEL_INFO
        GGML_LOG_LEVEL_WARN
        GGML_LOG_LEVEL_ERROR
        GGML_LOG_LEVEL_CONT

    cdef enum ggml_type:
        GGML_TYPE_F32
        GGML_TYPE_F16
        GGML_TYPE_Q4_0
        GGML_TYPE_Q4_1
        GGML_TYPE_Q5_0
        GGML_TYPE_Q5_1
        GGML_TYPE_Q8_0
        GGML_TYPE_IQ4_NL
        GGML_TYPE_BF16

    const char * ggml_type_name(ggml_type type)
    cbool ggml_is_quantized(ggml_type type)

    ctypedef struct ggml_tensor:
        pass

    ctypedef cbool (*ggml_abort_callback)(void * data) noexcept nogil
    ctypedef void (*ggml_log_callback)(ggml_log_level level, const char * text,
                                       void * user_data) noexcept nogil


cdef extern from "ggml-backend.h" nogil:
    ctypedef cbool (*ggml_backend_sched_eval_callback)(ggml_tensor * t, cbool ask,
                                                       void * user_data) noexcept nogil

    ctypedef struct ggml_backend_device:
        pass
    ctypedef ggml_backend_device * ggml_backend_dev_t

    cdef enum ggml_backend_dev_kind "ggml_backend_dev_type":
        GGML_BACKEND_DEVICE_TYPE_CPU
        GGML_BACKEND_DEVICE_TYPE_GPU
        GGML_BACKEND_DEVICE_TYPE_IGPU
        GGML_BACKEND_DEVICE_TYPE_ACCEL
        GGML_BACKEND_DEVICE_TYPE_META

    const char * ggml_backend_dev_name(ggml_backend_dev_t device)
    const char * ggml_backend_dev_description(ggml_backend_dev_t device)
    void ggml_backend_dev_memory(ggml_backend_dev_t device, size_t * free, size_t * total)
    ggml_backend_dev_kind ggml_backend_dev_type(ggml_backend_dev_t device)
    size_t ggml_backend_dev_count()
    ggml_backend_dev_t ggml_backend_dev_get(size_t index)
    void ggml_backend_load_all()


cdef extern from "ggml-cpu.h" nogil:
    int ggml_cpu_has_amx_int8()
