// What every part of the engine shares: a candidate (tdata, llama.cpp's llama_token_data), its
// candidate array (Arr) and the per-thread scratch.  Invariant: scratch grows to O(n_vocab) once
// per thread and is reused, so a sampling step allocates nothing once it has run a few times.
#pragma once

#include "llama.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace lgfs {

typedef llama_token_data tdata;

#if defined(__GLIBCXX__)
static inline bool fast_sampler_supported() { return true; }
#else
static inline bool fast_sampler_supported() { return false; }
#endif

// thread-local scratch (grows to O(n_vocab) once per thread, never per token)
struct Scratch {
    std::vector<float> work;          // the FULL state's edited logits
    std::vector<int32_t> gidx;        // gathered ids
    std::vector<tdata> pre;           // sorted prefixes
    std::vector<tdata> abuf;          // small ARRAY states
    std::vector<float> f1, f2, f3;
    std::vector<double> d1;
    std::vector<size_t> s1;
    std::vector<int> ibuf;            // port: bucket index
    std::vector<tdata> res;           // port: partial-sort result
    std::vector<tdata> tnew;          // port: typical output
    std::vector<unsigned char> seen;
    std::vector<tdata> probe;
    std::vector<double> chunk_end;
    std::vector<float> masked;        // grammar-masked logits
    std::vector<tdata> gacc;          // grammar: accepted candidates
    std::vector<int32_t> gnext;       // grammar: the next level of the prefix tree
    std::vector<int32_t> wsel;        // typical: the candidates inside the score window
    std::vector<float> tm;            // typical: entropy terms
    std::vector<uint32_t> bcount;     // typical: bucket counts of the entropy tail
    std::vector<int32_t> border;      // typical: tail indices grouped by bucket
    std::vector<float> bval;          // typical: one bucket's terms
    std::vector<tdata> ma;            // mirostat: the head of the distribution
    std::vector<float> mv;            // mirostat: values to sum
};

static inline Scratch & scratch() {
    static thread_local Scratch s;
    return s;
}

// the logits' writable copy that logit edits work on (S.work), made on the first edit of a step
static inline float * work_copy(Scratch & S, const float * logits, size_t n) {
    if (S.work.size() < n) {
        S.work.resize(n);
    }
    float * Wm = S.work.data();
    std::memcpy(Wm, logits, n * sizeof(float));
    return Wm;
}

struct Arr {                          // mirrors llama_token_data_array
    tdata * data;
    size_t size;
    int64_t selected;
    bool sorted;
};

static inline bool cmp_logit_desc(const tdata & a, const tdata & b) { return a.logit > b.logit; }

} // namespace lgfs
