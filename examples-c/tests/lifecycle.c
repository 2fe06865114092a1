/*
 * The whole lifecycle, for AddressSanitizer + UBSan and valgrind memcheck (tools/test_c.sh runs it
 * plain, sanitized and under valgrind): load -> session -> generate -> destroy, several times and in
 * both destroy orders; every kind of failed creation (missing model directory, corrupt config.json,
 * truncated and mismatched safetensors, bad options struct_size, unsupported and out-of-memory
 * profiles); invalid tokens and prompts; tokenizers. Each failure must return its status with a
 * message; nothing may leak (the tools count definitely and indirectly lost bytes).
 *
 *   lifecycle_c [ROUNDS]     (default 3 load/generate/destroy rounds)
 *
 * The model directories are written here, into a mkdtemp directory that is removed at the end.
 * POSIX only (mkdtemp, unlink, rmdir).
 */
#define _POSIX_C_SOURCE 200809L

#include "gpt2rt.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int failures;

/* Checks a status and, for a failure, that it came with a message. */
#define EXPECT(call, want)                                                                                   \
  do {                                                                                                       \
    gpt2rt_status got_ = (call);                                                                             \
    if (got_ != (gpt2rt_status)(want)) {                                                                     \
      fprintf(stderr, "%s:%d: %s\n  returned %s, expected %s: %s\n", __FILE__, __LINE__, #call,                \
              gpt2rt_status_name(got_), gpt2rt_status_name(want), gpt2rt_last_error_message());             \
      failures++;                                                                                            \
    } else if ((want) != GPT2RT_STATUS_OK && gpt2rt_last_error_message()[0] == '\0') {                       \
      fprintf(stderr, "%s:%d: %s failed without a message\n", __FILE__, __LINE__, #call);                    \
      failures++;                                                                                            \
    }                                                                                                        \
  } while (0)

#define CHECK(cond)                                                               \
  do {                                                                            \
    if (!(cond)) {                                                                \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);    \
      failures++;                                                                 \
    }                                                                             \
  } while (0)

/* ---- model directories written from C ---- */

typedef struct {
  int n_layer;
  size_t n_embd, n_head, n_positions, vocab;
} shape;

static char root[64];

static void path_in(char *out, size_t size, const char *dir, const char *file) {
  snprintf(out, size, "%s/%s/%s", root, dir, file);
}

static void write_file(const char *dir, const char *file, const void *data, size_t len) {
  char path[256];
  FILE *f;
  snprintf(path, sizeof path, "%s/%s", root, dir);
  mkdir(path, 0700);
  path_in(path, sizeof path, dir, file);
  f = fopen(path, "wb");
  if (!f || fwrite(data, 1, len, f) != len) {
    fprintf(stderr, "cannot write %s\n", path);
    exit(2);
  }
  fclose(f);
}

static void write_config(const char *dir, shape s) {
  char text[512];
  int n = snprintf(text, sizeof text,
                   "{\"model_type\": \"gpt2\", \"activation_function\": \"gelu_new\", \"n_layer\": %d, "
                   "\"n_embd\": %zu, \"n_head\": %zu, \"n_positions\": %zu, \"vocab_size\": %zu}",
                   s.n_layer, s.n_embd, s.n_head, s.n_positions, s.vocab);
  write_file(dir, "config.json", text, (size_t)n);
}

/* Appends one tensor's header entry; rows = 0 means a vector of cols. */
static size_t add_tensor(char *header, size_t at, const char *name, size_t rows, size_t cols, size_t *offset) {
  size_t bytes = (rows ? rows : 1) * cols * 2;
  int n;
  if (rows) {
    n = sprintf(header + at, "%s\"%s\":{\"dtype\":\"F16\",\"shape\":[%zu,%zu],\"data_offsets\":[%zu,%zu]}",
                at > 1 ? "," : "", name, rows, cols, *offset, *offset + bytes);
  } else {
    n = sprintf(header + at, "%s\"%s\":{\"dtype\":\"F16\",\"shape\":[%zu],\"data_offsets\":[%zu,%zu]}",
                at > 1 ? "," : "", name, cols, *offset, *offset + bytes);
  }
  *offset += bytes;
  return at + (size_t)n;
}

