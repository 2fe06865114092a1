/*
 * gpt2rt from C99: streaming generation, cancellation from another thread, reading the last
 * logits, and the manual prefill / sample / step loop.
 *
 *   gpt2rt_example_c [--model tiny|distilgpt2|gpt2|DIR] [--backend auto|cpu|cuda|tensorrt]
 *                    [--threads N] [--max-new-tokens N] [--print-tokens] [PROMPT]
 *
 * The model defaults to $GPT2RT_MODEL, else the built-in synthetic distilgpt2 (tests use "tiny").
 * --print-tokens prints only the greedy token ids on stdout (as `gpt2rt generate --print-tokens`);
 * otherwise stdout gets the prompt and the streamed text. Progress goes to stderr.
 * Exits non-zero on any failure, including a disagreement between the three ways of decoding.
 */
#ifndef _WIN32
#define _POSIX_C_SOURCE 200809L
#endif

#include "gpt2rt.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _WIN32
#include <windows.h>
#include <shellapi.h>
#else
#include <pthread.h>
#endif

#define MAX_TOKENS 1024

/* ---- a latch: one thread waits until another opens it (Win32 or POSIX) ---- */
typedef struct {
#ifdef _WIN32
  CRITICAL_SECTION lock;
  CONDITION_VARIABLE changed;
#else
  pthread_mutex_t lock;
  pthread_cond_t changed;
#endif
  int open;
} latch;

static void latch_init(latch *l) {
  l->open = 0;
#ifdef _WIN32
  InitializeCriticalSection(&l->lock);
  InitializeConditionVariable(&l->changed);
#else
  pthread_mutex_init(&l->lock, NULL);
  pthread_cond_init(&l->changed, NULL);
#endif
}

static void latch_destroy(latch *l) {
#ifdef _WIN32
  DeleteCriticalSection(&l->lock);
#else
  pthread_mutex_destroy(&l->lock);
  pthread_cond_destroy(&l->changed);
#endif
}

static void latch_open(latch *l) {
#ifdef _WIN32
  EnterCriticalSection(&l->lock);
  l->open = 1;
  WakeAllConditionVariable(&l->changed);
  LeaveCriticalSection(&l->lock);
#else
  pthread_mutex_lock(&l->lock);
  l->open = 1;
  pthread_cond_broadcast(&l->changed);
  pthread_mutex_unlock(&l->lock);
#endif
}

static void latch_wait(latch *l) {
#ifdef _WIN32
  EnterCriticalSection(&l->lock);
  while (!l->open) SleepConditionVariableCS(&l->changed, &l->lock, INFINITE);
  LeaveCriticalSection(&l->lock);
#else
  pthread_mutex_lock(&l->lock);
  while (!l->open) pthread_cond_wait(&l->changed, &l->lock);
  pthread_mutex_unlock(&l->lock);
#endif
}

