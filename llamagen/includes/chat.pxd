# Raw declarations of llamagen's chat-template wrapper over llama.cpp's `common` library
# (llamagen/csrc/lg_chat.h).  No logic here: cimport as a namespace
# (`from llamagen.includes cimport chat as lgchat`).  Every function is noexcept in C++ and
# reports failures through its status and `err`.
from libcpp cimport bool as cbool
from libcpp.string cimport string
from libcpp.vector cimport vector

from llamagen.includes.llama cimport llama_model, llama_sampler, llama_vocab


cdef extern from "lg_chat.h" namespace "lgchat" nogil:
    cdef cppclass Templates:
        pass

    cdef cppclass Rendered:
        Rendered()
        string prompt
        string grammar
        cbool grammar_lazy
        string generation_prompt
        string format
        cbool supports_thinking
        string thinking_start_tag
        vector[string] thinking_end_tags
        vector[string] additional_stops
        vector[string] preserved_tokens
        vector[string] trigger_patterns
        vector[int] trigger_tokens
        vector[int] preserved_ids
        vector[int] prefill_tokens
        int format_id
        string parser

    cdef cppclass Budget:
        long long max_steps
        long long max_bytes
        double max_seconds

    Templates * templates_new(const llama_model * model, const string & override_src,
                              const Budget & budget, string & err) noexcept
    void templates_free(Templates * t) noexcept
    string templates_source(const Templates * t) noexcept
    int render(const Templates * t, const llama_vocab * vocab, const string & messages_json,
               const string & kwargs_json, const string & tools_json, const string & tool_choice,
               int parallel_tool_calls, cbool add_generation_prompt, cbool prefill_assistant,
               int enable_thinking, const Budget & budget, Rendered & out, string & err) noexcept
    cdef cppclass Parser:
        pass

    Parser * parser_new(int format_id, const string & generation_prompt, const string & parser,
                        cbool parse_tool_calls, int reasoning_format, string & err) noexcept
    void parser_free(Parser * p) noexcept
    int parser_parse(const Parser * p, const string & text, cbool is_partial, string & out_json,
                     string & err) noexcept

    llama_sampler * reasoning_budget_new(const llama_vocab * vocab, const int * start, int n_start,
                                         const int * ends, const int * end_lens, int n_ends,
                                         const int * forced, int n_forced, int budget,
                                         string & err) noexcept
    int reasoning_budget_state(const llama_sampler * smpl) noexcept
