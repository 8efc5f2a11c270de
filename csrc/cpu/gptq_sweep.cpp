// Fused GPTQ in-block sweep for the CPU (interface and contract: fade/gptq_sweep.h).
//
// Rows are independent given U, so the rows are cut into tiles of kLanes = 32 rows and each
// OpenMP thread sweeps whole tiles. A tile's block is transposed into a column-major buffer
// tile[j * kLanes + l] (column j of the block, row l of the tile; 128 x 32 floats = 16 KB, in
// L1), so that every step is a loop over the tile's rows, which the compiler turns into two
// AVX-512 vectors (four AVX2 vectors):
//   - grid of a group entered at column i: min/max over its columns, per row;
//   - quantize column i, err = (w - q) / U[i, i];
//   - update of the later columns: tile[j] -= err * U[i, j] for j > i, done for a panel of up
//     to 4 columns at once (each later column is loaded and stored once per panel).
// Codes and errors stay in the tile until the block is done, then go out row by row.
//
// Bit-exactness with the torch loop (fade_kernels/solver/gptq.py, _sweep_block_torch): every
// element sees the same IEEE float32 operations in the same order as there:
//   torch: W1[:, i:] -= err[:, None] * U1[i, i:]   a product rounded, then a difference rounded
//   here:  t = e * u; w = w - t                     the same two roundings
// which holds only without FMA contraction, hence the `fp-contract=off` pragma below (GCC
// contracts across statements by default, even with -std=c++17). Divisions stay divisions
// (torch divides by a Python scalar with a true division too), rounding is round-half-even
// (std::nearbyint, as torch.round), and min/max are exact in any order.
// Column i itself is not updated (the torch loop updates it, but never reads it again).
#include "fade/gptq_sweep.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define FADE_SWEEP_X86 1
#endif

#pragma GCC optimize("fp-contract=off")

#define FADE_SWEEP_INLINE inline __attribute__((always_inline))

