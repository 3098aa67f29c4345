// See lg_chat.h.  The request handling follows llama-server's oaicompat_chat_params_parse
// (tools/server/server-common.cpp) with the server's default options, for the parts that concern
// rendering messages: same inputs to common_chat_templates_apply, so the same prompt.
#include "lg_chat.h"

#include "chat.h"
#include "common.h"
#include "json.h"
#include "llama.h"
#include "log.h"
#include "reasoning-budget.h"
#include "jinja/utils.h"   // the render budget (third_party patch 0003)

#include <algorithm>
#include <cctype>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>

namespace lgchat {

struct Templates {
    common_chat_templates_ptr tmpls;
    bool supports_thinking = false;
    bool supports_parallel_tool_calls = false;
};

namespace {

// common's logger prints to stderr from a worker thread it starts on first use; llamagen reports
// failures as exceptions instead, so common's own log stays off (our copy of common is private
// to this module: nothing else in the process shares this setting).
void quiet_common_log() {
    static std::once_flag once;
    std::call_once(once, [] { common_log_set_verbosity_thold(-1); });
}

void set_error(std::string & err, const char * what) noexcept {
    try {
        err = what;
    } catch (...) {
        // out of memory while reporting: the caller still sees the failure status
    }
}

// What llama-server derives from the template's outputs for sampling (server-schema.cpp and
// common/sampling.cpp): preserved tokens that are one token each, the lazy grammar's trigger
// regexes and tokens (a trigger word that is one token must be preserved and triggers as that
// token), and the generation prompt's tokens that a non-lazy tool-call grammar accepts first.
void derive_sampling(const llama_vocab * vocab, const std::vector<common_grammar_trigger> & triggers,
                     Rendered & out) {
    for (const auto & word : out.preserved_tokens) {
        auto ids = common_tokenize(vocab, word, false, true);
        if (ids.size() == 1) {
            out.preserved_ids.push_back(ids[0]);
        }
    }
    for (const auto & trig : triggers) {
        switch (trig.type) {
            case COMMON_GRAMMAR_TRIGGER_TYPE_WORD: {
                auto ids = common_tokenize(vocab, trig.value, false, true);
                if (ids.size() == 1) {
                    if (std::find(out.preserved_ids.begin(), out.preserved_ids.end(), ids[0])
                            == out.preserved_ids.end()) {
                        throw std::runtime_error("Grammar trigger word should be marked as preserved token: "
                                                 + trig.value);
                    }
                    out.trigger_tokens.push_back(ids[0]);
                } else {
                    out.trigger_patterns.push_back(regex_escape(trig.value));
                }
                break;
            }
            case COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN:
                out.trigger_tokens.push_back(trig.token);
                break;
            case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN:
                out.trigger_patterns.push_back(trig.value);
                break;
            case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL: {
                // common/sampling.cpp: anchored at both ends
                std::string anchored = "^$";
                if (!trig.value.empty()) {
                    anchored = (trig.value.front() != '^' ? "^" : "") + trig.value
                             + (trig.value.back() != '$' ? "$" : "");
                }
                out.trigger_patterns.push_back(anchored);
                break;
            }
        }
    }
    if (out.grammar_lazy && !out.grammar.empty() && out.trigger_patterns.empty() && out.trigger_tokens.empty()) {
        throw std::runtime_error("Error: no triggers set for lazy grammar!");
    }
    // common/sampling.cpp: a tool-call grammar (not lazy) starts at the generation prompt
    if (!out.grammar.empty() && !out.grammar_lazy && !out.generation_prompt.empty()) {
        auto toks = common_tokenize(vocab, out.generation_prompt, false, true);
        for (size_t i = 0; i < toks.size(); i++) {
            std::string piece = common_token_to_piece(vocab, toks[i], true);
            if (i == 0 && !piece.empty() && std::isspace((unsigned char) piece[0])
                    && !std::isspace((unsigned char) out.generation_prompt[0])) {
                continue;    // a space some tokenizers put before the first special token
            }
            out.prefill_tokens.push_back(toks[i]);
        }
    }
}

jinja::lg_budget jinja_budget(const Budget & b) {
    jinja::lg_budget out;
    out.max_steps   = b.max_steps;
    out.max_bytes   = b.max_bytes;
    out.max_seconds = b.max_seconds;
    return out;
}

}  // namespace

Templates * templates_new(const llama_model * model, const std::string & override_src,
                          const Budget & budget, std::string & err) noexcept {
    try {
        quiet_common_log();
        jinja::lg_budget_scope scope(jinja_budget(budget));
        if (override_src.empty() && model == nullptr) {
            // common_chat_templates_init asserts (aborts) on this
            throw std::invalid_argument("no model and no template");
        }
        std::unique_ptr<Templates> t(new Templates());
        try {
            t->tmpls = common_chat_templates_init(model, override_src);
        } catch (const std::exception &) {
            // common rethrows a sliced std::exception whose what() lost the reason: parse the
            // same source again to get the Jinja error itself
            std::string src = override_src;
            if (src.empty()) {
                const char * s = llama_model_chat_template(model, nullptr);
                src = s ? s : "";
            }
            common_chat_template probe(src, "", "");
            throw std::runtime_error("the chat template could not be parsed");
        }
        if (!t->tmpls) {
            throw std::runtime_error("the chat template could not be loaded");
        }
        // llama-server decides this once at start-up by rendering a probe message; a template
        // that fails that render makes the server refuse to start, here it fails the load
        t->supports_thinking = common_chat_templates_support_enable_thinking(t->tmpls.get());
        auto caps = common_chat_templates_get_caps(t->tmpls.get());
        auto it = caps.find("supports_parallel_tool_calls");
        t->supports_parallel_tool_calls = it != caps.end() && it->second;
        return t.release();
    } catch (const std::exception & e) {
        set_error(err, e.what());
    } catch (...) {
        set_error(err, "unknown C++ exception while loading the chat template");
    }
    return nullptr;
}

void templates_free(Templates * t) noexcept {
    delete t;
}

std::string templates_source(const Templates * t) noexcept {
    try {
        return common_chat_templates_source(t->tmpls.get(), "");
    } catch (...) {
        return std::string();
    }
}

int render(const Templates * t, const llama_vocab * vocab, const std::string & messages_json,
           const std::string & kwargs_json, const std::string & tools_json, const std::string & tool_choice,
           int parallel_tool_calls, bool add_generation_prompt, bool prefill_assistant, int enable_thinking,
           const Budget & budget, Rendered & out, std::string & err) noexcept {
    try {
        quiet_common_log();
        jinja::lg_budget_scope scope(jinja_budget(budget));
        common_json messages = common_json::parse(messages_json);

        common_chat_templates_inputs inputs;
        inputs.messages               = common_chat_msgs_parse_oaicompat(messages);
        inputs.use_jinja              = true;
        if (!tools_json.empty()) {
            inputs.tools = common_chat_tools_parse_oaicompat(common_json::parse(tools_json));
        }
        inputs.tool_choice            = common_chat_tool_choice_parse_oaicompat(
            tool_choice.empty() ? std::string("auto") : tool_choice);
        inputs.parallel_tool_calls    = parallel_tool_calls < 0 ? t->supports_parallel_tool_calls
                                                                : parallel_tool_calls != 0;
        inputs.add_generation_prompt  = add_generation_prompt;
        inputs.continue_final_message = COMMON_CHAT_CONTINUATION_NONE;
        // the server's --prefill-assistant (on by default): continue a trailing assistant message
        if (prefill_assistant && !inputs.messages.empty() && inputs.messages.back().role == "assistant") {
            if (inputs.messages.size() >= 2 && inputs.messages[inputs.messages.size() - 2].role == "assistant") {
                throw std::invalid_argument("Cannot have 2 or more assistant messages at the end of the list.");
            }
            inputs.continue_final_message = COMMON_CHAT_CONTINUATION_AUTO;
            inputs.add_generation_prompt  = false;
        }
        if (inputs.continue_final_message != COMMON_CHAT_CONTINUATION_NONE
            && !inputs.messages.back().tool_calls.empty()) {
            throw std::invalid_argument("Cannot continue an assistant message that contains tool calls.");
        }
        // the server's defaults: --reasoning-format deepseek, --reasoning auto, and the
        // preserve_reasoning template kwarg that its argument parser adds when unset
        inputs.reasoning_format = COMMON_REASONING_FORMAT_DEEPSEEK;
        inputs.enable_thinking  = enable_thinking != 0 && t->supports_thinking;
        inputs.chat_template_kwargs["preserve_reasoning"] = "true";
        if (!kwargs_json.empty()) {
            common_json kwargs = common_json::parse(kwargs_json);
            if (!kwargs.is_object()) {
                throw std::invalid_argument("chat_template_kwargs must be a JSON object");
            }
            for (const auto & item : kwargs.items()) {
                inputs.chat_template_kwargs[item.key()] = item.value().dump();
            }
        }
        auto et = inputs.chat_template_kwargs.find("enable_thinking");
        if (et != inputs.chat_template_kwargs.end()) {
            if (et->second == "true") {
                inputs.enable_thinking = true;
            } else if (et->second == "false") {
                inputs.enable_thinking = false;
            } else if (!et->second.empty() && et->second[0] == '"') {
                throw std::invalid_argument("invalid type for \"enable_thinking\" (expected boolean, got string)");
            }
        }

        common_chat_params p = common_chat_templates_apply(t->tmpls.get(), inputs);
        out.prompt             = std::move(p.prompt);
        out.grammar            = std::move(p.grammar);
        out.grammar_lazy       = p.grammar_lazy;
        out.generation_prompt  = std::move(p.generation_prompt);
        out.format             = common_chat_format_name(p.format);
        out.supports_thinking  = p.supports_thinking;
        out.thinking_start_tag = std::move(p.thinking_start_tag);
        out.thinking_end_tags  = std::move(p.thinking_end_tags);
        out.additional_stops   = std::move(p.additional_stops);
        out.preserved_tokens   = std::move(p.preserved_tokens);
        out.format_id          = (int) p.format;
        out.parser             = std::move(p.parser);
        derive_sampling(vocab, p.grammar_triggers, out);
        return 0;
    } catch (const std::exception & e) {
        set_error(err, e.what());
    } catch (...) {
        set_error(err, "unknown C++ exception while rendering the chat template");
    }
    return -1;
}

struct Parser {
    common_chat_parser_params params;
};

Parser * parser_new(int format_id, const std::string & generation_prompt, const std::string & parser,
                    bool parse_tool_calls, int reasoning_format, std::string & err) noexcept {
    try {
        quiet_common_log();
        std::unique_ptr<Parser> p(new Parser());
        p->params.format               = (common_chat_format) format_id;
        p->params.reasoning_format     = (common_reasoning_format) reasoning_format;
        p->params.reasoning_in_content = false;
        p->params.generation_prompt    = generation_prompt;
        p->params.parse_tool_calls     = parse_tool_calls;
        if (!parser.empty()) {
            p->params.parser.load(parser);
        }
        return p.release();
    } catch (const std::exception & e) {
        set_error(err, e.what());
    } catch (...) {
        set_error(err, "unknown C++ exception while loading the output parser");
    }
    return nullptr;
}

void parser_free(Parser * p) noexcept {
    delete p;
}

int parser_parse(const Parser * p, const std::string & text, bool is_partial, std::string & out_json,
                 std::string & err) noexcept {
    try {
        common_chat_msg msg = common_chat_parse(text, is_partial, p->params);
        msg.role = "assistant";
        out_json = msg.to_json_oaicompat().dump();
        return 0;
    } catch (const std::exception & e) {
        set_error(err, e.what());
    } catch (...) {
        set_error(err, "unknown C++ exception while parsing the model's output");
    }
    return -1;
}

llama_sampler * reasoning_budget_new(const llama_vocab * vocab, const int * start, int n_start,
                                     const int * ends, const int * end_lens, int n_ends,
                                     const int * forced, int n_forced, int budget,
                                     std::string & err) noexcept {
    try {
        std::vector<llama_tokens> end_seqs;
        for (int i = 0, at = 0; i < n_ends; at += end_lens[i], i++) {
            end_seqs.emplace_back(ends + at, ends + at + end_lens[i]);
        }
        return common_reasoning_budget_init(vocab, {llama_tokens(start, start + n_start)}, end_seqs,
                                            llama_tokens(forced, forced + n_forced), budget);
    } catch (const std::exception & e) {
        set_error(err, e.what());
    } catch (...) {
        set_error(err, "unknown C++ exception while making the reasoning budget");
    }
    return nullptr;
}

int reasoning_budget_state(const llama_sampler * smpl) noexcept {
    return (int) common_reasoning_budget_get_state(smpl);
}

}  // namespace lgchat
