// AVX-512 instantiation of the fused dequant-GEMV and the tile dequantizer (qgemv_simd.inc).
//
// Compiled with the generic build flags: only the functions below the `#pragma GCC target`
// carry AVX-512 code, and qmatmul_cpu.cpp calls them only after __builtin_cpu_supports says so.
// Everything ISA-specific lives in an anonymous namespace so that the identically named
// templates of the AVX2 translation unit can never be merged with these by the linker.
#include <stddef.h>
#include <stdint.h>

#include <utility>

#include "fade/bitpack.h"
#include "qmatmul_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
// GCC 12 false positive inside avx512fintrin.h (_mm512_undefined_* used as a pass-through).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace fade {
namespace cpu {
namespace {

#include "simd_avx512.inc"

struct V : Simd512 {
  static FADE_INLINE F zero() { return _mm512_setzero_ps(); }
  static FADE_INLINE I or_(I a, I b) { return _mm512_or_si512(a, b); }
  template <int S> static FADE_INLINE I srli(I a) { return _mm512_srli_epi32(a, S); }
  template <int S> static FADE_INLINE I slli(I a) { return _mm512_slli_epi32(a, S); }
  // (w & MASK) as float. Measured on Zen 5: and + cvtdq2ps beats the magic-number variant
  // ((w & MASK) | 0x4B000000 via one vpternlogd, then - 2^23) by ~15% at M = 1.
  template <uint32_t MASK> static FADE_INLINE F field(I w) {
    return _mm512_cvtepi32_ps(_mm512_and_si512(w, _mm512_set1_epi32(int32_t(MASK))));
  }
  static FADE_INLINE F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static FADE_INLINE F add(F a, F b) { return _mm512_add_ps(a, b); }
  static FADE_INLINE F load_i16(const int16_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
  }
  // Round to nearest even by integer arithmetic (AVX512_BF16 is not assumed); NaNs stay quiet NaNs.
  static FADE_INLINE void store_bf16(uint16_t* p, F v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
};

#include "qgemv_simd.inc"

}  // namespace

void qgemv_tiles_avx512(const QGemvArgs& a, int64_t t0, int64_t t1) {
  // 2 vectors per 32-column tile; up to 8 rows * 2 vectors = 16 accumulators of 32 zmm.
  if (a.bits == 4) gemv_tiles<4, 2, kRowBlockAvx512>(a, t0, t1);
  else gemv_tiles<3, 2, kRowBlockAvx512>(a, t0, t1);
}

void dequant_tiles_avx512(const DequantArgs& a, int64_t t0, int64_t t1, int64_t k0, int64_t k1) {
  dequant_tiles_impl(a, t0, t1, k0, k1);
}

}  // namespace cpu
}  // namespace fade

#pragma GCC diagnostic pop
#pragma GCC pop_options

#else  // not x86-64 GCC/Clang: never dispatched (qmatmul_cpu.cpp checks the CPU first)

namespace fade {
namespace cpu {
void qgemv_tiles_avx512(const QGemvArgs& a, int64_t t0, int64_t t1) { qgemv_tiles_scalar(a, t0, t1); }
void dequant_tiles_avx512(const DequantArgs& a, int64_t t0, int64_t t1, int64_t k0, int64_t k1) {
  dequant_tiles_scalar(a, t0, t1, k0, k1);
}
}  // namespace cpu
}  // namespace fade

#endif
