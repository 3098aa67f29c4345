// See lg_schema.h.
#include "lg_schema.h"

#include "json-schema-to-grammar.h"
#include "json.h"
#include "llama.h"

#include <cstdio>
#include <exception>
#include <mutex>
#include <unistd.h>

namespace lgschema {

namespace {

// llama.cpp's converter prints "WARNING: JSON schema conversion was incomplete: ..." to stderr
// and returns a grammar that accepts more than the schema (an unsupported regex pattern becomes
// any string).  It has no other way to report that, so stderr is pointed at a temporary file
// for the duration of the call and read back; anything else written there meanwhile (another
// thread's output) is passed on to the real stderr.
class StderrCapture {
  public:
    StderrCapture() {
        std::fflush(stderr);
        file_ = std::tmpfile();
        if (file_ != nullptr) {
            saved_ = dup(2);
            if (saved_ < 0 || dup2(fileno(file_), 2) < 0) {
                restore();
            }
        }
    }

    ~StderrCapture() { restore(); }

    // the captured text; stderr is back to normal afterwards
    std::string take() {
        std::string text;
        if (saved_ < 0) {
            restore();
            return text;
        }
        std::fflush(stderr);
        dup2(saved_, 2);
        close(saved_);
        saved_ = -1;
        std::rewind(file_);
        char buf[4096];
        size_t n;
        while ((n = std::fread(buf, 1, sizeof(buf), file_)) > 0) {
            text.append(buf, n);
        }
        restore();
        return text;
    }

  private:
    void restore() {
        if (saved_ >= 0) {
            std::fflush(stderr);
            dup2(saved_, 2);
            close(saved_);
            saved_ = -1;
        }
        if (file_ != nullptr) {
            std::fclose(file_);
            file_ = nullptr;
        }
    }

    std::FILE * file_ = nullptr;
    int saved_ = -1;
};

std::mutex g_capture_mutex;     // one redirection of fd 2 at a time

const char WARNING_PREFIX[] = "WARNING: JSON schema conversion was incomplete: ";

}  // namespace

int to_grammar(const std::string & schema_json, std::string & grammar, std::string & err,
               std::string & warnings) noexcept {
    try {
        const common_json schema = common_json::parse(schema_json);
        std::string captured;
        {
            std::lock_guard<std::mutex> lock(g_capture_mutex);
            StderrCapture capture;
            try {
                grammar = json_schema_to_grammar(schema, /* force_gbnf */ true);
            } catch (...) {
                captured = capture.take();
                throw;
            }
            captured = capture.take();
        }
        // keep the converter's warning; pass anything else on
        std::string other;
        size_t pos = 0;
        while (pos < captured.size()) {
            size_t end = captured.find('\n', pos);
            if (end == std::string::npos) {
                end = captured.size();
            }
            const std::string line = captured.substr(pos, end - pos);
            if (line.compare(0, sizeof(WARNING_PREFIX) - 1, WARNING_PREFIX) == 0) {
                warnings += line.substr(sizeof(WARNING_PREFIX) - 1);
            } else if (!line.empty()) {
                other += line + "\n";
            }
            pos = end + 1;
        }
        if (!other.empty()) {
            std::fputs(other.c_str(), stderr);
        }
        return 0;
    } catch (const std::exception & e) {
        err = e.what();
    } catch (...) {
        err = "unknown error";
    }
    return -1;
}

llama_sampler * grammar_init(const llama_vocab * vocab, const char * grammar, const char * root,
                             bool lazy, const std::vector<std::string> & trigger_patterns,
                             const std::vector<int> & trigger_tokens, const std::vector<int> & prefill,
                             std::string & messages) noexcept {
    llama_sampler * s = nullptr;
    try {
        std::lock_guard<std::mutex> lock(g_capture_mutex);
        StderrCapture capture;
        if (lazy) {
            std::vector<const char *> pats;
            for (const auto & p : trigger_patterns) {
                pats.push_back(p.c_str());
            }
            std::vector<llama_token> toks(trigger_tokens.begin(), trigger_tokens.end());
            // a bad regex throws std::regex_error from inside: caught below
            s = llama_sampler_init_grammar_lazy_patterns(vocab, grammar, root, pats.data(), pats.size(),
                                                         toks.data(), toks.size());
        } else {
            s = llama_sampler_init_grammar(vocab, grammar, root);
        }
        messages = capture.take();
        if (s != nullptr) {
            for (int tok : prefill) {
                llama_sampler_accept(s, tok);     // throws if the grammar cannot start with it
            }
        }
        return s;
    } catch (const std::exception & e) {
        messages = e.what();
    } catch (...) {
        messages = "unknown error";
    }
    if (s != nullptr) {
        llama_sampler_free(s);
    }
    return nullptr;
}

}  // namespace lgschema