/* model.safetensors for `s`, F16 zeros, the last `truncate` bytes cut off. */
static void write_weights(const char *dir, shape s, size_t truncate) {
  static char header[16384];
  char name[64];
  size_t at = 1, offset = 0, c = s.n_embd, len, total, i;
  unsigned char *file;
  int l;
  header[0] = '{';
  at = add_tensor(header, at, "wte.weight", s.vocab, c, &offset);
  at = add_tensor(header, at, "wpe.weight", s.n_positions, c, &offset);
  for (l = 0; l < s.n_layer; l++) {
    static const struct {
      const char *suffix;
      size_t rows, cols; /* in units of c; rows 0 = vector */
    } parts[] = {{"ln_1.weight", 0, 1},        {"ln_1.bias", 0, 1},      {"attn.c_attn.weight", 1, 3},
                 {"attn.c_attn.bias", 0, 3},   {"attn.c_proj.weight", 1, 1}, {"attn.c_proj.bias", 0, 1},
                 {"ln_2.weight", 0, 1},        {"ln_2.bias", 0, 1},      {"mlp.c_fc.weight", 1, 4},
                 {"mlp.c_fc.bias", 0, 4},      {"mlp.c_proj.weight", 4, 1}, {"mlp.c_proj.bias", 0, 1}};
    for (i = 0; i < sizeof parts / sizeof parts[0]; i++) {
      snprintf(name, sizeof name, "h.%d.%s", l, parts[i].suffix);
      at = add_tensor(header, at, name, parts[i].rows * c, parts[i].cols * c, &offset);
    }
  }
  at = add_tensor(header, at, "ln_f.weight", 0, c, &offset);
  at = add_tensor(header, at, "ln_f.bias", 0, c, &offset);
  header[at++] = '}';
  while (at % 8) header[at++] = ' ';
  total = 8 + at + offset;
  len = total - truncate;
  file = calloc(total, 1);
  if (!file) exit(2);
  for (i = 0; i < 8; i++) file[i] = (unsigned char)(((uint64_t)at >> (8 * i)) & 0xff);
  memcpy(file + 8, header, at);
  write_file(dir, "model.safetensors", file, len);
  free(file);
}

static void remove_dir(const char *dir) {
  const char *files[] = {"config.json", "model.safetensors"};
  char path[256];
  size_t i;
  for (i = 0; i < 2; i++) {
    path_in(path, sizeof path, dir, files[i]);
    unlink(path);
  }
  snprintf(path, sizeof path, "%s/%s", root, dir);
  rmdir(path);
}

/* ---- engine and session helpers ---- */

static gpt2rt_engine_options options_for(const char *dir, char *path, size_t size) {
  gpt2rt_engine_options o;
  gpt2rt_engine_options_default(&o);
  o.backend = GPT2RT_BACKEND_CPU;
  o.num_threads = 2;
  o.builtin_model = 2; /* tiny */
  if (dir) {
    snprintf(path, size, "%s/%s", root, dir);
    o.model_dir = path;
    o.model_dir_len = strlen(path);
  }
  return o;
}

static gpt2rt_status load(const char *dir, gpt2rt_engine **engine) {
  char path[256];
  gpt2rt_engine_options o = options_for(dir, path, sizeof path);
  return gpt2rt_engine_load(&o, engine);
}

static gpt2rt_session *new_session(const gpt2rt_engine *engine, size_t max_batch, size_t max_seq) {
  gpt2rt_session_options o;
  gpt2rt_session *s = NULL;
  gpt2rt_session_options_default(&o);
  o.max_batch = max_batch;
  o.max_seq = max_seq;
  EXPECT(gpt2rt_session_create(engine, &o, &s), GPT2RT_STATUS_OK);
  return s;
}

static int32_t count_tokens(void *user_data, size_t seq, int32_t token, const char *piece, size_t len) {
  (void)seq;
  (void)piece;
  (void)len;
  if (token >= 0) ++*(size_t *)user_data;
  return 0;
}

static void log_sink(void *user_data, int32_t level, const char *message, size_t len) {
  (void)level;
  (void)message;
  *(size_t *)user_data += len;
}

/* Text generation on a tiny-model session, with a streaming callback, and the text read back. */
static void generate_text(const gpt2rt_session *s, const char *prompt) {
  gpt2rt_generate_options o;
  size_t n = 0, streamed = 0, len = 0;
  gpt2rt_finish_reason finish;
  char *text;
  gpt2rt_generate_options_default(&o);
  o.max_new_tokens = 6;
  o.callback = count_tokens;
  o.user_data = &streamed;
  EXPECT(gpt2rt_session_generate(s, prompt, strlen(prompt), &o, &n, &finish), GPT2RT_STATUS_OK);
  CHECK(n == 6 && streamed == 6 && finish == GPT2RT_FINISH_REASON_LENGTH);
  EXPECT(gpt2rt_session_generated_text(s, NULL, 0, &len), len ? GPT2RT_STATUS_BUFFER_TOO_SMALL : GPT2RT_STATUS_OK);
  text = malloc(len + 1);
  if (!text) exit(2);
  EXPECT(gpt2rt_session_generated_text(s, text, len, &len), GPT2RT_STATUS_OK);
  free(text);
}

