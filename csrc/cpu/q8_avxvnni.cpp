// AVX-VNNI (256-bit, VEX-encoded vpdpbusd, on AVX2 CPUs such as Alder Lake and Zen 5 client
// parts) instantiation of the int8-activation kernel (q8_simd.inc). qmatmul_cpu.cpp calls it
// only when the CPU reports AVX-VNNI.
#include <stddef.h>
#include <stdint.h>

#include "qmatmul_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avxvnni,avx2,fma,f16c")

namespace fade {
namespace cpu {
namespace {

#include "simd_avx2.inc"

struct V : Simd256 {
  static constexpr bool kNarrowProducts = false;
  static FADE_INLINE I zeroi() { return _mm256_setzero_si256(); }
  static FADE_INLINE I addi(I a, I b) { return _mm256_add_epi32(a, b); }
  template <int S> static FADE_INLINE I srai(I a) { return _mm256_srai_epi32(a, S); }
  static FADE_INLINE I dp(I acc, I codes, const int8_t* x) {
    int32_t v;
    __builtin_memcpy(&v, x, 4);
    return _mm256_dpbusd_avx_epi32(acc, codes, _mm256_set1_epi32(v));
  }
};

#include "q8_simd.inc"

}  // namespace

void q8_tiles_avxvnni(const Q8Args& a, int64_t t0, int64_t t1) {
  // 16 ymm registers. 4-bit: one row 2 x 4 vectors, more rows 2 x 4 x 1 accumulators;
  // 3-bit: one row 5 x 2, more rows 5 x 2 x 1 (register tiles of two rows).
  if (a.bits == 4) q8_tiles<4, 4, 1, 4>(a, t0, t1);
  else q8_tiles<3, 2, 1, 2>(a, t0, t1);
}

}  // namespace cpu
}  // namespace fade

#pragma GCC pop_options

#else  // not x86-64 GCC/Clang: never dispatched

namespace fade {
namespace cpu {
void q8_tiles_avxvnni(const Q8Args& a, int64_t t0, int64_t t1) { q8_tiles_scalar(a, t0, t1); }
}  // namespace cpu
}  // namespace fade

#endif
