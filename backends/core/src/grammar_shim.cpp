// The calls into llama.cpp's grammar sampler that can throw a C++ exception, each inside a
// try/catch. An exception that reached Rust through an `extern "C"` call would abort the
// process; caught here it becomes a return code and its message, which the Rust side
// turns into a typed error.
//
// What throws (llama.cpp's src/llama-grammar.cpp): building a lazy grammar compiles its
// trigger patterns with std::regex (std::regex_error on a bad pattern); accepting a token
// the grammar does not allow throws std::runtime_error ("Unexpected empty grammar stack"),
// and a lazy grammar replays the text of its trigger through the same path when it fires;
// std::bad_alloc anywhere.
//
// Only the C API is declared (no llama.cpp header is needed): the opaque types and the
// four functions, with the signatures of include/llama.h.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>

extern "C" {
struct llama_sampler;
struct llama_vocab;
struct llama_token_data_array;
typedef int32_t llama_token;

struct llama_sampler * llama_sampler_init_grammar(const struct llama_vocab * vocab, const char * grammar_str,
                                                  const char * grammar_root);
struct llama_sampler * llama_sampler_init_grammar_lazy_patterns(const struct llama_vocab * vocab, const char * grammar_str,
                                                                const char * grammar_root, const char ** trigger_patterns,
                                                                size_t num_trigger_patterns, const llama_token * trigger_tokens,
                                                                size_t num_trigger_tokens);
void llama_sampler_accept(struct llama_sampler * smpl, llama_token token);
void llama_sampler_apply(struct llama_sampler * smpl, struct llama_token_data_array * cur_p);
}

static void put_message(char * buf, size_t len, const char * msg) {
    if (buf == nullptr || len == 0) {
        return;
    }
    std::strncpy(buf, msg, len - 1);
    buf[len - 1] = '\0';
}

// Runs `f`; 0 when it returned, 1 when it threw (the message written to `err`).
template <typename F> static int guarded(char * err, size_t err_len, F f) noexcept {
    try {
        f();
        return 0;
    } catch (const std::exception & e) {
        put_message(err, err_len, e.what());
    } catch (...) {
        put_message(err, err_len, "unknown C++ exception");
    }
    return 1;
}

extern "C" int llama_rs_grammar_init(const struct llama_vocab * vocab, const char * text, const char * root, bool lazy,
                                     const char ** patterns, size_t n_patterns, const llama_token * tokens, size_t n_tokens,
                                     struct llama_sampler ** out, char * err, size_t err_len) noexcept {
    *out = nullptr;
    return guarded(err, err_len, [&] {
        if (lazy) {
            *out = llama_sampler_init_grammar_lazy_patterns(vocab, text, root, patterns, n_patterns, tokens, n_tokens);
        } else {
            *out = llama_sampler_init_grammar(vocab, text, root);
        }
    });
}

extern "C" int llama_rs_sampler_accept(struct llama_sampler * smpl, llama_token token, char * err, size_t err_len) noexcept {
    return guarded(err, err_len, [&] { llama_sampler_accept(smpl, token); });
}

extern "C" int llama_rs_sampler_apply(struct llama_sampler * smpl, struct llama_token_data_array * cur_p, char * err,
                                      size_t err_len) noexcept {
    return guarded(err, err_len, [&] { llama_sampler_apply(smpl, cur_p); });
}