/* Bad calls on a live session; it must stay usable. */
static void bad_session_calls(const gpt2rt_session *s) {
  const int32_t negative[] = {464, -1}, too_big[] = {464, 50257};
  const uint32_t len2[] = {2};
  const char bad_utf8[] = {'H', (char)0xc3, (char)0x28};
  gpt2rt_generate_options o;
  size_t n;
  gpt2rt_finish_reason finish;
  EXPECT(gpt2rt_session_step(s, negative, 1), GPT2RT_STATUS_NOT_PREFILLED);
  EXPECT(gpt2rt_session_prefill(s, negative, 2, len2, 1), GPT2RT_STATUS_TOKEN_OUT_OF_RANGE);
  EXPECT(gpt2rt_session_prefill(s, too_big, 2, len2, 1), GPT2RT_STATUS_TOKEN_OUT_OF_RANGE);
  EXPECT(gpt2rt_session_generate(s, bad_utf8, sizeof bad_utf8, NULL, &n, &finish), GPT2RT_STATUS_INVALID_UTF8);
  EXPECT(gpt2rt_session_generate(s, "", 0, NULL, &n, &finish), GPT2RT_STATUS_INVALID_ARGUMENT);
  gpt2rt_generate_options_default(&o);
  o.struct_size = 1;
  EXPECT(gpt2rt_session_generate(s, "Hi", 2, &o, &n, &finish), GPT2RT_STATUS_STRUCT_SIZE);
  gpt2rt_generate_options_default(&o);
  o.max_new_tokens = SIZE_MAX;
  EXPECT(gpt2rt_session_generate(s, "Hi", 2, &o, &n, &finish), GPT2RT_STATUS_SEQUENCE_EXCEEDS_PROFILE);
}

static void tokenizer_round(gpt2rt_tokenizer *t) {
  const char *text = "Olé, naïve café! 日本語";
  int32_t ids[64];
  const int32_t bad[] = {15496, -7};
  char out[128];
  size_t count = 0, len = 0;
  EXPECT(gpt2rt_tokenizer_encode(t, text, strlen(text), ids, 64, &count), GPT2RT_STATUS_OK);
  EXPECT(gpt2rt_tokenizer_decode(t, ids, count, out, sizeof out, &len), GPT2RT_STATUS_OK);
  CHECK(len == strlen(text) && memcmp(out, text, len) == 0);
  EXPECT(gpt2rt_tokenizer_encode(t, text, strlen(text), ids, 1, &count), GPT2RT_STATUS_BUFFER_TOO_SMALL);
  EXPECT(gpt2rt_tokenizer_decode(t, bad, 2, out, sizeof out, &len), GPT2RT_STATUS_TOKEN_OUT_OF_RANGE);
  EXPECT(gpt2rt_tokenizer_encode(t, "\xff", 1, ids, 64, &count), GPT2RT_STATUS_INVALID_UTF8);
}

