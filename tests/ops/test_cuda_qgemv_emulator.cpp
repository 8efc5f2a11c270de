// Host replay of the CUDA decode GEMV (csrc/cuda/qgemv.cu) for tests without a GPU.
//
// Built by tests/ops/test_cuda_qgemv.py with the host C++ compiler as a small shared library and
// called through ctypes. It runs the kernel's own arithmetic (qgemv_core.h: lane_chunk,
// accumulate_run, reduce_warps, the bitpack.h unpacking) in the kernel's block / chunk / warp /
// lane order, and the launcher's argument check; only the CUDA plumbing (shared-memory staging,
// barriers, stores) is re-written here, as plain loops mirroring qgemv_kernel line for line.
// It also exposes the bitpack.h scalar unpack helpers so the tests hit them directly.
#include <stdint.h>

#include <vector>

#include "fade/bitpack.h"
#include "qgemv.h"
#include "qgemv_core.h"

namespace {

using namespace fade::cuda;

template <int BITS, int MR>
void replay(const void* x, const Problem& p, const float* bias, float* y, int M, int dt) {
  const int rpw = runs_per_warp(p.K);
  const int chunk = kWarps * rpw * fade::bitpack::kRunCodes;
  const int blocks = (p.N + kBlockCols - 1) / kBlockCols;
  std::vector<float> smem(static_cast<size_t>(MR) * chunk);
  for (int block = 0; block < blocks; ++block) {
    float acc[kWarps][kBlockCols][MR] = {};  // each (warp, lane)'s registers
    for (int k0 = 0; k0 < p.K; k0 += chunk) {
      for (int i = 0; i < MR * chunk; ++i) {  // staging, as the block's threads do it
        const int m = i / chunk, k = k0 + i % chunk;
        smem[i] = (m < M && k < p.K) ? load_act(x, int64_t(m) * p.K + k, dt) : 0.f;
      }
      for (int warp = 0; warp < kWarps; ++warp)
        for (int lane = 0; lane < kBlockCols; ++lane) {
          const int n = block * kBlockCols + lane;
          if (n >= p.N) continue;
          const int run0 = k0 / fade::bitpack::kRunCodes;
          lane_chunk<BITS, MR>(p, n, run0, run0 + warp * rpw, rpw, smem.data(), chunk, acc[warp][lane]);
        }
    }
    std::vector<float> red(static_cast<size_t>(kWarps) * MR * kBlockCols);
    for (int warp = 0; warp < kWarps; ++warp)
      for (int lane = 0; lane < kBlockCols; ++lane)
        for (int m = 0; m < MR; ++m) red[(warp * MR + m) * kBlockCols + lane] = acc[warp][lane][m];
    for (int i = 0; i < MR * kBlockCols; ++i) {
      const int m = i / kBlockCols, c = i % kBlockCols, col = block * kBlockCols + c;
      if (m < M && col < p.N) y[int64_t(m) * p.N + col] = reduce_warps(red.data() + m * kBlockCols + c, MR * kBlockCols, bias, col);
    }
  }
}

template <int BITS>
void replay_rows(const void* x, const Problem& p, const float* bias, float* y, int M, int dt) {
  switch (row_tile(M)) {
    case 1: replay<BITS, 1>(x, p, bias, y, M, dt); break;
    case 2: replay<BITS, 2>(x, p, bias, y, M, dt); break;
    case 4: replay<BITS, 4>(x, p, bias, y, M, dt); break;
    default: replay<BITS, 8>(x, p, bias, y, M, dt); break;
  }
}

}  // namespace

extern "C" {

// fade_qgemv_launch's contract, on the host; y is always float32 [M, N] (the kernel's value
// before the final rounding to x's dtype).
int emu_qgemv(const void* x, int x_dtype, const int32_t* qweight, const int32_t* qzeros, const uint16_t* scales,
              const float* bias, float* y, int M, int K, int N, int group_size, int bits) {
  const int status = check_args(x, x_dtype, qweight, qzeros, scales, y, M, K, N, group_size, bits);
  if (status != FADE_QGEMV_OK) return status;
  const Problem p{reinterpret_cast<const uint32_t*>(qweight), reinterpret_cast<const uint32_t*>(qzeros), scales, K, N,
                  group_size};
  if (bits == 3) replay_rows<3>(x, p, bias, y, M, x_dtype);
  else replay_rows<4>(x, p, bias, y, M, x_dtype);
  return FADE_QGEMV_OK;
}

const char* emu_error_string(int status) { return status_message(status); }

// bitpack.h scalar helpers, one call per code.
void emu_unpack_run(const uint32_t* words, int bits, uint8_t* codes) { fade::bitpack::unpack_run(words, bits, codes); }
uint32_t emu_unpack3(const uint32_t* words, int i) { return fade::bitpack::unpack3(words, i); }
uint32_t emu_unpack4(uint32_t word, int j) { return fade::bitpack::unpack4(word, j); }
uint32_t emu_unpack_code(const uint32_t* col, int64_t stride, int64_t i, int bits) {
  return fade::bitpack::unpack_code(col, stride, i, bits);
}
float emu_half_bits_to_float(uint16_t h) { return half_bits_to_float(h); }

}  // extern "C"
