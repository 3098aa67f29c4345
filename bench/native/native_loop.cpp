// The bar for llamagen: a plain C++ generation loop over the same llama.cpp build, doing per token
// exactly what a GenerationState step does: decode, sample with the same chain, accept, end-of-
// generation check, token to piece.  Prints one JSON object: tokens, text, timings.
//
//   llamagen-native-loop MODEL PROMPT [--n-predict N] [--threads N] [--ctx N] [--temp T]
//                        [--top-k K] [--top-p P] [--seed S] [--ignore-eos] [--repeat N]
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static void quiet(enum ggml_log_level, const char *, void *) {}

static std::string json_escape(const std::string & s) {
    std::string o;
    for (unsigned char c : s) {
        switch (c) {
            case '"': o += "\\\""; break;
            case '\\': o += "\\\\"; break;
            case '\n': o += "\\n"; break;
            case '\r': o += "\\r"; break;
            case '\t': o += "\\t"; break;
            default:
                if (c < 0x20) { char b[8]; snprintf(b, sizeof b, "\\u%04x", c); o += b; }
                else o += (char) c;
        }
    }
    return o;
}

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL PROMPT [options]\n", argv[0]);
        return 2;
    }
    const char * model_path = argv[1];
    std::string prompt = argv[2];
    int n_predict = 128, n_threads = 2, n_ctx = 2048, top_k = 50, repeat = 1;
    float temp = 0.8f, top_p = 0.9f;
    uint32_t seed = 42;
    bool ignore_eos = false, step_times = false;
    for (int i = 3; i < argc; i++) {
        std::string a = argv[i];
        auto next = [&]() { if (i + 1 >= argc) { fprintf(stderr, "missing value for %s\n", a.c_str()); exit(2); } return argv[++i]; };
        if (a == "--n-predict") n_predict = atoi(next());
        else if (a == "--threads") n_threads = atoi(next());
        else if (a == "--ctx") n_ctx = atoi(next());
        else if (a == "--temp") temp = atof(next());
        else if (a == "--top-k") top_k = atoi(next());
        else if (a == "--top-p") top_p = atof(next());
        else if (a == "--seed") seed = (uint32_t) strtoul(next(), nullptr, 10);
        else if (a == "--repeat") repeat = atoi(next());
        else if (a == "--ignore-eos") ignore_eos = true;
        else if (a == "--step-times") step_times = true;
        else { fprintf(stderr, "unknown option %s\n", a.c_str()); return 2; }
    }
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(model_path, mp);
    if (!model) { fprintf(stderr, "could not load %s\n", model_path); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx; cp.n_batch = 512; cp.n_ubatch = 512;
    cp.n_threads = n_threads; cp.n_threads_batch = n_threads; cp.no_perf = true;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "could not create context\n"); return 1; }

    std::vector<llama_token> toks(prompt.size() + 8);
    int n = llama_tokenize(vocab, prompt.c_str(), (int) prompt.size(), toks.data(), (int) toks.size(), true, true);
    if (n < 0) { toks.resize(-n); n = llama_tokenize(vocab, prompt.c_str(), (int) prompt.size(), toks.data(), (int) toks.size(), true, true); }
    toks.resize(n);

    std::vector<llama_token> out;
    std::vector<int64_t> steps;
    std::string text;
    double best_decode_ms = 1e300, prefill_ms = 0;
    for (int r = 0; r < repeat; r++) {
        // the same chain llamagen builds for these parameters (llama.cpp's common order)
        llama_sampler * chain = llama_sampler_chain_init(llama_sampler_chain_default_params());
        if (top_k > 0) llama_sampler_chain_add(chain, llama_sampler_init_top_k(top_k));
        if (top_p < 1.0f) llama_sampler_chain_add(chain, llama_sampler_init_top_p(top_p, 0));
        llama_sampler_chain_add(chain, llama_sampler_init_temp_ext(temp, 0.0f, 1.0f));
        llama_sampler_chain_add(chain, llama_sampler_init_dist(seed));

        llama_memory_clear(llama_get_memory(ctx), true);
        out.clear(); text.clear(); steps.clear();
        int64_t t0 = llama_time_us();
        for (size_t i = 0; i < toks.size(); i += 512) {
            int m = (int) std::min<size_t>(512, toks.size() - i);
            if (llama_decode(ctx, llama_batch_get_one(toks.data() + i, m)) != 0) { fprintf(stderr, "prefill failed\n"); return 1; }
        }
        int64_t t1 = llama_time_us();
        llama_token tok;
        char buf[256];
        for (int i = 0; i < n_predict; i++) {
            if (i > 0 && llama_decode(ctx, llama_batch_get_one(&tok, 1)) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
            tok = llama_sampler_sample(chain, ctx, -1);
            out.push_back(tok);
            if (!ignore_eos && llama_vocab_is_eog(vocab, tok)) break;
            int k = llama_token_to_piece(vocab, tok, buf, sizeof buf, 0, false);
            if (k > 0) text.append(buf, k);
            if (step_times) steps.push_back(llama_time_us());
        }
        int64_t t2 = llama_time_us();
        prefill_ms = (t1 - t0) / 1e3;
        double dms = (t2 - t1) / 1e3;
        if (dms < best_decode_ms) best_decode_ms = dms;
        llama_sampler_free(chain);
    }
    printf("{\"n_prompt\": %zu, \"tokens\": [", toks.size());
    for (size_t i = 0; i < out.size(); i++) printf(i ? ", %d" : "%d", out[i]);
    printf("], \"step_us\": [");
    for (size_t i = 0; i < steps.size(); i++) printf(i ? ", %lld" : "%lld", (long long) steps[i]);
    printf("], \"text\": \"%s\", \"prefill_ms\": %.3f, \"decode_ms\": %.3f, \"tokens_per_second\": %.3f}\n",
           json_escape(text).c_str(), prefill_ms, best_decode_ms, out.size() / (best_decode_ms / 1e3));
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
