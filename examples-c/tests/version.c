/*
 * The version in its three places agrees: Cargo.toml (passed in by CMake as EXPECTED_VERSION_*),
 * the header's macros (checked at compile time) and the loaded library (checked at run time).
 */
#include "gpt2rt.h"

#include <stdio.h>
#include <string.h>

#define STR_(x) #x
#define STR(x) STR_(x)
#define MACRO_VERSION STR(GPT2RT_VERSION_MAJOR) "." STR(GPT2RT_VERSION_MINOR) "." STR(GPT2RT_VERSION_PATCH)

_Static_assert(GPT2RT_VERSION_MAJOR == EXPECTED_VERSION_MAJOR, "header major version differs from Cargo.toml");
_Static_assert(GPT2RT_VERSION_MINOR == EXPECTED_VERSION_MINOR, "header minor version differs from Cargo.toml");
_Static_assert(GPT2RT_VERSION_PATCH == EXPECTED_VERSION_PATCH, "header patch version differs from Cargo.toml");
_Static_assert(sizeof(GPT2RT_VERSION_STRING) == sizeof(MACRO_VERSION),
               "GPT2RT_VERSION_STRING disagrees with the MAJOR.MINOR.PATCH macros");
_Static_assert(GPT2RT_ABI_VERSION >= 1, "GPT2RT_ABI_VERSION starts at 1");
_Static_assert(sizeof(gpt2rt_status) == 4 && sizeof(gpt2rt_finish_reason) == 4, "status enums cross as uint32_t");

int main(void) {
  int failures = 0;
  if (gpt2rt_abi_version() != GPT2RT_ABI_VERSION) {
    fprintf(stderr, "gpt2rt_abi_version() = %u, header GPT2RT_ABI_VERSION = %u\n", (unsigned)gpt2rt_abi_version(),
            (unsigned)GPT2RT_ABI_VERSION);
    failures++;
  }
  if (strcmp(GPT2RT_VERSION_STRING, MACRO_VERSION) != 0) {
    fprintf(stderr, "GPT2RT_VERSION_STRING %s, macros %s\n", GPT2RT_VERSION_STRING, MACRO_VERSION);
    failures++;
  }
  if (strcmp(gpt2rt_version_string(), GPT2RT_VERSION_STRING) != 0) {
    fprintf(stderr, "gpt2rt_version_string() = %s, header %s\n", gpt2rt_version_string(), GPT2RT_VERSION_STRING);
    failures++;
  }
  if (strcmp(gpt2rt_status_name(GPT2RT_STATUS_SESSION_BUSY), "GPT2RT_STATUS_SESSION_BUSY") != 0 ||
      strcmp(gpt2rt_status_name(12345), "GPT2RT_STATUS_UNKNOWN") != 0) {
    fprintf(stderr, "gpt2rt_status_name gives unexpected names\n");
    failures++;
  }
  printf("gpt2rt %s, ABI %u: %s\n", gpt2rt_version_string(), (unsigned)gpt2rt_abi_version(),
         failures ? "MISMATCH" : "header, macros and library agree");
  return failures ? 1 : 0;
}
