// SIMD mappings: the one place that knows which vector instruction sets the engine's kernels are
// compiled for (LGFS_X86 and the LGFS_AVX512 target attribute) and checks the CPU at run time.
// Invariant: every vector kernel has a scalar path beside it that leads to the same token.
//
// Columns: x86-64 with GCC -> AVX-512 (F, BW, DQ, VL) + FMA, taken per call when the CPU has it;
// every other target -> the scalar paths.  A NEON column would add its macro and CPU check here
// (docs/sampling-engine.md lists the kernels that would each need one more branch).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define LGFS_X86 1
#define LGFS_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
#endif

namespace lgfs {

#ifdef LGFS_X86
static inline bool cpu_has_avx512() {
    static const int ok = (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                           __builtin_cpu_supports("fma")) ? 1 : 0;
    return ok != 0;
}
#endif

} // namespace lgfs