namespace fade {
namespace cpu {
namespace {

// Rows per tile: two AVX-512 vectors of float32 (two independent dependency chains through the
// divisions of each column's quantization; the 128-column tile is 16 KB, in L1).
constexpr int kLanes = 32;

// The smallest positive float16 subnormal: the floor of every scale (solver/grid.py).
constexpr float kMinFp16Scale = 5.9604644775390625e-08f;  // 2^-24

FADE_SWEEP_INLINE float min_f(float a, float b) { return b < a ? b : a; }
FADE_SWEEP_INLINE float max_f(float a, float b) { return b > a ? b : a; }

// The smallest float16-representable value >= v, as a float32, for v >= 2^-24 (solver/grid.py
// _round_up_to_float16: round to nearest float16, bump up by one ulp if that fell below v).
// Both are "ceil to the float16 grid": below 2^-14 the float16 grid is the subnormal spacing
// 2^-24; above, float16 keeps 10 of float32's 23 mantissa bits, so clearing the low 13 bits
// after adding 2^13 - 1 rounds up (a carry into the exponent is the next binade, as wanted).
// Values above the largest float16 (65504) become inf, as float16(v) does.
FADE_SWEEP_INLINE float round_up_to_float16(float v) {
  uint32_t bits;
  memcpy(&bits, &v, sizeof bits);
  bits = (bits + 0x1FFFu) & ~0x1FFFu;
  float normal;
  memcpy(&normal, &bits, sizeof normal);
  const float subnormal = ceilf(v * 16777216.0f) * 5.9604644775390625e-08f;  // exact: powers of 2
  const float r = v < 6.103515625e-05f ? subnormal : normal;                  // 2^-14
  return r > 65504.0f ? INFINITY : r;
}

// Grid of one group per row from its per-row min and max (solver/grid.py compute_grid).
FADE_SWEEP_INLINE void grid_from_range(const float* mn, const float* mx, int bits, bool sym, float* s, float* z) {
  const float maxq = (float)((1 << bits) - 1);
  if (sym) {
    const float half_range = (float)((1 << (bits - 1)) - 1);
    const float mid = (float)(1 << (bits - 1));
    for (int l = 0; l < kLanes; ++l) {
      const float amax = max_f(-mn[l], mx[l]);  // max |w|, exact
      float scale = amax / half_range;
      scale = amax == 0.0f ? 1.0f : scale;
      s[l] = round_up_to_float16(max_f(scale, kMinFp16Scale));
      z[l] = mid;
    }
  } else {
    for (int l = 0; l < kLanes; ++l) {
      const float wmin = min_f(mn[l], 0.0f);
      const float wmax = max_f(mx[l], 0.0f);
      float scale = (wmax - wmin) / maxq;
      scale = wmax == wmin ? 1.0f : scale;
      const float sc = round_up_to_float16(max_f(scale, kMinFp16Scale));
      s[l] = sc;
      z[l] = min_f(max_f(nearbyintf(-wmin / sc), 0.0f), maxq);
    }
  }
}

// Pushes the errors e[0..P) of the panel's columns onto tile columns [j0, j1), in the
// reference's order: for each element, e[0]'s product first, then e[1]'s, ... Touching each
// column once for P errors (instead of P times) is what makes the update cheap: it is bound by
// loads and stores of the tile, not by arithmetic.
template <int P>
FADE_SWEEP_INLINE void push_errors(float* tile, int64_t j0, int64_t j1, const float (*e)[kLanes],
                                   const float* const* u) {
  for (int64_t j = j0; j < j1; ++j) {
    float* __restrict c = tile + j * kLanes;
    float uj[P];
    for (int p = 0; p < P; ++p) uj[p] = u[p][j];
    for (int l = 0; l < kLanes; ++l) {
      float x = c[l];
      for (int p = 0; p < P; ++p) {
        const float t = e[p][l] * uj[p];
        x = x - t;
      }
      c[l] = x;
    }
  }
}

// The sweep of one tile of rows [r0, r0 + kLanes) over the block; rows >= N are zero padding
// (an all-zero row gets scale 1 and error 0, and nothing of it is written back).
// tile: kLanes * B floats (the block, column-major); qtile: kLanes * B int32 (codes).
FADE_SWEEP_INLINE void sweep_tile(const GptqSweepArgs& a, int64_t r0, float* tile, int32_t* qtile) {
  const int64_t B = a.i2 - a.i1;
  const int64_t rows = a.N - r0 < kLanes ? a.N - r0 : kLanes;
  const int64_t g = a.group_size;
  const float maxq = (float)((1 << a.bits) - 1);

  for (int64_t l = 0; l < kLanes; ++l) {
    const float* src = a.W + (r0 + l) * a.ldw + a.i1;
    if (l < rows) {
      for (int64_t j = 0; j < B; ++j) tile[j * kLanes + l] = src[j];
    } else {
      for (int64_t j = 0; j < B; ++j) tile[j * kLanes + l] = 0.0f;
    }
  }

  float s[kLanes], z[kLanes], loss[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    s[l] = 1.0f;
    z[l] = 0.0f;
    loss[l] = l < rows ? a.loss[r0 + l] : 0.0f;
  }
  int64_t loaded_group = -1;
  auto load_grid = [&](int64_t grp) {
    for (int64_t l = 0; l < rows; ++l) {
      s[l] = a.scales[(r0 + l) * a.n_groups + grp];
      z[l] = a.zeros[(r0 + l) * a.n_groups + grp];
    }
    loaded_group = grp;
  };

  // Panels of up to kPanel columns: quantize them one by one (each first receives the errors
  // of the panel's earlier columns), then push all their errors onto the rest of the block at
  // once. A group entered at column i reads the weights "as updated so far", so a panel never
  // runs over a group start.
  constexpr int kPanel = 4;
  for (int64_t i = 0; i < B;) {
    int64_t panel = B - i < kPanel ? B - i : kPanel;
    if (a.g_idx == nullptr) {
      const int64_t to_next_group = g - (a.i1 + i) % g;
      if (to_next_group < panel) panel = to_next_group;
    }
    float e[kPanel][kLanes];
    const float* u[kPanel];
    for (int64_t p = 0; p < panel; ++p) {
      const int64_t col = a.i1 + i + p;
      float* w = tile + (i + p) * kLanes;
      if (a.g_idx != nullptr) {
        if (a.g_idx[col] != loaded_group) load_grid(a.g_idx[col]);
      } else if (col % g == 0) {
        // Entering a group (always at p == 0): its grid on the weights as updated so far (the
        // block's columns from the tile, columns past the block from W as they are).
        float mn[kLanes], mx[kLanes];
        for (int l = 0; l < kLanes; ++l) mn[l] = mx[l] = w[l];
        const int64_t end_in_block = i + g < B ? i + g : B;
        for (int64_t j = i + 1; j < end_in_block; ++j) {
          const float* c = tile + j * kLanes;
          for (int l = 0; l < kLanes; ++l) {
            mn[l] = min_f(mn[l], c[l]);
            mx[l] = max_f(mx[l], c[l]);
          }
        }
        if (col + g > a.i2) {
          for (int64_t l = 0; l < rows; ++l) {
            const float* src = a.W + (r0 + l) * a.ldw;
            for (int64_t c = a.i2; c < col + g; ++c) {
              mn[l] = min_f(mn[l], src[c]);
              mx[l] = max_f(mx[l], src[c]);
            }
          }
        }
        grid_from_range(mn, mx, a.bits, a.sym, s, z);
        const int64_t grp = col / g;
        for (int64_t l = 0; l < rows; ++l) {
          a.scales[(r0 + l) * a.n_groups + grp] = s[l];
          a.zeros[(r0 + l) * a.n_groups + grp] = z[l];
        }
        loaded_group = grp;
      } else if (loaded_group < 0) {
        load_grid(col / g);  // a group entered in an earlier block
      }

      u[p] = a.U + col * a.ldu + a.i1;  // row i + p of the block of U
      const float d = u[p][i + p];
      int32_t* qcol = qtile + (i + p) * kLanes;
      for (int l = 0; l < kLanes; ++l) {
        const float q = min_f(max_f(nearbyintf(w[l] / s[l]) + z[l], 0.0f), maxq);
        const float deq = (q - z[l]) * s[l];
        const float err = (w[l] - deq) / d;
        loss[l] = loss[l] + err * err;
        e[p][l] = err;
        qcol[l] = (int32_t)q;
        w[l] = err;  // column i + p is never read again as a weight: it keeps the error
      }
      // The panel's later columns get this error now, before they are quantized.
      for (int64_t j = i + p + 1; j < i + panel; ++j) {
        float* __restrict c = tile + j * kLanes;
        const float uj = u[p][j];
        for (int l = 0; l < kLanes; ++l) {
          const float t = e[p][l] * uj;
          c[l] = c[l] - t;
        }
      }
    }
    switch (panel) {  // the rest of the block, each column touched once for the whole panel
      case 4: push_errors<4>(tile, i + 4, B, e, u); break;
      case 3: push_errors<3>(tile, i + 3, B, e, u); break;
      case 2: push_errors<2>(tile, i + 2, B, e, u); break;
      default: push_errors<1>(tile, i + 1, B, e, u); break;
    }
    i += panel;
  }

  for (int64_t l = 0; l < rows; ++l) {  // row-major write-out of the tile's codes and errors
    int32_t* codes = a.codes + (r0 + l) * a.K + a.i1;
    float* err = a.err + (r0 + l) * B;
    for (int64_t j = 0; j < B; ++j) {
      codes[j] = qtile[j * kLanes + l];
      err[j] = tile[j * kLanes + l];
    }
    a.loss[r0 + l] = loss[l];
  }
}

// One instantiation of the tile sweep per ISA: the same source, compiled for each target by
// inlining. The OpenMP region lives in the untargeted caller on purpose: GCC outlines a
// parallel region into a function with the *enclosing* function's target, so a region inside
// these would run untargeted code.
#ifdef FADE_SWEEP_X86
__attribute__((target("avx512f"))) void tile_avx512(const GptqSweepArgs& a, int64_t r0, float* tile, int32_t* q) {
  sweep_tile(a, r0, tile, q);
}
__attribute__((target("avx2"))) void tile_avx2(const GptqSweepArgs& a, int64_t r0, float* tile, int32_t* q) {
  sweep_tile(a, r0, tile, q);
}
#endif
void tile_generic(const GptqSweepArgs& a, int64_t r0, float* tile, int32_t* q) { sweep_tile(a, r0, tile, q); }

using TileFn = void (*)(const GptqSweepArgs&, int64_t, float*, int32_t*);

void sweep_rows(const GptqSweepArgs& a, TileFn tile_fn) {
  const int64_t tiles = (a.N + kLanes - 1) / kLanes;
#pragma omp parallel if (tiles > 1)
  {
    std::vector<float> tile((size_t)(a.i2 - a.i1) * kLanes);
    std::vector<int32_t> qtile((size_t)(a.i2 - a.i1) * kLanes);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tiles; ++t) tile_fn(a, t * kLanes, tile.data(), qtile.data());
  }
}

bool valid(const GptqSweepArgs& a) {
  if (a.N < 0 || a.K <= 0 || a.ldw < a.K || a.ldu < a.K) return false;
  if (a.i1 < 0 || a.i2 <= a.i1 || a.i2 > a.K) return false;
  if (!(a.bits == 2 || a.bits == 3 || a.bits == 4 || a.bits == 8)) return false;
  if (a.group_size <= 0 || a.K % a.group_size != 0 || a.n_groups != a.K / a.group_size) return false;
  return a.W && a.U && a.scales && a.zeros && a.codes && a.err && a.loss;
}

}  // namespace

bool gptq_sweep_isa_supported(SweepIsa isa) {
#ifdef FADE_SWEEP_X86
  if (isa == SweepIsa::kAvx512) return __builtin_cpu_supports("avx512f");
  if (isa == SweepIsa::kAvx2) return __builtin_cpu_supports("avx2");
#else
  if (isa == SweepIsa::kAvx512 || isa == SweepIsa::kAvx2) return false;
#endif
  return true;
}

const char* gptq_sweep_best_isa() {
  if (gptq_sweep_isa_supported(SweepIsa::kAvx512)) return "avx512";
  if (gptq_sweep_isa_supported(SweepIsa::kAvx2)) return "avx2";
  return "generic";
}

int gptq_sweep_block(const GptqSweepArgs& a, SweepIsa isa) {
  if (!valid(a)) return kSweepBadArgs;
  if (!gptq_sweep_isa_supported(isa)) return kSweepIsaMissing;
  if (isa == SweepIsa::kAuto) {
    isa = gptq_sweep_isa_supported(SweepIsa::kAvx512) ? SweepIsa::kAvx512
          : gptq_sweep_isa_supported(SweepIsa::kAvx2) ? SweepIsa::kAvx2
                                                      : SweepIsa::kGeneric;
  }
  if (a.N == 0) return kSweepOk;
  TileFn tile_fn = tile_generic;
#ifdef FADE_SWEEP_X86
  if (isa == SweepIsa::kAvx512) tile_fn = tile_avx512;
  if (isa == SweepIsa::kAvx2) tile_fn = tile_avx2;
#endif
  sweep_rows(a, tile_fn);
  return kSweepOk;
}

}  // namespace cpu
}  // namespace fade
