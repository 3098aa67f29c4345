// KV-cache upkeep that llama.h does not offer.  The implementation (lg_ctx.cpp) reads llama.cpp's
// internal cache (src/llama-kv-cache*.h at the pinned commit), so only that translation unit
// depends on the internal layout.
#pragma once

#include <cstdint>

struct llama_context;

namespace lgctx {

// Pack the cells of ``seqs`` (in that order) from cell 0 with no free cell between them, so the next
// decode places its tokens after the last one: llama.cpp puts a token in the first free cell it
// finds, and a sequence whose new cells land before its older ones is computed differently (see
// docs/engine.md, "Answers that do not depend on earlier requests").  Every other sequence must hold
// no cells.  ``follow`` (or -1) is the sequence whose prefix the next one continues: when no free
// cell lies below its cells, its new tokens land after them anyway and nothing moves.  Returns 1
// when nothing moved (no holes, or not one unified KV cache), 0 when packed, -1 when a state could
// not be restored: the memory is then cleared and the caller must forget every cache.
int compact(llama_context * ctx, const int32_t * seqs, int n_seqs, int32_t follow) noexcept;

// Batch-invariant kernels on every CPU backend of ``ctx`` (our ggml-cpu patch 0002, see
// docs/determinism.md): a row's logits no longer depend on its companions or its cells.  Other
// (GPU) backends are not reached: Context refuses deterministic=True with GPU layers.
void set_batch_invariant(llama_context * ctx, bool on) noexcept;

// One-row kernels for every row on every CPU backend of ``ctx`` (our ggml-cpu patch 0008): each
// row of a many-row batch computed as a one-row batch computes it, so a speculative verify batch
// gives the logits (and writes the KV cells) that plain decoding would.
void set_one_row(llama_context * ctx, bool on) noexcept;

}  // namespace lgctx
