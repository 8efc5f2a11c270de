// Torch-free interface between the torch-facing driver (qmatmul_cpu.cpp) and the per-ISA
// kernels (qgemv_avx512.cpp, qgemv_avx2.cpp, qgemv_scalar.cpp).
//
// The kernels consume the CPU "tiled" repack of the GPTQ tensors (fade_kernels/ops/cpu.py,
// repack_for_cpu), with T = ceil(N / kTileN) column tiles, Kw = K * bits / 32, G groups:
//   words  int32   [T, Kw, kTileN]  qweight's words, columns padded with 0 to T * kTileN, so each
//                                   tile's whole K extent is one contiguous stream (the GPTQ
//                                   layout [Kw, N] would stride every row by N * 4 bytes)
//   scales float16 [T, G, kTileN]   (raw IEEE half bits, read as uint16_t)
//   zeros  uint8   [T, G, kTileN]   unpacked zero points z (v2 convention: the true zero)
//   dsum   int16   [T, G, kTileN]   D = Σ_{k in group} (q_k − z): the fused kernel's zero term
// Groups here are the kernel's groups: the checkpoint's groups, split into pieces of at most
// 128 inputs when larger (full-row groups), with the scale and zero repeated. Short groups keep
// fp32 partial sums short (full-row groups of 5120 had 3x torch's error with 512-input pieces,
// 1-1.6x with 128) and |D| <= 128 * 15 well within int16.
// Padded columns have code 0, scale 0, zero 0 and D 0, so they contribute exactly 0.
#pragma once

#include <stdint.h>

// Kernel helpers must inline into their ISA-targeted callers to keep vectors in registers.
#define FADE_INLINE inline __attribute__((always_inline))

