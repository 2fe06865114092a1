// gpt2rt.hpp: a header-only C++17 wrapper over the C ABI in gpt2rt.h.
//
// - Engine, Session and Tokenizer own their handle (std::unique_ptr with the matching
//   gpt2rt_*_destroy): move-only, released exactly once, never copied.
// - A failing call throws gpt2rt::Error, which carries the status and the library's message
//   (gpt2rt_last_error_message of the failing thread).
// - Thread rules are the C ABI's: a Session is used by one thread at a time, except
//   Session::cancel, which any thread may call at any time.
// - A streaming callback may throw: the exception is caught before it reaches the library (it must
//   never unwind through C frames), generation stops, and Session::generate rethrows it.
#ifndef GPT2RT_HPP
#define GPT2RT_HPP

#include "gpt2rt.h"

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace gpt2rt {

// A failed gpt2rt call: the status and the library's message.
class Error : public std::runtime_error {
 public:
  Error(gpt2rt_status status, const std::string& message)
      : std::runtime_error(std::string(gpt2rt_status_name(status)) + ": " + message),
        status_(status),
        message_(message) {}

  gpt2rt_status status() const noexcept { return status_; }
  // The library's message alone (what() prefixes it with the status name).
  const std::string& message() const noexcept { return message_; }
  const char* status_name() const noexcept { return gpt2rt_status_name(status_); }

 private:
  gpt2rt_status status_;
  std::string message_;
};

// Throws Error for any status but OK.
inline void check(gpt2rt_status status) {
  if (status != GPT2RT_STATUS_OK) throw Error(status, gpt2rt_last_error_message());
}

// Throws std::runtime_error when the loaded library's ABI is not the one of this header.
inline void check_abi_version() {
  if (gpt2rt_abi_version() != GPT2RT_ABI_VERSION) {
    throw std::runtime_error("gpt2rt: library ABI " + std::to_string(gpt2rt_abi_version()) +
                             " but header ABI " + std::to_string(GPT2RT_ABI_VERSION));
  }
}

inline std::string version() { return gpt2rt_version_string(); }

namespace detail {
struct EngineDeleter {
  void operator()(gpt2rt_engine* engine) const noexcept { gpt2rt_engine_destroy(engine); }
};
struct SessionDeleter {
  void operator()(gpt2rt_session* session) const noexcept { gpt2rt_session_destroy(session); }
};
struct TokenizerDeleter {
  void operator()(gpt2rt_tokenizer* tokenizer) const noexcept { gpt2rt_tokenizer_destroy(tokenizer); }
};

// Calls a required-size function twice: once for the size, once into a buffer of that size.
template <typename Call>
std::string read_text(Call call) {
  std::size_t len = 0;
  gpt2rt_status status = call(nullptr, 0, &len);
  if (status != GPT2RT_STATUS_OK && status != GPT2RT_STATUS_BUFFER_TOO_SMALL) check(status);
  std::string text(len, '\0');
  check(call(text.data(), text.size(), &len));
  text.resize(len);
  return text;
}
}  // namespace detail

class Tokenizer {
 public:
  // The built-in GPT-2 tokenizer (no model needed).
  static Tokenizer gpt2() {
    gpt2rt_tokenizer* raw = nullptr;
    check(gpt2rt_tokenizer_create_gpt2(&raw));
    return Tokenizer(raw);
  }
  explicit Tokenizer(gpt2rt_tokenizer* owned) noexcept : handle_(owned) {}

  std::vector<int32_t> encode(std::string_view text) const {
    std::size_t count = 0;
    gpt2rt_status status = gpt2rt_tokenizer_encode(get(), text.data(), text.size(), nullptr, 0, &count);
    if (status != GPT2RT_STATUS_OK && status != GPT2RT_STATUS_BUFFER_TOO_SMALL) check(status);
    std::vector<int32_t> ids(count);
    check(gpt2rt_tokenizer_encode(get(), text.data(), text.size(), ids.data(), ids.size(), &count));
    ids.resize(count);
    return ids;
  }
  std::string decode(const std::vector<int32_t>& ids) const {
    return detail::read_text([&](char* buf, std::size_t cap, std::size_t* len) {
      return gpt2rt_tokenizer_decode(get(), ids.data(), ids.size(), buf, cap, len);
    });
  }
  std::size_t vocab_size() const {
    std::size_t size = 0;
    check(gpt2rt_tokenizer_vocab_size(get(), &size));
    return size;
  }
  int32_t eos_token() const {
    int32_t token = 0;
    check(gpt2rt_tokenizer_eos_token(get(), &token));
    return token;
  }

  gpt2rt_tokenizer* get() const noexcept { return handle_.get(); }
  explicit operator bool() const noexcept { return static_cast<bool>(handle_); }

 private:
  std::unique_ptr<gpt2rt_tokenizer, detail::TokenizerDeleter> handle_;
};

class Engine {
 public:
  static gpt2rt_engine_options default_options() {
    gpt2rt_engine_options options;
    check(gpt2rt_engine_options_default(&options));
    return options;
  }
  // `options.model_dir` must stay valid during the call only.
  static Engine load(const gpt2rt_engine_options& options) {
    gpt2rt_engine* raw = nullptr;
    check(gpt2rt_engine_load(&options, &raw));
    return Engine(raw);
  }
  explicit Engine(gpt2rt_engine* owned) noexcept : handle_(owned) {}

  gpt2rt_model_info model_info() const {
    gpt2rt_model_info info;
    check(gpt2rt_engine_model_info(get(), &info));
    return info;
  }
  // Model, backend, and why other backends were skipped.
  std::string info() const {
    return detail::read_text(
        [&](char* buf, std::size_t cap, std::size_t* len) { return gpt2rt_engine_info(get(), buf, cap, len); });
  }
  Tokenizer tokenizer() const {
    gpt2rt_tokenizer* raw = nullptr;
    check(gpt2rt_engine_tokenizer(get(), &raw));
    return Tokenizer(raw);
  }

  gpt2rt_engine* get() const noexcept { return handle_.get(); }
  explicit operator bool() const noexcept { return static_cast<bool>(handle_); }

 private:
  std::unique_ptr<gpt2rt_engine, detail::EngineDeleter> handle_;
};

// Called for every generated token with (sequence index, token id, text piece); return false to
// stop the generation.
using TokenCallback = std::function<bool(std::size_t seq, int32_t token, std::string_view piece)>;

// The library's sampling defaults (gpt2rt_sampling_options_default): greedy, i.e. temperature 0,
// top_k 0, top_p 1, seed 0. Start from these: an all-zero struct is invalid (top_p must be in (0, 1]).
inline gpt2rt_sampling_options default_sampling_options() {
  gpt2rt_sampling_options options;
  check(gpt2rt_sampling_options_default(&options));
  return options;
}

struct GenerateOptions {
  std::size_t max_new_tokens = 32;
  gpt2rt_sampling_options sampling = default_sampling_options();  // greedy
  std::vector<int32_t> stop_tokens;
  TokenCallback on_token;
};

struct GenerateResult {
  std::size_t n_tokens = 0;
  gpt2rt_finish_reason finish = GPT2RT_FINISH_REASON_LENGTH;
};

// Tokens of a ragged batch generation: one vector per sequence.
struct BatchResult {
  std::vector<std::vector<int32_t>> tokens;
  gpt2rt_finish_reason finish = GPT2RT_FINISH_REASON_LENGTH;
};

class Session {
 public:
  static gpt2rt_session_options default_options() {
    gpt2rt_session_options options;
    check(gpt2rt_session_options_default(&options));
    return options;
  }
  // The session keeps what it needs of the engine: `engine` may be destroyed first.
  Session(const Engine& engine, const gpt2rt_session_options& options) {
    gpt2rt_session* raw = nullptr;
    check(gpt2rt_session_create(engine.get(), &options, &raw));
    handle_.reset(raw);
  }
  explicit Session(const Engine& engine) : Session(engine, default_options()) {}

  // The granted profile: {max_batch, max_seq}.
  std::pair<std::size_t, std::size_t> profile() const {
    std::size_t max_batch = 0, max_seq = 0;
    check(gpt2rt_session_profile(get(), &max_batch, &max_seq));
    return {max_batch, max_seq};
  }

  // A ragged batch: `tokens` back to back, `lengths[i]` = prompt i's length.
  void prefill(const std::vector<int32_t>& tokens, const std::vector<uint32_t>& lengths) {
    check(gpt2rt_session_prefill(get(), tokens.data(), tokens.size(), lengths.data(), lengths.size()));
  }
  void prefill(const std::vector<int32_t>& prompt) {
    prefill(prompt, std::vector<uint32_t>{static_cast<uint32_t>(prompt.size())});
  }
  // One token per sequence of the current batch.
  void step(const std::vector<int32_t>& tokens) { check(gpt2rt_session_step(get(), tokens.data(), tokens.size())); }

  // Sequences in the current batch (0 before the first prefill), as the library reports it: what
  // step() expects and sample() returns. Set by prefill, generate (1) and generate_tokens.
  std::size_t batch() const {
    std::size_t n = 0;
    check(gpt2rt_session_batch(get(), &n));
    return n;
  }

  // The last prefill/step's logits, [batch][vocab] row-major, into `logits`, resized to exactly
  // batch * vocab. Sized by the library's required-size convention (BUFFER_TOO_SMALL reports the
  // floats needed), so a vector reused across steps is not reallocated once it is large enough.
  void read_logits(std::vector<float>& logits) const {
    std::size_t needed = 0;
    logits.resize(logits.capacity());
    gpt2rt_status status = gpt2rt_session_read_logits(get(), logits.data(), logits.size(), &needed);
    if (status == GPT2RT_STATUS_BUFFER_TOO_SMALL) {
      logits.resize(needed);
      status = gpt2rt_session_read_logits(get(), logits.data(), logits.size(), &needed);
    }
    check(status);
    logits.resize(needed);
  }
  std::vector<float> read_logits() const {
    std::vector<float> logits;
    read_logits(logits);
    return logits;
  }
  // Next token of each sequence; greedy when `sampling` is null. A one-id guess: for a larger
  // batch BUFFER_TOO_SMALL reports the batch size before anything is sampled, and the call is
  // repeated with room for it.
  std::vector<int32_t> sample(const gpt2rt_sampling_options* sampling = nullptr) const {
    std::vector<int32_t> next(1);
    std::size_t count = 0;
    gpt2rt_status status = gpt2rt_session_sample(get(), sampling, next.data(), next.size(), &count);
    if (status == GPT2RT_STATUS_BUFFER_TOO_SMALL && count > next.size()) {
      next.resize(count);
      status = gpt2rt_session_sample(get(), sampling, next.data(), next.size(), &count);
    }
    check(status);
    next.resize(count);
    return next;
  }
  std::vector<int32_t> sample(const gpt2rt_sampling_options& sampling) const { return sample(&sampling); }

  GenerateResult generate(std::string_view prompt, const GenerateOptions& options) {
    gpt2rt_generate_options raw = to_raw(options);
    CallbackState state{&options.on_token, nullptr};
    if (options.on_token) {
      raw.callback = &Session::trampoline;
      raw.user_data = &state;
    }
    GenerateResult result;
    gpt2rt_status status = gpt2rt_session_generate(get(), prompt.data(), prompt.size(), &raw, &result.n_tokens,
                                                   &result.finish);
    if (state.error) std::rethrow_exception(state.error);
    check(status);
    return result;
  }
  // The text of the last generate().
  std::string generated_text() const {
    return detail::read_text([&](char* buf, std::size_t cap, std::size_t* len) {
      return gpt2rt_session_generated_text(get(), buf, cap, len);
    });
  }

  BatchResult generate_tokens(const std::vector<int32_t>& tokens, const std::vector<uint32_t>& lengths,
                              const GenerateOptions& options) {
    gpt2rt_generate_options raw = to_raw(options);
    CallbackState state{&options.on_token, nullptr};
    if (options.on_token) {
      raw.callback = &Session::trampoline;
      raw.user_data = &state;
    }
    const std::size_t batch = lengths.size();
    std::vector<int32_t> out(batch * options.max_new_tokens);
    std::vector<std::size_t> counts(batch);
    BatchResult result;
    gpt2rt_status status = gpt2rt_session_generate_tokens(get(), tokens.data(), tokens.size(), lengths.data(), batch,
                                                          &raw, out.data(), out.size(), counts.data(), &result.finish);
    if (state.error) std::rethrow_exception(state.error);
    check(status);
    for (std::size_t i = 0; i < batch; ++i) {
      const auto first = out.begin() + static_cast<std::ptrdiff_t>(i * options.max_new_tokens);
      result.tokens.emplace_back(first, first + static_cast<std::ptrdiff_t>(counts[i]));
    }
    return result;
  }

  // Any thread, any time: the running generation ends within one step. A cancel while no
  // generation runs is kept and ends the next generate/generate_tokens before its first step
  // (CANCELLED, 0 tokens); a generation that passes its argument checks clears the request.
  void cancel() const { check(gpt2rt_session_cancel(get())); }

  gpt2rt_session* get() const noexcept { return handle_.get(); }
  explicit operator bool() const noexcept { return static_cast<bool>(handle_); }

 private:
  struct CallbackState {
    const TokenCallback* on_token;
    std::exception_ptr error;
  };

  static gpt2rt_generate_options to_raw(const GenerateOptions& options) {
    gpt2rt_generate_options raw;
    check(gpt2rt_generate_options_default(&raw));
    raw.max_new_tokens = options.max_new_tokens;
    raw.sampling = options.sampling;
    raw.stop_tokens = options.stop_tokens.empty() ? nullptr : options.stop_tokens.data();
    raw.n_stop_tokens = options.stop_tokens.size();
    return raw;
  }

  static int32_t trampoline(void* user_data, std::size_t seq, int32_t token, const char* piece,
                            std::size_t piece_len) noexcept {
    auto* state = static_cast<CallbackState*>(user_data);
    try {
      return (*state->on_token)(seq, token, std::string_view(piece, piece_len)) ? 0 : 1;
    } catch (...) {
      state->error = std::current_exception();
      return 1;
    }
  }

  std::unique_ptr<gpt2rt_session, detail::SessionDeleter> handle_;
};

}  // namespace gpt2rt

#endif  // GPT2RT_HPP
