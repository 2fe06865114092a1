// The installed C++ wrapper: the tiny built-in model, 4 greedy tokens.
#include <gpt2rt.hpp>

#include <iostream>

int main() {
  try {
    gpt2rt::check_abi_version();
    gpt2rt_engine_options options = gpt2rt::Engine::default_options();
    options.builtin_model = 2;  // tiny
    options.backend = GPT2RT_BACKEND_CPU;
    gpt2rt::Session session(gpt2rt::Engine::load(options));
    gpt2rt::GenerateOptions generate;
    generate.max_new_tokens = 4;
    const gpt2rt::BatchResult result = session.generate_tokens({15496, 11, 616, 1438, 318}, {5}, generate);
    std::cout << "gpt2rt " << gpt2rt::version() << ":";
    for (int32_t token : result.tokens.at(0)) std::cout << " " << token;
    std::cout << "\n";
    return result.tokens.at(0).size() == 4 ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
