// Control vectors through llama.cpp's own loader (common_control_vector_load in common.h).  Kept
// out of the Cython output so common's headers do not slow its compilation.
#pragma once

#include <cstdint>
#include <vector>

namespace lgadapt {

// Load the GGUF control vectors ``paths[i]`` (their "direction.<layer>" tensors), each scaled by
// ``strengths[i]``, and add them up.  ``data`` gets n_embd floats per layer from layer 1 on.
// Returns n_embd, or -1 when a file cannot be read or the vectors do not agree (llama.cpp logs
// why).
int32_t cvec_load(const char * const * paths, const float * strengths, int n,
                  std::vector<float> & data) noexcept;

}  // namespace lgadapt
