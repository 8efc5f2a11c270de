// Bit layouts of the GPTQ packed codes (docs/methods.md §9), shared by CPU and CUDA code.
//
// Torch-free and STL-free on purpose: the CUDA kernels include this from .cu files compiled
// without torch, and the CPU ISA translation units include it inside a `#pragma GCC target`
// region where pulling in library templates could leak AVX-512 code into generic inline
// functions.
//
// Every width packs codes as one little-endian bit stream: code i of a run occupies stream
// bits [i*b, i*b + b), stream bit p lives in word p / 32 at bit p % 32. Widths that divide 32
// never straddle a word: 4-bit packs 8 codes per word, code j at bits [4j, 4j + 4):
//
//   word  bit: 31   28|27   24|23   20|19   16|15   12|11    8|7     4|3     0
//              [ c7  ]|[ c6  ]|[ c5  ]|[ c4  ]|[ c3  ]|[ c2  ]|[ c1  ]|[ c0  ]
//
// 3-bit packs a run of 32 codes into 3 words; codes 10 and 21 straddle a word boundary:
//
//   word 0  bit: 31 30|29  27|26  24|23  21|20  18|17  15|14  12|11   9|8   6|5   3|2   0
//                [c10 ]|[ c9 ]|[ c8 ]|[ c7 ]|[ c6 ]|[ c5 ]|[ c4 ]|[ c3 ]|[ c2]|[ c1]|[ c0]
//                 ^^ bits 1..0 of c10
//
//   word 1  bit: 31|30  28|27  25|24  22|21  19|18  16|15  13|12  10|9   7|6   4|3   1|0
//                c21|[c20 ]|[c19 ]|[c18 ]|[c17 ]|[c16 ]|[c15 ]|[c14 ]|[c13]|[c12]|[c11]|c10
//                ^ bit 0 of c21                                                        ^ bit 2 of c10
//
//   word 2  bit: 31  29|28  26|25  23|22  20|19  17|16  14|13  11|10   8|7   5|4   2|1  0
//                [c31 ]|[c30 ]|[c29 ]|[c28 ]|[c27 ]|[c26 ]|[c25 ]|[c24 ]|[c23]|[c22]|[c21]
//                                                                                    ^^ bits 2..1 of c21
//
// So c0..c9 sit in word 0 bits 0-29, c11..c20 in word 1 bits 1-30, c22..c31 in word 2 bits 2-31.
//
// "Fields": the CPU GEMV never reassembles a straddling code. It splits each run into bit
// fields that lie inside one word (34 fields for a 3-bit run, 8 per word for 4-bit) and reads
// each field in place, without shifting it down to bit 0: the value it produces is
// piece * 2^pos, exact in float because it has at most `width` significant bits. Fields that
// reach above bit 22 are read from (word >> 12) instead (one shift per word, shared by all its
// high fields), so every value sits in bits 0..22: the sign bit never enters the int -> float
// conversion, and the value also fits a float mantissa (which a magic-number conversion,
// ((w & mask) | 0x4B000000) - 2^23, would need; see the AVX-512 kernel for why it is not used).
// The activation multiplying a field is pre-scaled by 2^(code_shift - pos), so
//     Σ_fields x'_f * value_f  ==  Σ_codes x_i * q_i      (exactly, up to fp rounding of the sum)
// and a straddling code costs two cheap fields instead of a shift/or/mask reassembly.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define FADE_HOST_DEVICE __host__ __device__
#else
#define FADE_HOST_DEVICE
#endif

