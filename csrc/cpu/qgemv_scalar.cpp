// Portable fused dequant-GEMV and tile dequantizer: the same algorithm as the SIMD kernels
// (qgemv_simd.inc) in plain C++, used on CPUs without AVX2 and as a readable statement of it.
// Codes are unpacked with the shared bitpack.h helpers instead of the field trick.
#include <stdint.h>
#include <string.h>

#include "fade/bitpack.h"
#include "qmatmul_cpu.h"

namespace fade {
namespace cpu {

float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);  // inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);  // rebias 15 -> 127
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    uint32_t e = 113;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((mant & 0x3FFu) << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_bf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, 4);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((bits >> 16) | 0x40u);  // quiet NaN
  bits += 0x7FFFu + ((bits >> 16) & 1u);  // round to nearest even
  return uint16_t(bits >> 16);
}

namespace {

// The 32 codes of run `run` of tile column c (words kTileN apart in the tiled layout).
inline void column_run(const int32_t* tile_words, int c, int64_t run, int bits, uint8_t* codes) {
  const int nw = bits == 3 ? 3 : 4;
  uint32_t w[4];
  for (int i = 0; i < nw; ++i) w[i] = uint32_t(tile_words[(run * nw + i) * kTileN + c]);
  bitpack::unpack_run(w, bits, codes);
}

}  // namespace

void qgemv_tiles_scalar(const QGemvArgs& a, int64_t t0, int64_t t1) {
  const int64_t kw = a.K * a.bits / 32;
  const int64_t runs_per_group = a.group_size / 32;
  uint8_t codes[32];
  for (int64_t t = t0; t < t1; ++t) {
    const int32_t* tw = a.words + t * kw * kTileN;
    for (int c = 0; c < kTileN && t * kTileN + c < a.N; ++c) {
      const int64_t n = t * kTileN + c;
      for (int64_t m = 0; m < a.M; ++m) {
        const float* x = a.x + m * a.K;  // centred: x̃ = x − μ per group
        float y = 0.f;
        for (int64_t g = 0; g < a.G; ++g) {
          float dot = 0.f;  // Σ x̃*q over the group; scale and zero term are applied once below
          for (int64_t r = g * runs_per_group; r < (g + 1) * runs_per_group; ++r) {
            column_run(tw, c, r, a.bits, codes);
            for (int i = 0; i < 32; ++i) dot += x[r * 32 + i] * float(codes[i]);
          }
          const float s = half_to_float(a.scales[(t * a.G + g) * kTileN + c]);
          const float d = float(a.dsum[(t * a.G + g) * kTileN + c]);
          y += s * (dot + a.xmean[m * a.G + g] * d);  // row blocks of kRowBlockScalar = 1 row
        }
        if (a.bias) y += a.bias[n];
        if (a.y_bf16) static_cast<uint16_t*>(a.y)[m * a.ldy + n] = float_to_bf16(y);
        else static_cast<float*>(a.y)[m * a.ldy + n] = y;
      }
    }
  }
}

void dequant_tiles_scalar(const DequantArgs& a, int64_t t0, int64_t t1, int64_t k0, int64_t k1) {
  const int64_t kw = a.K * a.bits / 32;
  uint8_t codes[32];
  for (int64_t t = t0; t < t1; ++t) {
    const int32_t* tw = a.words + t * kw * kTileN;
    for (int c = 0; c < kTileN; ++c) {
      const int64_t col = (t - t0) * kTileN + c;
      for (int64_t r = k0 / 32; r < k1 / 32; ++r) {
        column_run(tw, c, r, a.bits, codes);
        for (int i = 0; i < 32; ++i) {
          const int64_t k = r * 32 + i, g = k / a.group_size;
          const float s = half_to_float(a.scales[(t * a.G + g) * kTileN + c]);
          const float z = float(a.zeros[(t * a.G + g) * kTileN + c]);
          const float v = (float(codes[i]) - z) * s;  // same rounding as the torch reference
          if (a.out_bf16) static_cast<uint16_t*>(a.out)[k * a.ldo + col] = float_to_bf16(v);
          else static_cast<float*>(a.out)[k * a.ldo + col] = v;
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace fade
