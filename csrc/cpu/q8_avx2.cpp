// AVX2 instantiation of the int8-activation kernel (q8_simd.inc) for CPUs without VNNI (e.g.
// Zen 2/3, Haswell to Skylake client). vpdpbusd is replaced by vpmaddubsw (u8 x s8 byte pairs
// summed into 16 bits) and vpmaddwd against ones (16-bit pairs summed into 32 bits): the sum of
// four byte products, as vpdpbusd gives it. vpmaddubsw saturates at 2^15, so the kernel shifts
// each masked code field down to bit 0 first (kNarrowProducts): a pair is then at most
// 2 * 15 * 128 < 2^15, and every product is exact. qmatmul_cpu.cpp calls it when the CPU has
// AVX2 but not AVX-VNNI.
#include <stddef.h>
#include <stdint.h>

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
  static constexpr bool kNarrowProducts = true;
  static FADE_INLINE I zeroi() { return _mm256_setzero_si256(); }
  static FADE_INLINE I addi(I a, I b) { return _mm256_add_epi32(a, b); }
  template <int S> static FADE_INLINE I srai(I a) { return _mm256_srai_epi32(a, S); }
  template <int S> static FADE_INLINE I srli(I a) { return _mm256_srli_epi32(a, S); }
  static FADE_INLINE I slli(I a, int s) { return _mm256_sll_epi32(a, _mm_cvtsi32_si128(s)); }
  static FADE_INLINE I dp(I acc, I codes, const int8_t* x) {
    int32_t v;
    __builtin_memcpy(&v, x, 4);
    const I pairs = _mm256_maddubs_epi16(codes, _mm256_set1_epi32(v));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
};

#include "q8_simd.inc"

}  // namespace

void q8_tiles_avx2(const Q8Args& a, int64_t t0, int64_t t1) {
  // Register tiles as in q8_avxvnni.cpp (16 ymm registers, same accumulator counts).
  if (a.bits == 4) q8_tiles<4, 4, 1, 4>(a, t0, t1);
  else q8_tiles<3, 2, 1, 2>(a, t0, t1);
}

}  // namespace cpu
}  // namespace fade

#pragma GCC pop_options

#else  // not x86-64 GCC/Clang: never dispatched

namespace fade {
namespace cpu {
void q8_tiles_avx2(const Q8Args& a, int64_t t0, int64_t t1) { q8_tiles_scalar(a, t0, t1); }
}  // namespace cpu
}  // namespace fade

#endif
