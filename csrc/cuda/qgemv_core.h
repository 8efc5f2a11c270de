// The arithmetic of the CUDA decode GEMV (qgemv.cu), written as host+device functions so that
// a plain C++ build runs exactly the same code: tests/ops/test_cuda_qgemv_emulator.cpp replays
// the kernel's block/warp/lane decomposition on the CPU with these functions and the tests
// compare it with the torch reference (there is no GPU on the CI machine). Torch-free.
//
// Work decomposition (one thread block = kWarps warps = 256 threads):
//   - block b owns the 32 output columns n = 32 b + lane (one column per lane, so each warp
//     reads a 128-byte row segment of qweight per word row: fully coalesced);
//   - K is cut into runs of 32 inputs (one run = `bits` packed words per column, bitpack.h)
//     and the runs into chunks of kWarps * rpw runs; per chunk the block stages x[:, chunk]
//     in shared memory as fp32 (rows >= M and inputs >= K as zeros), then warp w takes the
//     rpw consecutive runs w * rpw .. w * rpw + rpw - 1 of the chunk (consecutive so the
//     group's scale and zero stay in L1 between runs);
//   - per run a lane loads its `bits` words first (rpw runs' loads in flight at once), then
//     accumulates Σ_i x[m, i] * (q_i − z) over the 32 inputs in fp32 (q − z is an exact small
//     integer) and adds s * that to its row accumulators: one scale FMA per run and row;
//   - at the end the kWarps partial sums of each (row, column) are added in warp order, plus
//     the bias, and converted to the output dtype.
// rpw (runs per warp per chunk) = min(kMaxRunsPerWarp, ceil(K / 32 / kWarps)): long rows get
// 4 runs per warp between barriers, short rows (Moonshine K = 288: 9 runs) keep warps busy.
#pragma once

#include <stdint.h>

#include "fade/bitpack.h"
#include "qgemv.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif
#if !defined(__CUDA_ARCH__)
#include <math.h>
#include <string.h>
#endif

// `#pragma unroll` for the device pass only (a host compiler with -Wall rejects it as unknown;
// the host replay does not need the unrolling).
#if defined(__CUDA_ARCH__)
#define FADE_UNROLL _Pragma("unroll")
#else
#define FADE_UNROLL
#endif