namespace fade {
namespace bitpack {

// Every width is handled in runs of 32 codes, which fill exactly `bits` int32 words.
constexpr int kRunCodes = 32;
FADE_HOST_DEVICE constexpr int run_words(int bits) { return bits; }
// Packed int32 words holding k codes (k a multiple of 32).
FADE_HOST_DEVICE constexpr int64_t packed_words(int64_t k, int bits) { return k * bits / 32; }

// One in-word bit field of a run (see the header comment).
struct Field {
  int word;        // word of the run holding the field (0..run_words-1)
  int shift;       // lowest bit of the field inside that word
  int width;       // bits in the field
  int code;        // code of the run (0..31) the field belongs to
  int code_shift;  // position of the field's lowest bit inside that code
};

// Fields whose bits reach above bit 22 are read from (word >> kHighShift).
constexpr int kHighShift = 12;
FADE_HOST_DEVICE constexpr bool field_is_high(Field f) { return f.shift + f.width > 23; }
// Bit position of the field's value in the word it is read from (the word or word >> 12).
FADE_HOST_DEVICE constexpr int field_value_pos(Field f) { return field_is_high(f) ? f.shift - kHighShift : f.shift; }
// log2 of the factor that turns the field's extracted value (piece * 2^pos) into its
// contribution to the code (piece * 2^code_shift): the activation pre-scale.
FADE_HOST_DEVICE constexpr int field_weight_log2(Field f) { return f.code_shift - field_value_pos(f); }
// The mask selecting the field in the word it is read from.
FADE_HOST_DEVICE constexpr uint32_t field_mask(Field f) {
  return ((uint32_t(1) << f.width) - 1u) << field_value_pos(f);
}

// 3-bit run: 34 fields in word order (11 in word 0, 12 in word 1, 11 in word 2).
constexpr int kFields3 = 34;
constexpr int kFields3PerWord[3] = {11, 12, 11};
constexpr Field kFieldTable3[kFields3] = {
    // word 0: c0..c9 whole, then the low 2 bits of c10 at bits 30-31
    {0, 0, 3, 0, 0}, {0, 3, 3, 1, 0}, {0, 6, 3, 2, 0}, {0, 9, 3, 3, 0}, {0, 12, 3, 4, 0},
    {0, 15, 3, 5, 0}, {0, 18, 3, 6, 0}, {0, 21, 3, 7, 0}, {0, 24, 3, 8, 0}, {0, 27, 3, 9, 0},
    {0, 30, 2, 10, 0},
    // word 1: the high bit of c10 at bit 0, c11..c20 whole, the low bit of c21 at bit 31
    {1, 0, 1, 10, 2}, {1, 1, 3, 11, 0}, {1, 4, 3, 12, 0}, {1, 7, 3, 13, 0}, {1, 10, 3, 14, 0},
    {1, 13, 3, 15, 0}, {1, 16, 3, 16, 0}, {1, 19, 3, 17, 0}, {1, 22, 3, 18, 0}, {1, 25, 3, 19, 0},
    {1, 28, 3, 20, 0}, {1, 31, 1, 21, 0},
    // word 2: the high 2 bits of c21 at bits 0-1, c22..c31 whole
    {2, 0, 2, 21, 1}, {2, 2, 3, 22, 0}, {2, 5, 3, 23, 0}, {2, 8, 3, 24, 0}, {2, 11, 3, 25, 0},
    {2, 14, 3, 26, 0}, {2, 17, 3, 27, 0}, {2, 20, 3, 28, 0}, {2, 23, 3, 29, 0}, {2, 26, 3, 30, 0},
    {2, 29, 3, 31, 0},
};

// 4-bit word: 8 fields, one per code (c5..c7 are high fields).
constexpr int kFields4 = 8;
constexpr Field kFieldTable4[kFields4] = {
    {0, 0, 4, 0, 0}, {0, 4, 4, 1, 0}, {0, 8, 4, 2, 0}, {0, 12, 4, 3, 0},
    {0, 16, 4, 4, 0}, {0, 20, 4, 5, 0}, {0, 24, 4, 6, 0}, {0, 28, 4, 7, 0},
};

// Fields per 32-code run: the length of the pre-scaled activation per 32 inputs.
FADE_HOST_DEVICE constexpr int fields_per_run(int bits) { return bits == 3 ? kFields3 : 4 * kFields4; }

// ---- scalar unpack (reference-grade, used by portable paths and the CUDA code) -------------

// Code i (0..31) of a 3-bit run stored in w[0..2].
FADE_HOST_DEVICE inline uint32_t unpack3(const uint32_t* w, int i) {
  const int bit = 3 * i, word = bit >> 5, shift = bit & 31;
  uint32_t v = w[word] >> shift;
  if (shift > 29) v |= w[word + 1] << (32 - shift);  // straddles: high bits start at bit 0 of the next word
  return v & 7u;
}

// Code j (0..7) of a 4-bit word.
FADE_HOST_DEVICE inline uint32_t unpack4(uint32_t w, int j) { return (w >> (4 * j)) & 15u; }

// All 32 codes of a run: w holds run_words(bits) words.
FADE_HOST_DEVICE inline void unpack_run(const uint32_t* w, int bits, uint8_t* codes) {
  if (bits == 3) {
    // Whole-word extraction: exactly the diagram above, with the two straddlers reassembled.
    for (int i = 0; i < 10; ++i) codes[i] = uint8_t((w[0] >> (3 * i)) & 7u);
    codes[10] = uint8_t((w[0] >> 30) | ((w[1] & 1u) << 2));
    for (int i = 11; i < 21; ++i) codes[i] = uint8_t((w[1] >> (3 * i - 32)) & 7u);
    codes[21] = uint8_t((w[1] >> 31) | ((w[2] & 3u) << 1));
    for (int i = 22; i < 32; ++i) codes[i] = uint8_t((w[2] >> (3 * i - 64)) & 7u);
  } else {
    const int per_word = 32 / bits;
    const uint32_t mask = (1u << bits) - 1u;
    for (int i = 0; i < 32; ++i) codes[i] = uint8_t((w[i / per_word] >> (bits * (i % per_word))) & mask);
  }
}

// Code i (any index along the packed dimension) of a column whose words are `stride` apart.
FADE_HOST_DEVICE inline uint32_t unpack_code(const uint32_t* col, int64_t stride, int64_t i, int bits) {
  const int64_t bit = i * bits, word = bit >> 5;
  const int shift = int(bit & 31);
  uint32_t v = col[word * stride] >> shift;
  if (shift + bits > 32) v |= col[(word + 1) * stride] << (32 - shift);
  return v & ((1u << bits) - 1u);
}

}  // namespace bitpack
}  // namespace fade