int main(int argc, char **argv) {
  const shape small = {1, 8, 2, 16, 16};
  const shape xl = {48, 1600, 25, 1024, 16};
  const shape long_context = {1, 2, 1, 1 << 20, 16};
  gpt2rt_engine *engine = NULL;
  gpt2rt_session *s = NULL, *s2 = NULL;
  gpt2rt_tokenizer *t = NULL;
  gpt2rt_session_options so;
  gpt2rt_engine_options eo;
  char path[256];
  size_t logged = 0;
  int round, rounds = argc > 1 ? atoi(argv[1]) : 3;

  strcpy(root, "/tmp/gpt2rt-lifecycle-XXXXXX");
  if (!mkdtemp(root)) {
    perror("mkdtemp");
    return 2;
  }

  /* load -> sessions -> generate -> destroy, both destroy orders, with a log callback in between */
  for (round = 0; round < rounds; round++) {
    EXPECT(gpt2rt_set_log_callback(round == 1 ? log_sink : NULL, &logged), GPT2RT_STATUS_OK);
    engine = NULL;
    eo = options_for(NULL, path, sizeof path);
    eo.dtype = round == 1 ? 2 : 0; /* f16 on the CPU: a warning through the log callback */
    EXPECT(gpt2rt_engine_load(&eo, &engine), GPT2RT_STATUS_OK);
    if (!engine) return 1;
    s = new_session(engine, 1, 64);
    s2 = new_session(engine, 2, 32);
    generate_text(s, "Hello, my name is");
    bad_session_calls(s2);
    generate_text(s2, "The lifecycle test");
    EXPECT(gpt2rt_engine_tokenizer(engine, &t), GPT2RT_STATUS_OK);
    tokenizer_round(t);
    if (round % 2) {
      gpt2rt_engine_destroy(engine); /* sessions and the tokenizer keep what they need alive */
      generate_text(s, "After the engine is gone");
      gpt2rt_session_destroy(s);
      gpt2rt_tokenizer_destroy(t);
      gpt2rt_session_destroy(s2);
    } else {
      gpt2rt_session_destroy(s2);
      gpt2rt_tokenizer_destroy(t);
      gpt2rt_session_destroy(s);
      gpt2rt_engine_destroy(engine);
    }
  }
  EXPECT(gpt2rt_set_log_callback(NULL, NULL), GPT2RT_STATUS_OK);
  CHECK(rounds < 2 || logged > 0);

  /* the built-in tokenizer, alone */
  for (round = 0; round < 2; round++) {
    t = NULL;
    EXPECT(gpt2rt_tokenizer_create_gpt2(&t), GPT2RT_STATUS_OK);
    tokenizer_round(t);
    gpt2rt_tokenizer_destroy(t);
  }

  /* failed creations: nothing may be returned, nothing may leak */
  engine = NULL;
  EXPECT(load("missing", &engine), GPT2RT_STATUS_FILE_NOT_FOUND);
  write_file("corrupt-config", "config.json", "{ \"n_layer\": 1,", 15);
  EXPECT(load("corrupt-config", &engine), GPT2RT_STATUS_INVALID_CONFIG);
  write_config("truncated", small);
  write_weights("truncated", small, 10);
  EXPECT(load("truncated", &engine), GPT2RT_STATUS_MODEL_FORMAT);
  write_config("huge-config", xl);
  write_weights("huge-config", small, 0);
  EXPECT(load("huge-config", &engine), GPT2RT_STATUS_MODEL_FORMAT);
  write_config("no-weights", small);
  EXPECT(load("no-weights", &engine), GPT2RT_STATUS_FILE_NOT_FOUND);
  eo = options_for(NULL, path, sizeof path);
  eo.struct_size = 4;
  EXPECT(gpt2rt_engine_load(&eo, &engine), GPT2RT_STATUS_STRUCT_SIZE);
  CHECK(engine == NULL);

  /* a model written here loads and generates from token ids */
  write_config("valid", small);
  write_weights("valid", small, 0);
  EXPECT(load("valid", &engine), GPT2RT_STATUS_OK);
  if (engine) {
    const int32_t prompt[] = {1, 2, 3};
    const uint32_t lengths[] = {3};
    int32_t out[4];
    size_t counts[1];
    gpt2rt_finish_reason finish;
    gpt2rt_generate_options go;
    gpt2rt_generate_options_default(&go);
    go.max_new_tokens = 4;
    s = new_session(engine, 1, 16);
    EXPECT(gpt2rt_session_generate_tokens(s, prompt, 3, lengths, 1, &go, out, 4, counts, &finish), GPT2RT_STATUS_OK);
    CHECK(counts[0] == 4 && out[0] >= 0 && out[0] < 16);
    /* bad profiles on this engine */
    gpt2rt_session_options_default(&so);
    so.struct_size = 0;
    s2 = NULL;
    EXPECT(gpt2rt_session_create(engine, &so, &s2), GPT2RT_STATUS_STRUCT_SIZE);
    gpt2rt_session_options_default(&so);
    so.max_batch = 100000;
    EXPECT(gpt2rt_session_create(engine, &so, &s2), GPT2RT_STATUS_PROFILE_UNSUPPORTED);
    so.max_batch = 1;
    so.max_seq = 17;
    EXPECT(gpt2rt_session_create(engine, &so, &s2), GPT2RT_STATUS_PROFILE_UNSUPPORTED);
    CHECK(s2 == NULL);
    gpt2rt_engine_destroy(engine);
    gpt2rt_session_destroy(s);
  }

  /* 2^20 positions: the default profile (max_seq = n_positions) needs terabytes for the attention
     scores, refused up front with OUT_OF_MEMORY; a small profile on the same engine works */
  write_config("long-context", long_context);
  write_weights("long-context", long_context, 0);
  engine = NULL;
  EXPECT(load("long-context", &engine), GPT2RT_STATUS_OK);
  if (engine) {
    s = NULL;
    EXPECT(gpt2rt_session_create(engine, NULL, &s), GPT2RT_STATUS_OUT_OF_MEMORY);
    CHECK(s == NULL);
    s = new_session(engine, 1, 8);
    gpt2rt_session_destroy(s);
    gpt2rt_engine_destroy(engine);
  }

  remove_dir("corrupt-config");
  remove_dir("truncated");
  remove_dir("huge-config");
  remove_dir("no-weights");
  remove_dir("valid");
  remove_dir("long-context");
  rmdir(root);
  if (failures) {
    fprintf(stderr, "lifecycle: %d failure(s)\n", failures);
    return 1;
  }
  printf("lifecycle: %d load/generate/destroy rounds, failed creations and tokenizers: all statuses as expected\n",
         rounds);
  return 0;
}
