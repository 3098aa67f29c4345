#include "lg_adapters.h"

#include "common.h"

namespace lgadapt {

int32_t cvec_load(const char * const * paths, const float * strengths, int n,
                  std::vector<float> & data) noexcept {
    try {
        std::vector<common_control_vector_load_info> infos;
        for (int i = 0; i < n; i++) {
            infos.push_back({strengths[i], paths[i]});
        }
        common_control_vector_data cv = common_control_vector_load(infos);
        data.swap(cv.data);
        return cv.n_embd;
    } catch (...) {     // (allocation: nothing may cross into Cython's noexcept call)
        data.clear();
        return -1;
    }
}

}  // namespace lgadapt
