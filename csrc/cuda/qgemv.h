// fade CUDA decode GEMV: public C interface (torch-free and CUDA-header-free, so that the
// pybind11 binding and host-side tests include it with a plain C++ compiler).
//
//   y[M, N] = x[M, K] @ dequant(W)^T + bias,   M = 1..8 (decode), 3- or 4-bit GPTQ weights
//
// Tensors (row-major, contiguous, all on the current CUDA device; K inputs, N outputs,
// G = K / group_size static groups, i.e. g_idx = arange(K) / group_size):
//   x       [M, K]                         float16, bfloat16 or float32 (x_dtype)
//   qweight int32 [K * bits / 32, N]       codes packed along K, GPTQ layout (bitpack.h)
//   qzeros  int32 [G, ceil(N / 32) * bits] true zero points ("v2") packed along N
//   scales  float16 [G, N]                 raw IEEE half bits
//   bias    float32 [N] or NULL
//   y       [M, N]                         same dtype as x
// Arithmetic: fp32 accumulation of x * (q - z) per group, times the group's scale.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Activation / output dtypes.
enum fade_qgemv_dtype {
  FADE_QGEMV_F16 = 0,
  FADE_QGEMV_BF16 = 1,
  FADE_QGEMV_F32 = 2,
};

// Status codes returned by fade_qgemv_launch (0 = success).
enum fade_qgemv_status {
  FADE_QGEMV_OK = 0,
  FADE_QGEMV_ERR_BITS = 1,        // bits is not 3 or 4
  FADE_QGEMV_ERR_ROWS = 2,        // M is not in 1..FADE_QGEMV_MAX_M
  FADE_QGEMV_ERR_K = 3,           // K is not a positive multiple of 32
  FADE_QGEMV_ERR_N = 4,           // N is not positive
  FADE_QGEMV_ERR_GROUP = 5,       // group_size is not a positive multiple of 32 dividing K
  FADE_QGEMV_ERR_DTYPE = 6,       // x_dtype is not a fade_qgemv_dtype
  FADE_QGEMV_ERR_NULL = 7,        // a required pointer is NULL
  FADE_QGEMV_ERR_LAUNCH = 8,      // the CUDA launch failed (see fade_qgemv_last_cuda_error)
};

#define FADE_QGEMV_MAX_M 8

// Launch y = x @ dequant(W)^T + bias on `stream` (a cudaStream_t, NULL = the legacy default
// stream). Asynchronous; checks the arguments first and launches nothing when they are bad.
int fade_qgemv_launch(const void* x, int x_dtype, const int32_t* qweight, const int32_t* qzeros,
                      const uint16_t* scales, const float* bias, void* y, int M, int K, int N,
                      int group_size, int bits, void* stream);

// A static, human-readable message for a status code (never NULL).
const char* fade_qgemv_error_string(int status);

// The cudaError_t (as int) of the last FADE_QGEMV_ERR_LAUNCH on this host thread, 0 if none.
int fade_qgemv_last_cuda_error(void);

#ifdef __cplusplus
}
#endif
