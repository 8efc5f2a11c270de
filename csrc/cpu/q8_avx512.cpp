// AVX-512 VNNI instantiation of the int8-activation kernel (q8_simd.inc). Same structure as
// qgemv_avx512.cpp: only the code below the `#pragma GCC target` uses these instructions, it
// sits in an anonymous namespace, and qmatmul_cpu.cpp calls it only when the CPU has
// AVX512_VNNI and AVX512BW.
#include <stddef.h>
#include <stdint.h>

#include "qmatmul_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace fade {
namespace cpu {
namespace {

#include "simd_avx512.inc"

struct V : Simd512 {
  static constexpr bool kNarrowProducts = false;
  static FADE_INLINE I zeroi() { return _mm512_setzero_si512(); }
  static FADE_INLINE I addi(I a, I b) { return _mm512_add_epi32(a, b); }
  template <int S> static FADE_INLINE I srai(I a) { return _mm512_srai_epi32(a, S); }
  // The broadcast folds into vpdpbusd's {1to16} memory operand.
  static FADE_INLINE I dp(I acc, I codes, const int8_t* x) {
    int32_t v;
    __builtin_memcpy(&v, x, 4);
    return _mm512_dpbusd_epi32(acc, codes, _mm512_set1_epi32(v));
  }
};

#include "q8_simd.inc"

}  // namespace

void q8_tiles_avx512(const Q8Args& a, int64_t t0, int64_t t1) {
  // 4-bit: 2 positions x 4 rows x 2 vectors = 16 accumulators of 32 zmm; 3-bit: 5 x 4 x 1 = 20.
  if (a.bits == 4) q8_tiles<4, 2, 2, kQ8RowBlock>(a, t0, t1);
  else q8_tiles<3, 2, 1, kQ8RowBlock>(a, t0, t1);
}

}  // namespace cpu
}  // namespace fade

#pragma GCC diagnostic pop
#pragma GCC pop_options

#else  // not x86-64 GCC/Clang: never dispatched

namespace fade {
namespace cpu {
void q8_tiles_avx512(const Q8Args& a, int64_t t0, int64_t t1) { q8_tiles_scalar(a, t0, t1); }
}  // namespace cpu
}  // namespace fade

#endif
