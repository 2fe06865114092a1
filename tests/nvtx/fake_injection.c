/* A stand-in for an NVTX tool's injection library (what Nsight Systems names in
 * NVTX_INJECTION64_PATH), for tests/nvtx.rs. It attaches the way the NVTX v3 injection protocol
 * says a tool attaches: InitializeInjectionNvtx2 receives the client's GetExportTable, asks it for
 * the callbacks table (export table id 1) and the version info (id 3), gets the CORE module's
 * function table (module 1) and writes its own RangePushA (callback id 9), RangePop (11) and
 * MarkA (2) into the client's slots. Every event is appended to the file FAKE_NVTX_LOG names:
 *   init version=<v> core_size=<n> core2_size=<n> ends_null=<0|1>
 *   push <depth> <name>      (depth before the push)
 *   pop <depth>              (depth after the pop)
 *   mark <name>
 * FAKE_NVTX_FAIL=1 makes the initialization return 0 (failure) after installing its functions,
 * which the client must then not call. Written for this project from the protocol's description;
 * no NVIDIA header is needed. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#if defined(_WIN32)
#define EXPORT __declspec(dllexport)
#define API __stdcall
#else
#define EXPORT __attribute__((visibility("default")))
#define API
#endif

typedef void (*fn_ptr)(void);
typedef const void *(API *get_export_table_fn)(uint32_t id);

struct callbacks_table {
  size_t struct_size;
  int(API *get_module_function_table)(int module, fn_ptr ***out_table, unsigned int *out_size);
};

struct version_info_table {
  size_t struct_size;
  uint32_t version;
  uint32_t reserved0;
  void(API *set_injection_nvtx_version)(uint32_t version);
};

static FILE *log_file;
static int depth;

static int API range_push_a(const char *message) {
  fprintf(log_file, "push %d %s\n", depth, message ? message : "(null)");
  fflush(log_file);
  return depth++;
}

static int API range_pop(void) {
  if (depth > 0) depth--;
  fprintf(log_file, "pop %d\n", depth);
  fflush(log_file);
  return depth;
}

static void API mark_a(const char *message) {
  fprintf(log_file, "mark %s\n", message ? message : "(null)");
  fflush(log_file);
}

EXPORT int API InitializeInjectionNvtx2(get_export_table_fn get_export_table) {
  const char *path = getenv("FAKE_NVTX_LOG");
  const struct callbacks_table *callbacks;
  const struct version_info_table *version;
  fn_ptr **core = NULL, **core2 = NULL;
  unsigned int core_size = 0, core2_size = 0;
  if (!path || !get_export_table) return 0;
  log_file = fopen(path, "a");
  if (!log_file) return 0;
  callbacks = (const struct callbacks_table *)get_export_table(1);
  version = (const struct version_info_table *)get_export_table(3);
  if (!callbacks || callbacks->struct_size < sizeof(*callbacks) || !version ||
      version->struct_size < sizeof(*version) || get_export_table(2) != NULL) {
    fprintf(log_file, "bad export tables\n");
    return 0;
  }
  version->set_injection_nvtx_version(3);
  if (!callbacks->get_module_function_table(1, &core, &core_size) || !core || core_size <= 11) {
    fprintf(log_file, "no CORE table\n");
    return 0;
  }
  callbacks->get_module_function_table(5, &core2, &core2_size);
  if (callbacks->get_module_function_table(99, &core2, NULL) != 0) {
    fprintf(log_file, "an unknown module was answered\n");
    return 0;
  }
  *core[9] = (fn_ptr)range_push_a;
  *core[11] = (fn_ptr)range_pop;
  *core[2] = (fn_ptr)mark_a;
  fprintf(log_file, "init version=%u core_size=%u core2_size=%u ends_null=%d\n", version->version, core_size,
          core2_size, core[0] == NULL && core[core_size] == NULL);
  fflush(log_file);
  if (getenv("FAKE_NVTX_FAIL")) return 0;
  return 1;
}
