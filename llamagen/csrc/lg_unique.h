// JSON Schema's `uniqueItems` enforced while sampling: a llama_sampler that wraps a JSON
// schema's grammar sampler and also rejects every token that would complete an array item
// equal to an earlier item of the same array (or, for items with a small finite set of values,
// that would start one no unused value begins with).  The grammar cannot remember earlier
// items; this sampler reads the generated JSON as it goes and knows which arrays (by path) are
// unique.  Its rejections are closed under piece extension (a token whose piece extends a
// rejected piece is rejected), as the fast engine's grammar prefix tree requires.
#pragma once

#include <string>

struct llama_sampler;
struct llama_vocab;

namespace lgunique {

// ``spec``: JSON text {"arrays": [{"path": [key or null (any index)...], "domain": [values] |
// null}, ...]} (llamagen.structured.unique_spec).  Takes ``inner`` (freed with the wrapper,
// also on failure).  NULL with ``err`` set when the spec does not parse.
llama_sampler * wrap(llama_sampler * inner, const llama_vocab * vocab, const std::string & spec,
                     std::string & err) noexcept;

}  // namespace lgunique
