// CUDA decode GEMV for 3- and 4-bit GPTQ weights, M = 1..8 rows (qgemv.h: the interface,
// qgemv_core.h: the decomposition and the arithmetic, shared with the host replay the tests run).
// Torch-free: raw pointers, sizes and a stream in; a status code out.
#include <cuda_runtime.h>

#include "qgemv.h"
#include "qgemv_core.h"

namespace fade {
namespace cuda {
namespace {

__device__ __forceinline__ void store_out(void* y, int64_t i, float v, int dt) {
  if (dt == FADE_QGEMV_F32) static_cast<float*>(y)[i] = v;
  else if (dt == FADE_QGEMV_F16) static_cast<__half*>(y)[i] = __float2half_rn(v);
  else static_cast<__nv_bfloat16*>(y)[i] = __float2bfloat16_rn(v);
}

// One block: 32 output columns x all K, kWarps warps splitting each staged chunk of K.
// x [M, K] and y [M, N] of dtype dt; MR >= M rows are computed, rows >= M being zeros.
template <int BITS, int MR>
__global__ void __launch_bounds__(kThreads) qgemv_kernel(const void* __restrict__ x, Problem p,
                                                          const float* __restrict__ bias, void* __restrict__ y,
                                                          int M, int dt) {
  // Staged activations [MR][chunk] fp32; reused for the [kWarps][MR][32] partial sums at the end.
  __shared__ float smem[MR * kMaxChunk];
  static_assert(kWarps * MR * kBlockCols <= MR * kMaxChunk, "the reduction buffer must fit in the staging buffer");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n = blockIdx.x * kBlockCols + lane;
  const bool column_ok = n < p.N;
  const int rpw = runs_per_warp(p.K);
  const int chunk = kWarps * rpw * bitpack::kRunCodes;  // inputs per staged chunk

  float acc[MR];
FADE_UNROLL
  for (int m = 0; m < MR; ++m) acc[m] = 0.f;

  for (int k0 = 0; k0 < p.K; k0 += chunk) {
    __syncthreads();  // every warp is done with the previous chunk
    for (int i = threadIdx.x; i < MR * chunk; i += kThreads) {
      const int m = i / chunk, k = k0 + i % chunk;
      smem[i] = (m < M && k < p.K) ? load_act(x, int64_t(m) * p.K + k, dt) : 0.f;
    }
    __syncthreads();
    if (column_ok) {
      const int run0 = k0 / bitpack::kRunCodes;
      lane_chunk<BITS, MR>(p, n, run0, run0 + warp * rpw, rpw, smem, chunk, acc);
    }
  }

  __syncthreads();  // smem becomes the reduction buffer
FADE_UNROLL
  for (int m = 0; m < MR; ++m) smem[(warp * MR + m) * kBlockCols + lane] = acc[m];
  __syncthreads();
  for (int i = threadIdx.x; i < MR * kBlockCols; i += kThreads) {
    const int m = i / kBlockCols, c = i % kBlockCols, col = blockIdx.x * kBlockCols + c;
    if (m < M && col < p.N) store_out(y, int64_t(m) * p.N + col, reduce_warps(smem + m * kBlockCols + c, MR * kBlockCols, bias, col), dt);
  }
}

template <int BITS>
void launch_rows(int M, int dt, dim3 grid, cudaStream_t stream, const void* x, const Problem& p, const float* bias,
                 void* y) {
  switch (row_tile(M)) {
    case 1: qgemv_kernel<BITS, 1><<<grid, kThreads, 0, stream>>>(x, p, bias, y, M, dt); break;
    case 2: qgemv_kernel<BITS, 2><<<grid, kThreads, 0, stream>>>(x, p, bias, y, M, dt); break;
    case 4: qgemv_kernel<BITS, 4><<<grid, kThreads, 0, stream>>>(x, p, bias, y, M, dt); break;
    default: qgemv_kernel<BITS, 8><<<grid, kThreads, 0, stream>>>(x, p, bias, y, M, dt); break;
  }
}

thread_local int g_last_cuda_error = 0;

}  // namespace
}  // namespace cuda
}  // namespace fade

extern "C" int fade_qgemv_launch(const void* x, int x_dtype, const int32_t* qweight, const int32_t* qzeros,
                                 const uint16_t* scales, const float* bias, void* y, int M, int K, int N,
                                 int group_size, int bits, void* stream) {
  using namespace fade::cuda;
  const int status = check_args(x, x_dtype, qweight, qzeros, scales, y, M, K, N, group_size, bits);
  if (status != FADE_QGEMV_OK) return status;
  // The words are reinterpreted as unsigned: bit 31 is an ordinary bit of the packed codes.
  const Problem p{reinterpret_cast<const uint32_t*>(qweight), reinterpret_cast<const uint32_t*>(qzeros), scales, K, N,
                  group_size};
  const dim3 grid((N + kBlockCols - 1) / kBlockCols);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (bits == 3) launch_rows<3>(M, x_dtype, grid, s, x, p, bias, y);
  else launch_rows<4>(M, x_dtype, grid, s, x, p, bias, y);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    g_last_cuda_error = int(err);
    return FADE_QGEMV_ERR_LAUNCH;
  }
  return FADE_QGEMV_OK;
}

extern "C" const char* fade_qgemv_error_string(int status) { return fade::cuda::status_message(status); }

extern "C" int fade_qgemv_last_cuda_error(void) { return fade::cuda::g_last_cuda_error; }
