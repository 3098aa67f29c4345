// Chat prompts rendered the way llama-server renders them: the model's Jinja chat template through
// llama.cpp's `common` library (common/chat.h).  This header only uses std types so that the
// Cython side never sees nlohmann/common_json; the implementation is lg_chat.cpp (its own
// translation unit, so the heavy common headers do not slow down every _core.cpp compile).
//
// Every function is noexcept: C++ exceptions (bad JSON, Jinja syntax or runtime errors,
// raise_exception() in a template, bad_alloc) come back as a status and a message.
#pragma once

#include <string>
#include <vector>

struct llama_model;
struct llama_vocab;
struct llama_sampler;

namespace lgchat {

// Budgets for one template render (Jinja runtime, third_party patch 0003): statements run, bytes
// of strings produced, wall time; 0 = no limit.  A template past one fails the call (err).
struct Budget {
    long long max_steps = 0;
    long long max_bytes = 0;
    double max_seconds = 0;
};

// Parsed templates of one model (or one override source); read-only after creation, so one
// object may render from several threads at once (llama-server does the same).
struct Templates;

struct Rendered {
    std::string prompt;
    std::string grammar;                     // non-empty only when the template implies one
    bool grammar_lazy = false;
    std::string generation_prompt;           // what add_generation_prompt appended
    std::string format;                      // common_chat_format_name() of the output parser
    bool supports_thinking = false;
    std::string thinking_start_tag;
    std::vector<std::string> thinking_end_tags;
    std::vector<std::string> additional_stops;
    std::vector<std::string> preserved_tokens;
    // what llama-server derives from the above for sampling (tools/server/server-schema.cpp and
    // common/sampling.cpp): the lazy grammar's trigger regexes and tokens, the preserved tokens
    // that are one token each (shown in the generated text), and the generation prompt's tokens
    // that a non-lazy tool-call grammar accepts before the first generated token
    std::vector<std::string> trigger_patterns;
    std::vector<int> trigger_tokens;
    std::vector<int> preserved_ids;
    std::vector<int> prefill_tokens;
    int format_id = 0;                       // common_chat_format, for parser_new()
    std::string parser;                      // the output parser (a saved PEG arena), for parser_new()
};

// The model's templates (override_src empty) or the given Jinja source ("chatml" = llama.cpp's
// built-in ChatML).  A model without a template gets ChatML, as in llama-server.  The model is
// only read here: the result does not reference it.  nullptr on failure, with the reason in err.
// budget: for the probe renders llama.cpp runs while loading (capability detection).
Templates * templates_new(const llama_model * model, const std::string & override_src,
                          const Budget & budget, std::string & err) noexcept;
void templates_free(Templates * t) noexcept;

// The Jinja source that renders by default (after llama.cpp's fallbacks and fixes).
std::string templates_source(const Templates * t) noexcept;

// Render an OpenAI-style JSON array of messages.  kwargs_json: a JSON object of extra template
// variables (chat_template_kwargs), or empty.  tools_json: an OpenAI `tools` array, or empty;
// tool_choice: "auto", "none" or "required"; parallel_tool_calls: -1 what the template supports,
// 0 or 1.  vocab: the model's, for the token-level outputs (trigger tokens, preserved ids,
// prefill).  enable_thinking: -1 auto (on when the template supports it, llama-server's
// default), 0 off, 1 on (still off where the template cannot think).
// prefill_assistant: a trailing assistant message is continued instead of closed (llama-server's
// default; add_generation_prompt is then ignored).  0 on success; -1 with err set on failure.
int render(const Templates * t, const llama_vocab * vocab, const std::string & messages_json,
           const std::string & kwargs_json, const std::string & tools_json, const std::string & tool_choice,
           int parallel_tool_calls, bool add_generation_prompt, bool prefill_assistant, int enable_thinking,
           const Budget & budget, Rendered & out, std::string & err) noexcept;

// An output parser: generated text -> an assistant message, as llama-server parses it
// (common_chat_parse with the format, generation prompt and parser that render() gave,
// reasoning split out per reasoning_format: a common_reasoning_format, llama-server's default
// COMMON_REASONING_FORMAT_DEEPSEEK; NONE leaves it in the content).  Loading the parser (a
// saved PEG arena) costs more than parsing a reply, so it is loaded once; read-only afterwards,
// so several threads may parse with one.  nullptr with err set when it cannot be loaded.
struct Parser;
Parser * parser_new(int format_id, const std::string & generation_prompt, const std::string & parser,
                    bool parse_tool_calls, int reasoning_format, std::string & err) noexcept;
void parser_free(Parser * p) noexcept;

// is_partial: the text may stop mid-way (streaming).  out_json: the message as OpenAI JSON
// (role, content, reasoning_content, tool_calls with function name and arguments text).  0 on
// success; -1 with err set when the text does not parse.
int parser_parse(const Parser * p, const std::string & text, bool is_partial, std::string & out_json,
                 std::string & err) noexcept;

// A thinking budget (common/reasoning-budget.h): a llama_sampler that, once ``budget`` tokens were
// generated after ``start`` (and before any of ``ends``), makes ``forced`` the only tokens left,
// one by one.  ``ends`` holds end sequences back to back, ``end_lens`` their lengths.  The state
// of common_reasoning_budget_state is returned by reasoning_budget_state (FORCING: 2).  nullptr
// when llama.cpp refuses (err set).
llama_sampler * reasoning_budget_new(const llama_vocab * vocab, const int * start, int n_start,
                                            const int * ends, const int * end_lens, int n_ends,
                                            const int * forced, int n_forced, int budget,
                                            std::string & err) noexcept;
int reasoning_budget_state(const llama_sampler * smpl) noexcept;

}  // namespace lgchat
