// gpt2rt from C++17 through the RAII wrapper bindings/cpp/gpt2rt.hpp: owning move-only handles,
// exceptions with status + message, a lambda as streaming callback, cancel from a std::thread.
//
//   gpt2rt_example_cpp [--model tiny|distilgpt2|gpt2|DIR] [--threads N] [--max-new-tokens N]
//                      [--print-tokens] [PROMPT]
//
// The model defaults to $GPT2RT_MODEL, else the built-in synthetic distilgpt2. --print-tokens
// prints only the greedy token ids on stdout (as `gpt2rt generate --print-tokens`).
#include "gpt2rt.hpp"

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <iostream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

struct Args {
  std::string model = "distilgpt2";
  uint32_t threads = 0;
  std::size_t max_new_tokens = 16;
  bool print_tokens = false;
  std::string prompt = "Hello, my name is";
};

Args parse_args(int argc, char** argv) {
  Args args;
  if (const char* env = std::getenv("GPT2RT_MODEL"); env && *env) args.model = env;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const bool has_value = i + 1 < argc;
    if (arg == "--print-tokens") {
      args.print_tokens = true;
    } else if (arg == "--model" && has_value) {
      args.model = argv[++i];
    } else if (arg == "--threads" && has_value) {
      args.threads = static_cast<uint32_t>(std::stoul(argv[++i]));
    } else if (arg == "--max-new-tokens" && has_value) {
      args.max_new_tokens = std::stoul(argv[++i]);
    } else if (arg.rfind("--", 0) == 0) {
      throw std::invalid_argument("unknown option " + arg);
    } else {
      args.prompt = arg;
    }
  }
  if (args.max_new_tokens == 0) throw std::invalid_argument("--max-new-tokens must be at least 1");
  return args;
}

gpt2rt::Engine load_engine(const Args& args) {
  gpt2rt_engine_options options = gpt2rt::Engine::default_options();
  options.backend = GPT2RT_BACKEND_CPU;
  options.num_threads = args.threads;
  if (args.model == "distilgpt2") {
    options.builtin_model = 0;
  } else if (args.model == "gpt2") {
    options.builtin_model = 1;
  } else if (args.model == "tiny") {
    options.builtin_model = 2;
  } else {
    options.model_dir = args.model.data();
    options.model_dir_len = args.model.size();
  }
  return gpt2rt::Engine::load(options);
}

void require(bool condition, const std::string& what) {
  if (!condition) throw std::runtime_error(what);
}

