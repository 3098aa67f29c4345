// Device memory bandwidth (a large device-to-device copy) and the cost of copying one token's
// logits to the host, for bench/gpu/gpu_bench.py when PyTorch is not available.
//
//   nvcc -O2 -arch=sm_90 bench/gpu/membw.cu -o membw && ./membw [bytes] [n_vocab]
//
// Prints one JSON object.  Bandwidth counts bytes read plus bytes written (2 x size per copy).
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>

#define CHECK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
    std::printf("{\"error\": \"%s: %s\"}\n", #x, cudaGetErrorString(e_)); return 1; } } while (0)

int main(int argc, char ** argv) {
    size_t bytes = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : (size_t(4) << 30);
    size_t n_vocab = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 128256;
    const int iters = 20, small_iters = 200;

    void * a = nullptr;
    void * b = nullptr;
    CHECK(cudaMalloc(&a, bytes));
    CHECK(cudaMalloc(&b, bytes));
    CHECK(cudaMemset(a, 1, bytes));
    CHECK(cudaMemset(b, 0, bytes));
    cudaEvent_t e0, e1;
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
    for (int i = 0; i < 3; i++) CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice));
    CHECK(cudaEventRecord(e0));
    for (int i = 0; i < iters; i++) CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice));
    CHECK(cudaEventRecord(e1));
    CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    double d2d = 2.0 * double(bytes) * iters / (ms / 1e3);

    // one token's logits (float32) to the host, synchronously, as a decode step ends
    size_t lbytes = n_vocab * sizeof(float);
    void * pinned = nullptr;
    CHECK(cudaMallocHost(&pinned, lbytes));
    void * pageable = std::malloc(lbytes);
    float t_pinned = 0, t_pageable = 0;
    for (int pass = 0; pass < 2; pass++) {
        void * host = pass == 0 ? pinned : pageable;
        for (int i = 0; i < 10; i++) CHECK(cudaMemcpy(host, a, lbytes, cudaMemcpyDeviceToHost));
        CHECK(cudaEventRecord(e0));
        for (int i = 0; i < small_iters; i++) {
            CHECK(cudaMemcpyAsync(host, a, lbytes, cudaMemcpyDeviceToHost));
            CHECK(cudaStreamSynchronize(0));
        }
        CHECK(cudaEventRecord(e1));
        CHECK(cudaEventSynchronize(e1));
        CHECK(cudaEventElapsedTime(pass == 0 ? &t_pinned : &t_pageable, e0, e1));
    }
    std::printf("{\"method\": \"cuda\", \"bytes\": %zu, \"iters\": %d, \"ms\": %.4f, "
                "\"d2d_bytes_per_s\": %.6e, \"logits_bytes\": %zu, "
                "\"d2h_logits_us_pinned\": %.3f, \"d2h_logits_us_pageable\": %.3f}\n",
                bytes, iters, ms, d2d, lbytes, t_pinned * 1e3 / small_iters,
                t_pageable * 1e3 / small_iters);
    std::free(pageable);
    cudaFreeHost(pinned);
    cudaFree(a);
    cudaFree(b);
    return 0;
}