namespace fade {
namespace cuda {

constexpr int kWarps = 8;             // warps per block
constexpr int kThreads = kWarps * 32;
constexpr int kBlockCols = 32;        // output columns per block (one per lane)
constexpr int kMaxRunsPerWarp = 4;    // runs a warp takes per staged chunk, at most
constexpr int kMaxChunk = kWarps * kMaxRunsPerWarp * bitpack::kRunCodes;  // inputs staged per chunk, at most
constexpr int kMaxRows = FADE_QGEMV_MAX_M;

// Runs per warp per chunk for a row of K inputs (see the header comment).
FADE_HOST_DEVICE inline int runs_per_warp(int K) {
  const int runs = K / bitpack::kRunCodes;
  const int rpw = (runs + kWarps - 1) / kWarps;
  return rpw < kMaxRunsPerWarp ? rpw : kMaxRunsPerWarp;
}

// The smallest compiled row tile (1, 2, 4 or 8) holding M rows; rows M..tile-1 are zeros.
FADE_HOST_DEVICE inline int row_tile(int M) { return M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : 8; }

// Words per row of qzeros: N padded to a multiple of 32 codes.
FADE_HOST_DEVICE inline int64_t qzeros_row_words(int N, int bits) { return int64_t(N + 31) / 32 * bits; }

// Argument check shared by the launcher and the host replay: a fade_qgemv_status.
inline int check_args(const void* x, int x_dtype, const int32_t* qweight, const int32_t* qzeros,
                      const uint16_t* scales, const void* y, int M, int K, int N, int group_size, int bits) {
  if (bits != 3 && bits != 4) return FADE_QGEMV_ERR_BITS;
  if (M < 1 || M > kMaxRows) return FADE_QGEMV_ERR_ROWS;
  if (K <= 0 || K % bitpack::kRunCodes != 0) return FADE_QGEMV_ERR_K;
  if (N <= 0) return FADE_QGEMV_ERR_N;
  if (group_size <= 0 || group_size % bitpack::kRunCodes != 0 || K % group_size != 0) return FADE_QGEMV_ERR_GROUP;
  if (x_dtype != FADE_QGEMV_F16 && x_dtype != FADE_QGEMV_BF16 && x_dtype != FADE_QGEMV_F32) return FADE_QGEMV_ERR_DTYPE;
  if (!x || !qweight || !qzeros || !scales || !y) return FADE_QGEMV_ERR_NULL;
  return FADE_QGEMV_OK;
}

inline const char* status_message(int status) {
  switch (status) {
    case FADE_QGEMV_OK: return "success";
    case FADE_QGEMV_ERR_BITS: return "bits must be 3 or 4";
    case FADE_QGEMV_ERR_ROWS: return "M (rows of x) must be between 1 and 8";
    case FADE_QGEMV_ERR_K: return "K (in_features) must be a positive multiple of 32";
    case FADE_QGEMV_ERR_N: return "N (out_features) must be positive";
    case FADE_QGEMV_ERR_GROUP: return "group_size must be a positive multiple of 32 that divides K";
    case FADE_QGEMV_ERR_DTYPE: return "x_dtype must be FADE_QGEMV_F16, FADE_QGEMV_BF16 or FADE_QGEMV_F32";
    case FADE_QGEMV_ERR_NULL: return "x, qweight, qzeros, scales and y must not be NULL";
    case FADE_QGEMV_ERR_LAUNCH: return "the CUDA kernel launch failed";
    default: return "unknown fade_qgemv status code";
  }
}

// ---- scalar conversions ---------------------------------------------------------------------

FADE_HOST_DEVICE inline float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

// IEEE half bits -> float (exact).
FADE_HOST_DEVICE inline float half_bits_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  if (exp == 0x1F) return bits_as_float(sign | 0x7F800000u | (mant << 13));      // inf / NaN
  if (exp != 0) return bits_as_float(sign | ((exp + 112u) << 23) | (mant << 13)); // rebias 15 -> 127
  const float mag = float(mant) * (1.0f / 16777216.0f);                         // subnormal: mant * 2^-24
  return sign ? -mag : mag;
#endif
}

// bfloat16 bits -> float (exact: bf16 is the top half of a float).
FADE_HOST_DEVICE inline float bf16_bits_to_float(uint16_t h) { return bits_as_float(uint32_t(h) << 16); }

// One activation x[i] as fp32; dt is a fade_qgemv_dtype, x points at fp16/bf16 bits or floats.
// A run-time switch, not a template: it is uniform across a launch (no divergence), only the
// staging loop uses it, and one kernel per dtype would triple nvcc's time for nothing.
FADE_HOST_DEVICE inline float load_act(const void* x, int64_t i, int dt) {
  if (dt == FADE_QGEMV_F32) return static_cast<const float*>(x)[i];
  const uint16_t h = static_cast<const uint16_t*>(x)[i];
  return dt == FADE_QGEMV_F16 ? half_bits_to_float(h) : bf16_bits_to_float(h);
}

// ---- the per-lane work ----------------------------------------------------------------------

// Everything a lane needs, in the launcher's units.
struct Problem {
  const uint32_t* qweight;  // [K * bits / 32, N]
  const uint32_t* qzeros;   // [G, qzeros_row_words(N, bits)]
  const uint16_t* scales;   // [G, N] half bits
  int K, N, group_size;
};

// (q - z) as float from the 2^23 magic: the float with bits 0x4B000000 | q is exactly 2^23 + q
// (q < 2^23), so subtracting zb = 2^23 + z gives q - z exactly with one OR and one FSUB,
// cheaper than an int -> float conversion per weight.
constexpr float kMagic = 8388608.0f;  // 2^23
FADE_HOST_DEVICE inline float code_minus_zero(uint32_t q, float zb) { return bits_as_float(q | 0x4B000000u) - zb; }

// Code i (0..31) of a run held in w[0..BITS) (bitpack.h layout; straddling 3-bit codes
// are reassembled by bitpack::unpack3).
template <int BITS>
FADE_HOST_DEVICE inline uint32_t run_code(const uint32_t* w, int i) {
  return BITS == 3 ? bitpack::unpack3(w, i) : bitpack::unpack4(w[i >> 3], i & 7);
}

// acc[m] += s * Σ_{i<32} xr[m * ldx + i] * (q_i - z) for m < MR.
// w: the run's BITS words of this lane's column; xr: the run's 32 fp32 activations of row 0,
// rows ldx apart; zb = 2^23 + z; s = the group's scale. fmaf on both sides keeps the host
// replay's rounding identical to the device's.
template <int BITS, int MR>
FADE_HOST_DEVICE inline void accumulate_run(const uint32_t* w, const float* xr, int ldx, float zb, float s,
                                            float (&acc)[MR]) {
  float part[MR];
FADE_UNROLL
  for (int m = 0; m < MR; ++m) part[m] = 0.f;
FADE_UNROLL
  for (int i = 0; i < bitpack::kRunCodes; ++i) {
    const float d = code_minus_zero(run_code<BITS>(w, i), zb);
FADE_UNROLL
    for (int m = 0; m < MR; ++m) part[m] = fmaf(xr[m * ldx + i], d, part[m]);
  }
FADE_UNROLL
  for (int m = 0; m < MR; ++m) acc[m] = fmaf(s, part[m], acc[m]);
}

// One lane's share of one staged chunk: runs first_run .. first_run + rpw - 1 (those < K/32)
// of column n. xs: the chunk's staged activations [MR][ldx] fp32; x_run0: the chunk's first run.
template <int BITS, int MR>
FADE_HOST_DEVICE inline void lane_chunk(const Problem& p, int n, int x_run0, int first_run, int rpw, const float* xs,
                                        int ldx, float (&acc)[MR]) {
  const int runs = p.K / bitpack::kRunCodes;
  const int64_t ldz = qzeros_row_words(p.N, BITS);
  uint32_t w[kMaxRunsPerWarp][BITS] = {};
  // All loads of the chunk before any arithmetic, so rpw * BITS loads are in flight together.
FADE_UNROLL
  for (int j = 0; j < kMaxRunsPerWarp; ++j) {
    const int run = first_run + j;
    if (j < rpw && run < runs) {
FADE_UNROLL
      for (int b = 0; b < BITS; ++b) w[j][b] = p.qweight[(int64_t(run) * BITS + b) * p.N + n];
    }
  }
FADE_UNROLL
  for (int j = 0; j < kMaxRunsPerWarp; ++j) {
    const int run = first_run + j;
    if (j < rpw && run < runs) {
      const int g = run * bitpack::kRunCodes / p.group_size;
      const float s = half_bits_to_float(p.scales[int64_t(g) * p.N + n]);
      const uint32_t z = bitpack::unpack_code(p.qzeros + g * ldz, 1, n, BITS);
      accumulate_run<BITS, MR>(w[j], xs + (run - x_run0) * bitpack::kRunCodes, ldx, kMagic + float(z), s, acc);
    }
  }
}

// The output value of (row m, column n) from the kWarps partial sums red[w * stride], added in
// warp order after the bias.
FADE_HOST_DEVICE inline float reduce_warps(const float* red, int stride, const float* bias, int n) {
  float v = bias ? bias[n] : 0.f;
FADE_UNROLL
  for (int w = 0; w < kWarps; ++w) v += red[w * stride];
  return v;
}

}  // namespace cuda
}  // namespace fade
