#include "lg_ctx.h"

#include "llama.h"
#include "llama-context.h"       // internal (pinned commit): get_memory()
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"

#include <vector>

namespace lgctx {

static int64_t holes_of(const llama_kv_cache * kv) {
    if (kv == nullptr || kv->get_n_stream() != 1) {
        return -1;
    }
    const llama_kv_cells & cells = kv->get_cells(0);
    return (int64_t) cells.used_max_p1() - (int64_t) cells.get_used();
}

// whether a free cell lies below the highest cell holding ``seq`` (then llama.cpp may put the
// sequence's next token there, before its older cells)
static bool free_below(const llama_kv_cache * kv, int32_t seq) {
    const llama_kv_cells & cells = kv->get_cells(0);
    int64_t top = -1;
    for (uint32_t i = 0; i < cells.used_max_p1(); ++i) {
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

static bool any_free_below(llama_context * ctx, int32_t seq) {
    llama_memory_i * mem = ctx->get_memory();
    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        return free_below(kv, seq);
    }
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        return free_below(iswa->get_base(), seq) || free_below(iswa->get_swa(), seq);
    }
    return true;
}

int64_t kv_holes(llama_context * ctx) noexcept {
    llama_memory_i * mem = ctx->get_memory();
    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        return holes_of(kv);
    }
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        const int64_t a = holes_of(iswa->get_base()), b = holes_of(iswa->get_swa());
        if (a < 0 || b < 0) {
            return -1;
        }
        return a + b;
    }
    return -1;
}

int compact(llama_context * ctx, const int32_t * seqs, int n_seqs, int32_t follow) noexcept {
    if (kv_holes(ctx) <= 0) {      // (per-sequence streams: a stream only holds its own cells)
        return 1;
    }
    if (follow >= 0 && !any_free_below(ctx, follow)) {
        return 1;       // every free cell is above the prefix: new tokens land after it anyway
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

}  // namespace lgctx
