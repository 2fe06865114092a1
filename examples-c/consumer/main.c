/* The smallest host: the tiny built-in model, 4 greedy tokens, printed as ids. */
#include <gpt2rt.h>

#include <stdio.h>

int main(void) {
  gpt2rt_engine_options eo;
  gpt2rt_engine *engine = NULL;
  gpt2rt_session *session = NULL;
  gpt2rt_generate_options go;
  int32_t prompt[] = {15496, 11, 616, 1438, 318}; /* "Hello, my name is" */
  uint32_t length = 5;
  int32_t out[4];
  size_t count = 0, i;
  gpt2rt_finish_reason finish;
  int rc = 1;

  gpt2rt_engine_options_default(&eo);
  eo.builtin_model = 2; /* tiny */
  eo.backend = GPT2RT_BACKEND_CPU;
  gpt2rt_generate_options_default(&go);
  go.max_new_tokens = 4;
  if (gpt2rt_engine_load(&eo, &engine) == GPT2RT_STATUS_OK &&
      gpt2rt_session_create(engine, NULL, &session) == GPT2RT_STATUS_OK &&
      gpt2rt_session_generate_tokens(session, prompt, 5, &length, 1, &go, out, 4, &count, &finish) ==
          GPT2RT_STATUS_OK) {
    printf("gpt2rt %s:", gpt2rt_version_string());
    for (i = 0; i < count; i++) printf(" %d", (int)out[i]);
    printf("\n");
    rc = count == 4 ? 0 : 1;
  } else {
    fprintf(stderr, "error: %s\n", gpt2rt_last_error_message());
  }
  gpt2rt_session_destroy(session);
  gpt2rt_engine_destroy(engine);
  return rc;
}
