/*
 * bcryptprimitives.dll for Wine 8, which lacks it: Rust's std fills random bytes with
 * ProcessPrng, here forwarded to advapi32's RtlGenRandom (SystemFunction036). Test use only:
 * tools/test_windows.sh places it beside the exe; real Windows (10+) has its own.
 */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T length) {
  while (length > 0) {
    ULONG chunk = length > 0x10000000 ? 0x10000000 : (ULONG)length;
    if (!SystemFunction036(data, chunk)) return FALSE;
    data += chunk;
    length -= chunk;
  }
  return TRUE;
}
