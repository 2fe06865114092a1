/* gpt2rt.h compiles on its own (nothing included before it) and survives a second inclusion. */
#include "gpt2rt.h"
#include "gpt2rt.h"

int main(void) {
  gpt2rt_status status = GPT2RT_STATUS_OK;
  return (int)status;
}
