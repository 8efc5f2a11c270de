// Portable int8-activation kernel: the same arithmetic as q8_simd.inc in plain C++ (codes read
// one at a time from the layouts described in qmatmul_cpu.h). It is the readable statement of
// the kernel and the path on CPUs without AVX2 when the int8 kernel is requested. Every step
// that rounds is the same operation in the same order as the SIMD kernels (one fp32 multiply
// s_w * s_x, one fused multiply-add per group), so all four produce identical bits.
#include <math.h>
#include <stdint.h>

#include "qmatmul_cpu.h"

namespace fade {
namespace cpu {
namespace {

// Byte j (0 .. 4 * words - 1) of column c's run, whose words are kTileN apart.
inline uint32_t run_byte(const int32_t* run, int c, int j) {
  return (uint32_t(run[(j / 4) * kTileN + c]) >> (8 * (j % 4))) & 0xFFu;
}

// Code i (0..31) of a run and the offset of its activation byte in the run's q8 bytes.
inline int code4(const int32_t* run, int c, int i) {
  const uint32_t byte = run_byte(run, c, i / 2);
  return int(i % 2 == 0 ? byte & 15u : byte >> 4);
}
inline int xoff4(int i) { return 8 * (i / 8) + (i % 2) * 4 + (i % 8) / 2; }

inline int code3(const int32_t* run, int c, int i) {
  if (i < 12) return int(run_byte(run, c, i) & 7u);
  if (i < 24) return int((run_byte(run, c, i - 12) >> 3) & 7u);
  const int j = i - 24;  // C codes: low bits in bytes 0-7, high bit in bytes 8-11 (bit 6 or 7)
  const uint32_t lo = run_byte(run, c, j) >> 6;
  const uint32_t hi = (run_byte(run, c, 8 + j % 4) >> (6 + j / 4)) & 1u;
  return int(lo | (hi << 2));
}
inline int xoff3(int i) {
  if (i < 12) return 12 * (i / 4) + i % 4;
  if (i < 24) return 12 * ((i - 12) / 4) + 4 + (i - 12) % 4;
  return i < 28 ? 8 + (i - 24) : 20 + (i - 28);
}

}  // namespace

void q8_tiles_scalar(const Q8Args& a, int64_t t0, int64_t t1) {
  const int bits = a.bits, rb = q8_run_bytes(bits);
  const int64_t kw = a.K * bits / 32;
  const int runs = int(a.group_size / 32);
  float yt[kTileN];
  for (int64_t t = t0; t < t1; ++t) {
    const int32_t* tw = a.words + t * kw * kTileN;
    const uint16_t* ts = a.scales + t * a.G * kTileN;
    const uint8_t* tz = a.zeros + t * a.G * kTileN;
    const int64_t n0 = t * kTileN;
    const int ncols = int(a.N - n0 < kTileN ? a.N - n0 : kTileN);
    for (int64_t m0 = 0; m0 < a.M; m0 += kQ8RowBlock) {
      const int mrb = int(a.M - m0 < kQ8RowBlock ? a.M - m0 : kQ8RowBlock);
      for (int m = 0; m < mrb; ++m) {
        for (int c = 0; c < kTileN; ++c) yt[c] = 0.f;
        for (int64_t g = 0; g < a.G; ++g) {
          const float sx = a.xscale[m0 * a.G + g * mrb + m];
          const float sum = a.xsum[m0 * a.G + g * mrb + m];
          for (int c = 0; c < ncols; ++c) {
            int32_t dot = 0;
            for (int r = 0; r < runs; ++r) {
              const int64_t run = g * runs + r;
              const int32_t* rw = tw + run * bits * kTileN;
              const int8_t* xr = a.xq + m0 * a.K8 + (run * mrb + m) * rb;
              for (int i = 0; i < 32; ++i)
                dot += (bits == 4 ? code4(rw, c, i) * xr[xoff4(i)] : code3(rw, c, i) * xr[xoff3(i)]);
            }
            const float z = float(tz[g * kTileN + c]);
            const float d = fmaf(-z, sum, float(dot));  // exact: integers below 2^24
            yt[c] = fmaf(half_to_float(ts[g * kTileN + c]) * sx, d, yt[c]);
          }
        }
        for (int c = 0; c < ncols; ++c) {
          const float v = yt[c] + (a.bias ? a.bias[n0 + c] : 0.f);
          if (a.y_bf16) static_cast<uint16_t*>(a.y)[(m0 + m) * a.ldy + n0 + c] = float_to_bf16(v);
          else static_cast<float*>(a.y)[(m0 + m) * a.ldy + n0 + c] = v;
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace fade
