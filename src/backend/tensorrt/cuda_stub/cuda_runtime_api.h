/* The two CUDA runtime types the TensorRT 10 headers use in signatures, for building gpt2rt's
 * TensorRT shim without the CUDA toolkit. They are the same opaque handle types as CUDA's own
 * (driver_types.h: `typedef struct CUstream_st *cudaStream_t;`), so the ABI is identical and a
 * driver-API CUstream can be passed where TensorRT wants a cudaStream_t. build.rs uses the real
 * header instead when CUDA_INCLUDE_DIR (or CUDA_PATH / CUDA_HOME) provides one. */
#ifndef GPT2RT_CUDA_RUNTIME_API_STUB_H
#define GPT2RT_CUDA_RUNTIME_API_STUB_H
typedef struct CUstream_st *cudaStream_t;
typedef struct CUevent_st *cudaEvent_t;
#endif
