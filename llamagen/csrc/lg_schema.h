// JSON schema -> GBNF through llama.cpp's own converter (common/json-schema-to-grammar.h).  std
// types only, so the Cython side never sees common_json; the implementation is lg_schema.cpp.
#pragma once

#include <string>
#include <vector>

struct llama_sampler;
struct llama_vocab;

namespace lgschema {

// llama_sampler_init_grammar with what llama.cpp's parser prints to stderr on a failure (the
// reason: "Undefined rule identifier ...", ...) captured into ``messages`` instead.  What a chat
// template's tool-call format asks for too (common/sampling.cpp): ``lazy``, a grammar asleep
// until a trigger regex matches the generated text or a trigger token is sampled, and
// ``prefill``, tokens the grammar accepts before the first generated one (the generation
// prompt).  NULL with the reason in ``messages`` when the grammar, a regex or the prefill is
// refused.
llama_sampler * grammar_init(const llama_vocab * vocab, const char * grammar, const char * root,
                             bool lazy, const std::vector<std::string> & trigger_patterns,
                             const std::vector<int> & trigger_tokens, const std::vector<int> & prefill,
                             std::string & messages) noexcept;

// Convert a JSON schema (its JSON text) into a GBNF grammar whose root rule is "root".
// 0 on success.  -1 with ``err`` set when the text is not JSON or the schema falls outside what
// the converter supports; ``warnings`` gets what the converter would only have printed (a regex
// pattern it cannot express, which it replaces by "any string"): the caller treats that as an
// error too, since the output would not be guaranteed to match the schema.
int to_grammar(const std::string & schema_json, std::string & grammar, std::string & err,
               std::string & warnings) noexcept;

}  // namespace lgschema