namespace fade {
namespace cpu {

// Columns per tile: two AVX-512 vectors or four AVX2 vectors of fp32.
constexpr int kTileN = 32;

// Arguments of the fused small-M kernel. Row-major everywhere; M rows of activations.
// What the fused fp32-activation and int8-activation kernels share: the packed weights' scales,
// the output and the shapes (qmatmul_cpu.cpp fills it once for either, fill_gemv_common).
struct GemvCommon {
  const int32_t* words;    // [T, Kw, kTileN] (the int8 kernel's q8 layout at 3 bits)
  const uint16_t* scales;  // [T, G, kTileN] fp16 bits
  const float* bias;       // [N] fp32 or nullptr
  void* y;                 // [M, ldy] fp32, or bf16 bits when y_bf16
  int64_t ldy;
  bool y_bf16;
  int64_t M, K, N, G, group_size;
  int bits;                // 3 or 4
};

struct QGemvArgs : GemvCommon {
  // Rows are processed in blocks of row_block(isa) rows (the last block may be shorter: mr
  // rows). The centred, pre-scaled activations and the group means are stored per block,
  // interleaved by row:
  const float* x;       // [M, K] group-centred fp32 activations x̃ = x − μ (the portable kernel)
  const float* xs;      // block at row m0: xs[m0 * ldxs + f * mr + (m - m0)], f < ldxs: x̃
                        //   pre-scaled per bit field (bitpack.h "Fields"), ldxs = K/32 * fields_per_run
  int64_t ldxs;
  const float* xmean;   // block at row m0: xmean[m0 * G + g * mr + (m - m0)] = μ, mean of x over group g
  const int16_t* dsum;  // [T, G, kTileN]
};

// Rows per block of each kernel family (the register tile height of its fused kernel).
constexpr int kRowBlockAvx512 = 8;
constexpr int kRowBlockAvx2 = 4;
constexpr int kRowBlockScalar = 1;

// y[:, tiles t0..t1) = x @ dequant(W)^T + bias for column tiles [t0, t1). Thread-safe for
// disjoint tile ranges (each call writes only its own columns).
void qgemv_tiles_avx512(const QGemvArgs& a, int64_t t0, int64_t t1);
void qgemv_tiles_avx2(const QGemvArgs& a, int64_t t0, int64_t t1);
void qgemv_tiles_scalar(const QGemvArgs& a, int64_t t0, int64_t t1);

// ---- int8-activation kernel (small M) ------------------------------------------------------
//
// Each kernel group of activations (the same inputs that share a weight scale, at most 128) is
// quantized once per call to int8 with its own scale, ggml "Q8" style:
//     s_x = max|x| / 127,   xq = round_half_even(x * (127 / max|x|)) in [-127, 127]
// and the codes (unsigned, 0 .. 2^b - 1) meet the activations in integer dot products
// (vpdpbusd: u8 x s8, four products per 32-bit lane, int32 accumulate). Per group and column:
//     y += s_w * s_x * (Σ xq * q  -  z * Σ xq)
// The bracket is an exact integer (|.| < 2^18, exact in fp32, so the FMA that forms it is exact):
// no cancellation, whatever the mean of x. The only extra error is the rounding of x to xq:
//     |Δy| <= Σ_groups s_x/2 * Σ_{k in group} |w_dequant[k]|  (see fade_kernels/ops/cpu.py).
//
// Code bytes per 32-bit lane (one lane = one output column):
//   4-bit: the GPTQ word itself. Byte j holds codes 2j (low nibble) and 2j+1 (high nibble), so
//     w & 0x0F0F0F0F gives codes 0,2,4,6 and w & 0xF0F0F0F0 gives 16 * codes 1,3,5,7 (kept in
//     a second accumulator, shifted down by 4 once per group: exact).
//   3-bit: a load-time repack of each 32-code run into 3 words ("q8 layout", repack_q8_3bit in
//     fade_kernels/ops/cpu.py). Byte j (j = 0..11) of the run holds code j at bits 0-2 ("A") and
//     code 12+j at bits 3-5 ("B"); bits 6-7 of bytes 0-3 / 4-7 hold the low two bits of codes
//     24-27 / 28-31 ("C lo"); bits 6 and 7 of bytes 8-11 hold the high bit of codes 24-27 and
//     28-31 ("C hi"). Ten masked dot products per run, each into the accumulator of its bit
//     position P (value = 2^P * contribution): A 0, B 3, C hi (bit 6) 4, C hi (bit 7) 5, C lo 6.
//
// Activation bytes, per row block of mr rows, run-major then row: xq[run][m][kQ8Bytes(bits)]
// at xq + m0 * K8 + (run * mr + m) * bytes, with the bytes of one run in the order the
// kernel's dot products read them (q8_order in qmatmul_cpu.cpp):
//   4-bit (32 bytes): per word i: x[8i + 0,2,4,6], x[8i + 1,3,5,7]
//   3-bit (40 bytes): per word w: A x[4w..4w+3], B x[12+4w..], then C lo x[24..27] (w = 0),
//                     x[28..31] (w = 1), and for w = 2 C hi x[24..27], x[28..31]
constexpr int q8_run_bytes(int bits) { return bits == 3 ? 40 : 32; }
// Largest activation group of the int8 kernels (a stack buffer; kernel groups are <= 128).
constexpr int kQ8MaxGroup = 1024;

struct Q8Args : GemvCommon {  // words: GPTQ words (4-bit) or the q8 layout (3-bit)
  const int8_t* xq;      // see above; row block m0 starts at xq + m0 * K8 (K8 = K / 32 * q8_run_bytes)
  int64_t K8;
  const float* xscale;   // block at row m0: xscale[m0 * G + g * mr + (m - m0)] = s_x of group g
  const float* xsum;     // same layout: Σ xq over group g (an integer, exact in fp32)
  const uint8_t* zeros;  // [T, G, kTileN]
};

// Rows per block of the int8 kernels (their register tile height).
constexpr int kQ8RowBlock = 4;

// y[:, tiles t0..t1) for column tiles [t0, t1): AVX-512 VNNI, AVX-VNNI (256-bit), AVX2 without
// VNNI (vpmaddubsw) and portable.
void q8_tiles_avx512(const Q8Args& a, int64_t t0, int64_t t1);
void q8_tiles_avxvnni(const Q8Args& a, int64_t t0, int64_t t1);
void q8_tiles_avx2(const Q8Args& a, int64_t t0, int64_t t1);
void q8_tiles_scalar(const Q8Args& a, int64_t t0, int64_t t1);

// Arguments of the tile dequantizer used for large M (then a dense GEMM).
struct DequantArgs {
  const int32_t* words;    // [T, Kw, kTileN]
  const uint16_t* scales;  // [T, G, kTileN]
  const uint8_t* zeros;    // [T, G, kTileN]
  int64_t K, G, group_size;
  int bits;
  void* out;               // [K, ldo] fp32 (or bf16 bits when out_bf16): tile t0 + i lands in
  int64_t ldo;             //   columns [i * kTileN, (i + 1) * kTileN)
  bool out_bf16;
};

// out[k, c] = (q[k, c] - z[g(k), c]) * s[g(k), c] for tiles [t0, t1), rows [k0, k1)
// (k0, k1 multiples of group_size). Bit-exact with the torch reference's fp32 weight:
// q - z is an exact small integer and the product is rounded once.
void dequant_tiles_avx512(const DequantArgs& a, int64_t t0, int64_t t1, int64_t k0, int64_t k1);
void dequant_tiles_avx2(const DequantArgs& a, int64_t t0, int64_t t1, int64_t k0, int64_t k1);
void dequant_tiles_scalar(const DequantArgs& a, int64_t t0, int64_t t1, int64_t k0, int64_t k1);

// Portable helpers shared by the kernels (defined in qgemv_scalar.cpp).
float half_to_float(uint16_t h);
uint16_t float_to_bf16(float f);  // round to nearest even, NaN stays NaN

}  // namespace cpu
}  // namespace fade
