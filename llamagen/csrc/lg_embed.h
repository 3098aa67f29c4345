// Pooled embeddings without the language-model head.  In embedding mode llama.cpp still runs the
// lm_head on every token (a 262k x 640 product per token on gemma3: most of the forward pass) and
// only then pools the final hidden states.  A scheduler eval callback (ggml-backend.h: returning
// false from an observed node cancels the rest of the graph) copies those hidden states out
// ("result_norm", the tensor llama.cpp pools) and stops there; the pooling is done here.
// Invariant: used only after the first decode of a context showed this pooling equal to
// llama.cpp's (cosine >= 1 - 1e-6 and norms within 1e-4, every sequence; _embed.pxi), so models
// that do more after pooling (dense projections, classification heads) keep llama.cpp's path.
#pragma once

#include "ggml.h"
#include "ggml-backend.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace lgembd {

// pooling kinds this file computes (llama.cpp's MEAN, CLS and LAST; NONE needs no pooling)
enum { POOL_MEAN = 0, POOL_FIRST = 1, POOL_LAST = 2 };

struct Tap {
    int armed;           // observe the next decode
    int stop;            // after the copy, cancel the rest of the graph
    int got;             // the hidden states were copied
    int unpooled;        // pooling NONE: llama.cpp renames result_norm to result_embd_pooled
    int64_t n_embd;      // expected shape: n_embd x n_rows, float32
    int64_t n_rows;
    float * dst;
};

// ggml_backend_sched_eval_callback: ask == true is "do you want this node?", ask == false hands it
// over (and false cancels what is left of the graph).
static bool tap_cb(ggml_tensor * t, bool ask, void * user_data) {
    Tap * tap = (Tap *) user_data;
    if (!tap->armed || tap->got) {
        return !ask;
    }
    if (ask) {
        const char * name = ggml_get_name(t);
        return std::strcmp(name, "result_norm") == 0 ||
               (tap->unpooled && std::strcmp(name, "result_embd_pooled") == 0);
    }
    if (t->type == GGML_TYPE_F32 && t->ne[0] == tap->n_embd && t->ne[1] == tap->n_rows &&
            t->ne[2] == 1 && t->ne[3] == 1 && ggml_is_contiguous(t) && t->buffer != nullptr) {
        ggml_backend_tensor_get(t, tap->dst, 0, ggml_nbytes(t));
        tap->got = 1;
        return !tap->stop;
    }
    return true;    // not the shape expected: let llama.cpp finish and use its output
}

// One sequence's vector from its rows [first, first + n) of the hidden states.
static void pool(const float * rows, int64_t n_embd, int64_t first, int64_t n, int how, float * out) {
    if (how == POOL_FIRST || how == POOL_LAST) {
        const float * r = rows + (how == POOL_FIRST ? first : first + n - 1) * n_embd;
        std::memcpy(out, r, (size_t) n_embd * sizeof(float));
        return;
    }
    thread_local std::vector<double> acc;
    acc.assign((size_t) n_embd, 0.0);
    for (int64_t i = first; i < first + n; ++i) {
        const float * r = rows + i * n_embd;
        for (int64_t j = 0; j < n_embd; ++j) {
            acc[j] += r[j];
        }
    }
    for (int64_t j = 0; j < n_embd; ++j) {
        out[j] = (float) (acc[j] / (double) n);
    }
}

// Whether two vectors are the same up to float rounding of a different summation order.
static bool same_vector(const float * a, const float * b, int64_t n) {
    double ab = 0.0, aa = 0.0, bb = 0.0;
    for (int64_t j = 0; j < n; ++j) {
        ab += (double) a[j] * b[j];
        aa += (double) a[j] * a[j];
        bb += (double) b[j] * b[j];
    }
    if (!(aa > 0.0) || !(bb > 0.0)) {
        return aa == bb;
    }
    const double na = std::sqrt(aa), nb = std::sqrt(bb);
    return ab / (na * nb) >= 1.0 - 1e-6 && std::fabs(na - nb) <= 1e-4 * std::fmax(na, nb);
}

}  // namespace lgembd