/* ---- errors ---- */
static int fail(const char *what, gpt2rt_status status) {
  fprintf(stderr, "error: %s: %s: %s\n", what, gpt2rt_status_name(status), gpt2rt_last_error_message());
  return 1;
}
#define CHECK(call)                                  \
  do {                                               \
    gpt2rt_status check_status_ = (call);            \
    if (check_status_ != GPT2RT_STATUS_OK) {         \
      rc = fail(#call, check_status_);               \
      goto done;                                     \
    }                                                \
  } while (0)
#define EXPECT(cond, ...)                            \
  do {                                               \
    if (!(cond)) {                                   \
      fprintf(stderr, "error: " __VA_ARGS__);        \
      fputc('\n', stderr);                           \
      rc = 1;                                        \
      goto done;                                     \
    }                                                \
  } while (0)

/* ---- command line ---- */
typedef struct {
  const char *model;
  gpt2rt_backend backend;
  uint32_t threads;
  size_t max_new_tokens;
  int print_tokens;
  const char *prompt;
} args;

static int parse_args(int argc, char **argv, args *a) {
  int i;
  const char *env_model = getenv("GPT2RT_MODEL");
  a->model = env_model && *env_model ? env_model : "distilgpt2";
  a->backend = GPT2RT_BACKEND_CPU;
  a->threads = 0;
  a->max_new_tokens = 16;
  a->print_tokens = 0;
  a->prompt = "Hello, my name is";
  for (i = 1; i < argc; i++) {
    const char *arg = argv[i];
    const char *value = i + 1 < argc ? argv[i + 1] : NULL;
    if (strcmp(arg, "--print-tokens") == 0) {
      a->print_tokens = 1;
    } else if (strcmp(arg, "--model") == 0 && value) {
      a->model = value;
      i++;
    } else if (strcmp(arg, "--threads") == 0 && value) {
      a->threads = (uint32_t)strtoul(value, NULL, 10);
      i++;
    } else if (strcmp(arg, "--max-new-tokens") == 0 && value) {
      a->max_new_tokens = (size_t)strtoul(value, NULL, 10);
      i++;
    } else if (strcmp(arg, "--backend") == 0 && value) {
      if (strcmp(value, "auto") == 0) a->backend = GPT2RT_BACKEND_AUTO;
      else if (strcmp(value, "cpu") == 0) a->backend = GPT2RT_BACKEND_CPU;
      else if (strcmp(value, "cuda") == 0) a->backend = GPT2RT_BACKEND_CUDA;
      else if (strcmp(value, "tensorrt") == 0) a->backend = GPT2RT_BACKEND_TENSORRT;
      else return 0;
      i++;
    } else if (arg[0] == '-' && arg[1] == '-') {
      return 0;
    } else {
      a->prompt = arg;
    }
  }
  return a->max_new_tokens > 0 && a->max_new_tokens <= MAX_TOKENS;
}

#ifdef _WIN32
/* main's argv is in the ANSI code page but gpt2rt takes UTF-8: re-read the command line as UTF-16
 * and convert it. (Kept for the life of the process.) */
static char **utf8_argv(int *argc) {
  LPWSTR *wide = CommandLineToArgvW(GetCommandLineW(), argc);
  char **out;
  int i, n;
  if (!wide) return NULL;
  out = (char **)calloc((size_t)*argc + 1, sizeof *out);
  for (i = 0; out && i < *argc; i++) {
    n = WideCharToMultiByte(CP_UTF8, 0, wide[i], -1, NULL, 0, NULL, NULL);
    out[i] = (char *)malloc((size_t)n);
    if (!out[i] || !WideCharToMultiByte(CP_UTF8, 0, wide[i], -1, out[i], n, NULL, NULL)) out = NULL;
  }
  LocalFree(wide);
  return out;
}
#endif

/* Fills engine options for a built-in model name or a model directory. */
static void select_model(gpt2rt_engine_options *eo, const char *model) {
  if (strcmp(model, "distilgpt2") == 0) {
    eo->builtin_model = 0;
  } else if (strcmp(model, "gpt2") == 0) {
    eo->builtin_model = 1;
  } else if (strcmp(model, "tiny") == 0) {
    eo->builtin_model = 2;
  } else {
    eo->model_dir = model;
    eo->model_dir_len = strlen(model);
  }
}

/* ---- streaming: record the tokens, echo the text ---- */
typedef struct {
  int32_t tokens[MAX_TOKENS];
  size_t n_tokens;
  char *text; /* concatenated pieces */
  size_t text_len;
  FILE *echo; /* where pieces are printed, or NULL */
} stream_state;

static int32_t on_token(void *user_data, size_t seq, int32_t token, const char *piece, size_t piece_len) {
  stream_state *s = (stream_state *)user_data;
  char *grown;
  (void)seq;
  if (token >= 0 && s->n_tokens < MAX_TOKENS) s->tokens[s->n_tokens++] = token;
  if (piece_len > 0) {
    grown = (char *)realloc(s->text, s->text_len + piece_len);
    if (!grown) return 1;
    s->text = grown;
    memcpy(s->text + s->text_len, piece, piece_len);
    s->text_len += piece_len;
    if (s->echo) {
      fwrite(piece, 1, piece_len, s->echo);
      fflush(s->echo);
    }
  }
  return 0;
}

/* ---- cancellation: the callback waits on the first token until another thread has cancelled ---- */
typedef struct {
  const gpt2rt_session *session;
  latch first_token; /* opened by the callback */
  latch cancelled;   /* opened by the canceller once gpt2rt_session_cancel returned */
  gpt2rt_status cancel_status;
  size_t calls;
} cancel_state;

static int32_t on_token_then_wait(void *user_data, size_t seq, int32_t token, const char *piece, size_t piece_len) {
  cancel_state *c = (cancel_state *)user_data;
  (void)seq;
  (void)token;
  (void)piece;
  (void)piece_len;
  if (c->calls++ == 0) {
    latch_open(&c->first_token);
    latch_wait(&c->cancelled);
  }
  return 0;
}

#ifdef _WIN32
static DWORD WINAPI canceller(LPVOID arg) {
#else
static void *canceller(void *arg) {
#endif
  cancel_state *c = (cancel_state *)arg;
  latch_wait(&c->first_token);
  c->cancel_status = gpt2rt_session_cancel(c->session); /* the session is busy in generate: allowed */
  latch_open(&c->cancelled);
#ifdef _WIN32
  return 0;
#else
  return NULL;
#endif
}

static size_t argmax(const float *v, size_t n) {
  size_t best = 0, i;
  for (i = 1; i < n; i++)
    if (v[i] > v[best]) best = i;
  return best;
}

int main(int argc, char **argv) {
  int rc = 0;
  args a;
  gpt2rt_engine_options eo;
  gpt2rt_session_options so;
  gpt2rt_generate_options go;
  gpt2rt_sampling_options sampling;
  gpt2rt_model_info info;
  gpt2rt_engine *engine = NULL;
  gpt2rt_session *session = NULL;
  gpt2rt_tokenizer *tokenizer = NULL;
  gpt2rt_finish_reason finish;
  gpt2rt_status status;
  int32_t *prompt = NULL;
  float *logits = NULL;
  char *text = NULL;
  int32_t loop_tokens[MAX_TOKENS];
  stream_state *stream = NULL;
  cancel_state cancel;
  int cancel_started = 0;
  size_t n_prompt = 0, n_logits = 0, n_tokens = 0, text_len = 0, batch = 0, i;
  uint32_t prompt_len;
#ifdef _WIN32
  HANDLE thread = NULL;
#else
  pthread_t thread;
#endif

#ifdef _WIN32
  argv = utf8_argv(&argc);
  if (!argv) {
    fprintf(stderr, "error: cannot read the command line as UTF-8\n");
    return 2;
  }
#endif
  if (!parse_args(argc, argv, &a)) {
    fprintf(stderr,
            "usage: %s [--model tiny|distilgpt2|gpt2|DIR] [--backend auto|cpu|cuda|tensorrt] [--threads N]\n"
            "          [--max-new-tokens N (1..%d)] [--print-tokens] [PROMPT]\n",
            argv[0], MAX_TOKENS);
    return 2;
  }
  if (gpt2rt_abi_version() != GPT2RT_ABI_VERSION) {
    fprintf(stderr, "error: library ABI %u, header ABI %u\n", (unsigned)gpt2rt_abi_version(), GPT2RT_ABI_VERSION);
    return 1;
  }
  fprintf(stderr, "gpt2rt %s, model %s\n", gpt2rt_version_string(), a.model);

  /* engine, its description and its tokenizer */
  CHECK(gpt2rt_engine_options_default(&eo));
  select_model(&eo, a.model);
  eo.backend = (uint32_t)a.backend;
  eo.num_threads = a.threads;
  CHECK(gpt2rt_engine_load(&eo, &engine));
  CHECK(gpt2rt_engine_model_info(engine, &info));
  status = gpt2rt_engine_info(engine, NULL, 0, &text_len); /* (NULL, 0) asks for the size */
  EXPECT(status == GPT2RT_STATUS_OK || status == GPT2RT_STATUS_BUFFER_TOO_SMALL, "engine_info size query: %s",
         gpt2rt_status_name(status));
  text = (char *)malloc(text_len + 1);
  EXPECT(text != NULL, "out of memory");
  CHECK(gpt2rt_engine_info(engine, text, text_len, &text_len));
  fprintf(stderr, "%.*s\n", (int)text_len, text);
  CHECK(gpt2rt_engine_tokenizer(engine, &tokenizer));
  status = gpt2rt_tokenizer_encode(tokenizer, a.prompt, strlen(a.prompt), NULL, 0, &n_prompt);
  EXPECT(status == GPT2RT_STATUS_OK || status == GPT2RT_STATUS_BUFFER_TOO_SMALL, "encode size query: %s",
         gpt2rt_status_name(status));
  EXPECT(n_prompt > 0, "the prompt encodes to no tokens");
  prompt = (int32_t *)malloc(n_prompt * sizeof *prompt);
  EXPECT(prompt != NULL, "out of memory");
  CHECK(gpt2rt_tokenizer_encode(tokenizer, a.prompt, strlen(a.prompt), prompt, n_prompt, &n_prompt));
  prompt_len = (uint32_t)n_prompt;

  /* a session whose profile fits the prompt and every token of the cancellation run */
  CHECK(gpt2rt_session_options_default(&so));
  so.max_batch = 1;
  so.max_seq = 0; /* the model's n_positions */
  CHECK(gpt2rt_session_create(engine, &so, &session));
  EXPECT(n_prompt + a.max_new_tokens + 2 <= info.n_positions, "prompt + new tokens exceed %u positions",
         (unsigned)info.n_positions);

  /* an error on purpose: step before prefill; the status says what and the message why */
  status = gpt2rt_session_step(session, prompt, 1);
  EXPECT(status == GPT2RT_STATUS_NOT_PREFILLED, "step before prefill gave %s", gpt2rt_status_name(status));
  EXPECT(strlen(gpt2rt_last_error_message()) > 0, "no message for %s", gpt2rt_status_name(status));
  fprintf(stderr, "expected failure: %s: %s\n", gpt2rt_status_name(status), gpt2rt_last_error_message());

  /* 1. the manual loop: prefill, then read the logits, sample, step */
  CHECK(gpt2rt_session_batch(session, &batch));
  EXPECT(batch == 0, "a new session has a batch of %u", (unsigned)batch);
  CHECK(gpt2rt_session_prefill(session, prompt, n_prompt, &prompt_len, 1));
  CHECK(gpt2rt_session_batch(session, &batch));
  EXPECT(batch == 1, "the batch after prefilling one prompt is %u", (unsigned)batch);
  /* (NULL, 0) asks read_logits for the floats it needs: batch * vocab */
  status = gpt2rt_session_read_logits(session, NULL, 0, &n_logits);
  EXPECT(status == GPT2RT_STATUS_BUFFER_TOO_SMALL && n_logits == batch * info.vocab_size,
         "read_logits size query: %s, %u floats", gpt2rt_status_name(status), (unsigned)n_logits);
  logits = (float *)malloc(n_logits * sizeof *logits);
  EXPECT(logits != NULL, "out of memory");
  /* sampling options start from the library's defaults (greedy); an all-zero struct is invalid */
  CHECK(gpt2rt_sampling_options_default(&sampling));
  for (i = 0; i < a.max_new_tokens; i++) {
    size_t written = 0, count = 0;
    int32_t next;
    CHECK(gpt2rt_session_read_logits(session, logits, n_logits, &written));
    EXPECT(written == info.vocab_size, "read_logits wrote %u floats, expected %u", (unsigned)written,
           (unsigned)info.vocab_size);
    CHECK(gpt2rt_session_sample(session, &sampling, &next, 1, &count));
    EXPECT(count == 1 && (size_t)next == argmax(logits, written), "greedy sample %d is not the argmax %u of the logits",
           (int)next, (unsigned)argmax(logits, written));
    loop_tokens[i] = next;
    if (i + 1 < a.max_new_tokens) CHECK(gpt2rt_session_step(session, &next, 1));
  }

  /* 2. streaming generation: the same tokens, and pieces that add up to the session's text */
  stream = (stream_state *)calloc(1, sizeof *stream);
  EXPECT(stream != NULL, "out of memory");
  stream->echo = a.print_tokens ? NULL : stdout;
  if (stream->echo) fputs(a.prompt, stdout);
  CHECK(gpt2rt_generate_options_default(&go));
  go.max_new_tokens = a.max_new_tokens;
  go.sampling = sampling; /* the defaults already are greedy; shown for where sampling goes */
  go.callback = on_token;
  go.user_data = stream;
  CHECK(gpt2rt_session_generate(session, a.prompt, strlen(a.prompt), &go, &n_tokens, &finish));
  if (stream->echo) fputc('\n', stdout);
  EXPECT(finish == GPT2RT_FINISH_REASON_LENGTH && n_tokens == a.max_new_tokens,
         "generate: %u tokens, finish reason %u", (unsigned)n_tokens, (unsigned)finish);
  EXPECT(stream->n_tokens == a.max_new_tokens, "the callback saw %u tokens", (unsigned)stream->n_tokens);
  for (i = 0; i < a.max_new_tokens; i++)
    EXPECT(stream->tokens[i] == loop_tokens[i], "token %u: streamed %d, manual loop %d", (unsigned)i,
           (int)stream->tokens[i], (int)loop_tokens[i]);
  free(text);
  text = NULL;
  status = gpt2rt_session_generated_text(session, NULL, 0, &text_len);
  EXPECT(status == GPT2RT_STATUS_OK || status == GPT2RT_STATUS_BUFFER_TOO_SMALL, "generated_text size query: %s",
         gpt2rt_status_name(status));
  text = (char *)malloc(text_len + 1);
  EXPECT(text != NULL, "out of memory");
  CHECK(gpt2rt_session_generated_text(session, text, text_len, &text_len));
  EXPECT(text_len == stream->text_len && (text_len == 0 || memcmp(text, stream->text, text_len) == 0),
         "the streamed pieces (%u bytes) differ from the generated text (%u bytes)", (unsigned)stream->text_len,
         (unsigned)text_len);

  /* 3. cancellation from another thread while generate runs */
  memset(&cancel, 0, sizeof cancel);
  cancel.session = session;
  cancel.cancel_status = GPT2RT_STATUS_INTERNAL;
  latch_init(&cancel.first_token);
  latch_init(&cancel.cancelled);
  cancel_started = 1;
#ifdef _WIN32
  thread = CreateThread(NULL, 0, canceller, &cancel, 0, NULL);
  EXPECT(thread != NULL, "CreateThread failed");
#else
  EXPECT(pthread_create(&thread, NULL, canceller, &cancel) == 0, "pthread_create failed");
#endif
  go.max_new_tokens = info.n_positions - n_prompt - 1;
  go.callback = on_token_then_wait;
  go.user_data = &cancel;
  status = gpt2rt_session_generate(session, a.prompt, strlen(a.prompt), &go, &n_tokens, &finish);
#ifdef _WIN32
  WaitForSingleObject(thread, INFINITE);
  CloseHandle(thread);
#else
  pthread_join(thread, NULL);
#endif
  CHECK(status);
  CHECK(cancel.cancel_status);
  EXPECT(finish == GPT2RT_FINISH_REASON_CANCELLED && n_tokens <= 2,
         "after cancel: finish reason %u, %u tokens (expected CANCELLED within one step)", (unsigned)finish,
         (unsigned)n_tokens);
  fprintf(stderr, "cancelled from another thread after %u token(s) of %u\n", (unsigned)n_tokens,
          (unsigned)go.max_new_tokens);

  /* 4. a cancel while no generation runs is kept: the next generation ends before its first step
   * (and clears it), so the one after runs normally. */
  CHECK(gpt2rt_session_cancel(session));
  go.max_new_tokens = 4;
  go.callback = NULL;
  go.user_data = NULL;
  CHECK(gpt2rt_session_generate(session, a.prompt, strlen(a.prompt), &go, &n_tokens, &finish));
  EXPECT(finish == GPT2RT_FINISH_REASON_CANCELLED && n_tokens == 0,
         "after an early cancel: finish reason %u, %u tokens (expected CANCELLED, 0)", (unsigned)finish,
         (unsigned)n_tokens);
  CHECK(gpt2rt_session_generate(session, a.prompt, strlen(a.prompt), &go, &n_tokens, &finish));
  EXPECT(finish == GPT2RT_FINISH_REASON_LENGTH && n_tokens == 4,
         "the generation after an early cancel: finish reason %u, %u tokens", (unsigned)finish, (unsigned)n_tokens);

  if (a.print_tokens) {
    for (i = 0; i < a.max_new_tokens; i++) printf(i ? " %d" : "%d", (int)loop_tokens[i]);
    printf("\n");
  }

done:
  if (cancel_started) {
    latch_destroy(&cancel.first_token);
    latch_destroy(&cancel.cancelled);
  }
  if (stream) free(stream->text);
  free(stream);
  free(text);
  free(logits);
  free(prompt);
  gpt2rt_tokenizer_destroy(tokenizer);
  gpt2rt_session_destroy(session);
  gpt2rt_engine_destroy(engine); /* any order: the session kept what it needed */
  return rc;
}
