// AVX2 + FMA + F16C instantiation of the fused dequant-GEMV and the tile dequantizer
// (qgemv_simd.inc). Same structure as qgemv_avx512.cpp: only code below the
// `#pragma GCC target` uses AVX2, it sits in an anonymous namespace so it can never be merged
// with the AVX-512 instantiation, and qmatmul_cpu.cpp dispatches to it at run time.
#include <stddef.h>
#include <stdint.h>

#include <utility>

#include "fade/bitpack.h"
#include "qmatmul_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace fade {
namespace cpu {
namespace {

#include "simd_avx2.inc"

struct V : Simd256 {
  static FADE_INLINE F zero() { return _mm256_setzero_ps(); }
  static FADE_INLINE I or_(I a, I b) { return _mm256_or_si256(a, b); }
  template <int S> static FADE_INLINE I srli(I a) { return _mm256_srli_epi32(a, S); }
  template <int S> static FADE_INLINE I slli(I a) { return _mm256_slli_epi32(a, S); }
  // (w & MASK) as float (exact: the field has at most 4 significant bits and no sign bit).
  template <uint32_t MASK> static FADE_INLINE F field(I w) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(w, _mm256_set1_epi32(int32_t(MASK))));
  }
  static FADE_INLINE F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static FADE_INLINE F add(F a, F b) { return _mm256_add_ps(a, b); }
  static FADE_INLINE F load_i16(const int16_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // Round to nearest even by integer arithmetic; NaNs stay quiet NaNs.
  static FADE_INLINE void store_bf16(uint16_t* p, F v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40)), nan);
    // packus works per 128-bit lane: [r0..3 r0..3 | r4..7 r4..7]; gather qwords 0 and 2.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
};

#include "qgemv_simd.inc"

}  // namespace

void qgemv_tiles_avx2(const QGemvArgs& a, int64_t t0, int64_t t1) {
  // 16 ymm registers: 2 of the tile's 4 column vectors per pass, up to 4 rows -> 8 accumulators.
  if (a.bits == 4) gemv_tiles<4, 2, kRowBlockAvx2>(a, t0, t1);
  else gemv_tiles<3, 2, kRowBlockAvx2>(a, t0, t1);
}

void dequant_tiles_avx2(const DequantArgs& a, int64_t t0, int64_t t1, int64_t k0, int64_t k1) {
  dequant_tiles_impl(a, t0, t1, k0, k1);
}

}  // namespace cpu
}  // namespace fade

#pragma GCC pop_options

#else  // not x86-64 GCC/Clang: never dispatched (qmatmul_cpu.cpp checks the CPU first)

namespace fade {
namespace cpu {
void qgemv_tiles_avx2(const QGemvArgs& a, int64_t t0, int64_t t1) { qgemv_tiles_scalar(a, t0, t1); }
void dequant_tiles_avx2(const DequantArgs& a, int64_t t0, int64_t t1, int64_t k0, int64_t k1) {
  dequant_tiles_scalar(a, t0, t1, k0, k1);
}
}  // namespace cpu
}  // namespace fade

#endif
