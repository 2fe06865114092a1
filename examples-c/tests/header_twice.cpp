// gpt2rt.h and gpt2rt.hpp compile on their own as C++ and survive a second inclusion.
#include "gpt2rt.h"
#include "gpt2rt.h"
#include "gpt2rt.hpp"
#include "gpt2rt.hpp"

int main() {
  gpt2rt_status status = GPT2RT_STATUS_OK;
  return static_cast<int>(status);
}
