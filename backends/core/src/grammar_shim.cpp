// The calls into llama.cpp's grammar sampler that can throw a C++ exception, each inside a
// try/catch. An exception that reached Rust through an `extern "C"` call would abort the
// process; caught here it becomes a return code and its message, which the Rust side
// turns into a typed error.
//
// What throws (llama.cpp's src/llama-grammar.cpp): accepting a token the grammar does not
// allow throws std::runtime_error ("Unexpected empty grammar stack"), and the backend
// replays a lazy grammar's trigger text through that path when it fires; std::bad_alloc
// anywhere. Grammars are always built non-lazy: the trigger search is the backend's own
// (src/trigger.rs), so llama.cpp's std::regex trigger patterns are never compiled.
//
// Only the C API is declared (no llama.cpp header is needed): the opaque types and the
// four functions, with the signatures of include/llama.h.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

extern "C" {
struct llama_sampler;
struct llama_vocab;
struct llama_token_data_array;
typedef int32_t llama_token;

struct llama_sampler * llama_sampler_init_grammar(const struct llama_vocab * vocab, const char * grammar_str,
                                                  const char * grammar_root);
void llama_sampler_accept(struct llama_sampler * smpl, llama_token token);
void llama_sampler_apply(struct llama_sampler * smpl, struct llama_token_data_array * cur_p);
const char * llama_sampler_name(const struct llama_sampler * smpl);

// include/llama.h's definition (a public struct of the C API).
struct llama_sampler_i;
struct llama_sampler {
    struct llama_sampler_i * iface;
    void *                   ctx;
};
}

// The number of a grammar sampler's stacks, which can double per token (`a ::= "x" a "y" |
// "x" a "z"`) while llama.cpp's de-duplication of them is quadratic: the Rust side bounds it.
//
// llama.cpp's internal C++ API (src/llama-grammar.h, exported from libllama):
//     llama_grammar_stacks & llama_grammar_get_stacks(struct llama_grammar * grammar);
// with llama_grammar_stacks = std::vector<std::vector<const llama_grammar_element *>>. The
// element type is only pointed to, so a forward declaration gives the same vector type and
// the same mangled name (a mismatched parameter would fail to link).
struct llama_grammar;
struct llama_grammar_element;
using llama_rs_grammar_stacks = std::vector<std::vector<const llama_grammar_element *>>;
llama_rs_grammar_stacks & llama_grammar_get_stacks(struct llama_grammar * grammar);

// A mirror of `struct llama_sampler_grammar`, the ctx of a grammar sampler, which
// llama.cpp defines in src/llama-sampler.cpp (no header): llama-cpp-sys-2 is pinned to
// =0.1.161, whose definition is exactly
//     const struct llama_vocab * vocab; std::string grammar_str; std::string grammar_root;
//     struct llama_grammar * grammar;
// Same compiler and standard library as libllama, so the same layout. Re-check it when the
// pin moves. Only read for a sampler whose name is "grammar" (llama_sampler_grammar_name).
struct llama_rs_sampler_grammar_mirror {
    const struct llama_vocab * vocab;
    std::string                grammar_str;
    std::string                grammar_root;
    struct llama_grammar *     grammar;
};
static_assert(offsetof(llama_rs_sampler_grammar_mirror, grammar) == sizeof(void *) + 2 * sizeof(std::string),
              "the mirror has no padding llama.cpp's struct would not have");

// The stack count of a grammar sampler built by llama_rs_grammar_init; SIZE_MAX for a
// sampler that is not one.
extern "C" size_t llama_rs_grammar_stack_count(struct llama_sampler * smpl) noexcept {
    if (smpl == nullptr || smpl->ctx == nullptr) {
        return SIZE_MAX;
    }
    const char * name = llama_sampler_name(smpl);
    if (name == nullptr || std::strcmp(name, "grammar") != 0) {
        return SIZE_MAX;
    }
    auto * ctx = static_cast<llama_rs_sampler_grammar_mirror *>(smpl->ctx);
    if (ctx->grammar == nullptr) {
        return 0;
    }
    return llama_grammar_get_stacks(ctx->grammar).size();
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

extern "C" int llama_rs_grammar_init(const struct llama_vocab * vocab, const char * text, const char * root,
                                     struct llama_sampler ** out, char * err, size_t err_len) noexcept {
    *out = nullptr;
    return guarded(err, err_len, [&] { *out = llama_sampler_init_grammar(vocab, text, root); });
}

extern "C" int llama_rs_sampler_accept(struct llama_sampler * smpl, llama_token token, char * err, size_t err_len) noexcept {
    return guarded(err, err_len, [&] { llama_sampler_accept(smpl, token); });
}

extern "C" int llama_rs_sampler_apply(struct llama_sampler * smpl, struct llama_token_data_array * cur_p, char * err,
                                      size_t err_len) noexcept {
    return guarded(err, err_len, [&] { llama_sampler_apply(smpl, cur_p); });
}
