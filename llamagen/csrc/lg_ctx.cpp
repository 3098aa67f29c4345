#include "lg_ctx.h"

#include "llama.h"
#include "llama-context.h"       // internal (pinned commit): get_memory()
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <vector>

namespace lgctx {

// the memory's KV caches (an iSWA model has two), or none when it is not made of one-stream
// (unified) KV caches: per-sequence streams only ever hold their own sequence's cells
static std::vector<const llama_kv_cache *> unified_caches(llama_context * ctx) {
    std::vector<const llama_kv_cache *> out;
    llama_memory_i * mem = ctx->get_memory();
    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        out = {kv};
    } else if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        out = {iswa->get_base(), iswa->get_swa()};
    }
    for (const llama_kv_cache * kv : out) {
        if (kv == nullptr || kv->get_n_stream() != 1) {
            return {};
        }
    }
    return out;
}

// whether a free cell lies below the highest cell holding ``seq`` (-1: below the highest used
// cell): llama.cpp may then put the sequence's next token there, before its older cells
static bool free_below(const llama_kv_cells & cells, int32_t seq) {
    int64_t top = seq < 0 ? (int64_t) cells.used_max_p1() : -1;
    for (uint32_t i = 0; seq >= 0 && i < cells.used_max_p1(); ++i) {
        if (!cells.is_empty(i) && cells.seq_has(i, seq)) {
            top = i;
        }
    }
    for (int64_t i = 0; i < top; ++i) {
        if (cells.is_empty((uint32_t) i)) {
            return true;
        }
    }
    return false;
}

int compact(llama_context * ctx, const int32_t * seqs, int n_seqs, int32_t follow) noexcept {
    bool needed = false;
    for (const llama_kv_cache * kv : unified_caches(ctx)) {
        needed = needed || free_below(kv->get_cells(0), follow);
    }
    if (!needed) {      // every free cell is above: new tokens land after the old ones anyway
        return 1;
    }
    try {
        // the state of one sequence is its cells' positions and their K/V rows, copied as they are:
        // restored, the same values sit in consecutive cells
        std::vector<std::vector<uint8_t>> saved((size_t) n_seqs);
        for (int i = 0; i < n_seqs; ++i) {
            const size_t n = llama_state_seq_get_size(ctx, seqs[i]);
            saved[i].resize(n);
            if (n > 0 && llama_state_seq_get_data(ctx, saved[i].data(), n, seqs[i]) != n) {
                return -1;     // (nothing changed yet)
            }
        }
        llama_memory_clear(llama_get_memory(ctx), false);
        for (int i = 0; i < n_seqs; ++i) {
            if (!saved[i].empty() &&
                llama_state_seq_set_data(ctx, saved[i].data(), saved[i].size(), seqs[i]) == 0) {
                llama_memory_clear(llama_get_memory(ctx), false);
                return -1;
            }
        }
    } catch (...) {         // bad_alloc: nothing may escape into Cython's nogil code
        llama_memory_clear(llama_get_memory(ctx), false);
        return -1;
    }
    return 0;
}

// ``set(b, on)`` on every CPU backend of ``ctx`` (ggml-cpu's flags; other backends are not reached)
static void each_cpu_backend(llama_context * ctx, void (*set)(ggml_backend_t, bool), bool on) noexcept {
    ggml_backend_sched_t sched = ctx->get_sched();
    for (int i = 0; i < ggml_backend_sched_get_n_backends(sched); ++i) {
        ggml_backend_t b = ggml_backend_sched_get_backend(sched, i);
        if (ggml_backend_is_cpu(b)) {
            set(b, on);
        }
    }
}

void set_batch_invariant(llama_context * ctx, bool on) noexcept {
    each_cpu_backend(ctx, ggml_backend_cpu_set_batch_invariant, on);
}

void set_one_row(llama_context * ctx, bool on) noexcept {
    each_cpu_backend(ctx, ggml_backend_cpu_set_one_row, on);
}

}  // namespace lgctx