int run(const Args& args) {
  gpt2rt::check_abi_version();
  std::cerr << "gpt2rt " << gpt2rt::version() << ", model " << args.model << "\n";

  gpt2rt::Engine engine = load_engine(args);
  const gpt2rt_model_info info = engine.model_info();
  std::cerr << engine.info() << "\n";
  const gpt2rt::Tokenizer tokenizer = engine.tokenizer();
  const std::vector<int32_t> prompt = tokenizer.encode(args.prompt);
  require(prompt.size() + args.max_new_tokens + 2 <= info.n_positions, "prompt + new tokens exceed the model");

  // A profile the engine cannot grant fails with a status and a message naming the limits.
  try {
    gpt2rt_session_options too_big = gpt2rt::Session::default_options();
    too_big.max_seq = info.max_seq + 1;
    gpt2rt::Session impossible(engine, too_big);
    throw std::runtime_error("a session longer than the engine's max_seq was granted");
  } catch (const gpt2rt::Error& e) {
    require(e.status() == GPT2RT_STATUS_PROFILE_UNSUPPORTED, std::string("unexpected ") + e.what());
    std::cerr << "expected failure: " << e.what() << "\n";
  }

  gpt2rt_session_options session_options = gpt2rt::Session::default_options();
  session_options.max_batch = 1;
  gpt2rt::Session session(engine, session_options);

  // Handles move; the moved-from one is empty and destroys nothing. The session keeps what it
  // needs of the engine, so the engine may go first.
  {
    gpt2rt::Engine moved = std::move(engine);
    require(!engine && moved, "a moved-from engine must be empty");
  }

  // 1. the manual loop: prefill, then read the logits, sample, step
  std::vector<int32_t> loop_tokens;
  std::vector<float> logits;  // reused: read_logits sizes it from the library's required size
  const gpt2rt_sampling_options greedy = gpt2rt::default_sampling_options();
  require(session.batch() == 0, "a new session has no batch");
  session.prefill(prompt);
  require(session.batch() == 1, "the batch after prefilling one prompt is 1");
  for (std::size_t i = 0; i < args.max_new_tokens; ++i) {
    session.read_logits(logits);
    require(logits.size() == info.vocab_size, "read_logits gives batch * vocab floats");
    const std::vector<int32_t> next = session.sample(greedy);
    const auto best = std::max_element(logits.begin(), logits.end()) - logits.begin();
    require(next.size() == 1 && next[0] == best, "greedy sample is not the argmax of the logits");
    loop_tokens.push_back(next[0]);
    if (i + 1 < args.max_new_tokens) session.step(next);
  }

  // 2. streaming generation with a lambda: the same tokens, pieces adding up to the text
  std::vector<int32_t> streamed;
  std::string pieces;
  gpt2rt::GenerateOptions options;
  options.max_new_tokens = args.max_new_tokens;
  options.on_token = [&](std::size_t, int32_t token, std::string_view piece) {
    if (token >= 0) streamed.push_back(token);
    pieces += piece;
    if (!args.print_tokens) std::cout << piece << std::flush;
    return true;
  };
  if (!args.print_tokens) std::cout << args.prompt;
  const gpt2rt::GenerateResult result = session.generate(args.prompt, options);
  if (!args.print_tokens) std::cout << "\n";
  require(result.finish == GPT2RT_FINISH_REASON_LENGTH && result.n_tokens == args.max_new_tokens,
          "generate stopped early");
  require(streamed == loop_tokens, "streamed tokens differ from the manual loop's");
  require(pieces == session.generated_text(), "streamed pieces differ from the generated text");

  // The batch verb gives them too.
  gpt2rt::GenerateOptions batch_options;
  batch_options.max_new_tokens = args.max_new_tokens;
  const gpt2rt::BatchResult batch =
      session.generate_tokens(prompt, {static_cast<uint32_t>(prompt.size())}, batch_options);
  require(batch.tokens.size() == 1 && batch.tokens[0] == loop_tokens, "generate_tokens differs from the manual loop");

  // An exception thrown by the callback stops generation and comes back out of generate().
  options.on_token = [](std::size_t, int32_t, std::string_view) -> bool { throw std::domain_error("from callback"); };
  try {
    session.generate(args.prompt, options);
    throw std::runtime_error("the callback's exception was lost");
  } catch (const std::domain_error&) {
  }

  // 3. cancel from another thread: the callback holds the first token until cancel returned
  std::mutex mutex;
  std::condition_variable changed;
  bool first_token = false, cancelled = false;
  std::thread canceller([&] {
    std::unique_lock<std::mutex> lock(mutex);
    changed.wait(lock, [&] { return first_token; });
    session.cancel();  // the session is busy in generate: cancel is the one call allowed
    cancelled = true;
    changed.notify_all();
  });
  options.max_new_tokens = info.n_positions - prompt.size() - 1;
  options.on_token = [&](std::size_t, int32_t, std::string_view) {
    std::unique_lock<std::mutex> lock(mutex);
    first_token = true;
    changed.notify_all();
    changed.wait(lock, [&] { return cancelled; });
    return true;
  };
  gpt2rt::GenerateResult cancelled_result;
  try {
    cancelled_result = session.generate(args.prompt, options);
  } catch (...) {
    canceller.join();
    throw;
  }
  canceller.join();
  require(cancelled_result.finish == GPT2RT_FINISH_REASON_CANCELLED && cancelled_result.n_tokens <= 2,
          "cancel did not end the generation within one step");
  std::cerr << "cancelled from another thread after " << cancelled_result.n_tokens << " token(s)\n";

  // 4. a cancel while no generation runs is kept: the next generation ends before its first step,
  // and clears it, so the one after runs normally.
  session.cancel();
  options.max_new_tokens = 4;
  options.on_token = nullptr;
  const gpt2rt::GenerateResult early = session.generate(args.prompt, options);
  require(early.finish == GPT2RT_FINISH_REASON_CANCELLED && early.n_tokens == 0,
          "a cancel before generate did not end it before its first step");
  const gpt2rt::GenerateResult after = session.generate(args.prompt, options);
  require(after.finish == GPT2RT_FINISH_REASON_LENGTH && after.n_tokens == 4,
          "the generation after an early cancel did not run normally");

  if (args.print_tokens) {
    for (std::size_t i = 0; i < loop_tokens.size(); ++i) std::cout << (i ? " " : "") << loop_tokens[i];
    std::cout << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const gpt2rt::Error& e) {
    std::cerr << "error: " << e.what() << " (status " << static_cast<unsigned>(e.status()) << ")\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
  }
  return 1;
}
