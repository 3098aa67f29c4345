# Raw declarations of llamagen's JSON-schema wrapper over llama.cpp's converter
# (llamagen/csrc/lg_schema.h).  No logic here: cimport as a namespace
# (`from llamagen.includes cimport schema as lgschema`).
from libcpp cimport bool as cbool
from libcpp.string cimport string
from libcpp.vector cimport vector

from llamagen.includes.llama cimport llama_sampler, llama_vocab


cdef extern from "lg_schema.h" namespace "lgschema" nogil:
    int to_grammar(const string & schema_json, string & grammar, string & err,
                   string & warnings) noexcept
    llama_sampler * grammar_init(const llama_vocab * vocab, const char * grammar,
                                 const char * root, cbool lazy,
                                 const vector[string] & trigger_patterns,
                                 const vector[int] & trigger_tokens, const vector[int] & prefill,
                                 string & messages) noexcept


cdef extern from "lg_unique.h" namespace "lgunique" nogil:
    llama_sampler * wrap(llama_sampler * inner, const llama_vocab * vocab, const string & spec,
                         string & err) noexcept
