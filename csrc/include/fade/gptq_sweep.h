// Torch-free interface of the fused GPTQ in-block sweep on the CPU (csrc/cpu/gptq_sweep.cpp).
//
// One call runs the inner loop of GPTQ (docs/methods.md §3, step 4) over the sweep columns
// [i1, i2) of a weight matrix already permuted into sweep order; the lazy trailing update
// W[:, i2:] -= E @ U[i1:i2, i2:] stays with the caller (one GEMM). It is the float32
// operations of fade_kernels/solver/gptq.py (_sweep_block_torch) in the same order, so codes,
// scales, zeros, errors and losses are bit-identical to the torch loop (no FMA contraction,
// no reassociation; the file is compiled with fp-contract off).
#pragma once

#include <stdint.h>

namespace fade {
namespace cpu {

struct GptqSweepArgs {
  // W float32 [N, ldw >= K], row-major, sweep order, read only. Columns [i1, i2) are the block;
  // when a group entered inside the block runs past i2 (group wider than the rest of the
  // block), its grid also reads columns [i2, group end) as they are (lazy updates only).
  const float* W;
  int64_t ldw;
  int64_t N, K;
  // U float32 [K, ldu >= K], upper Cholesky factor of H^-1 in sweep order; rows and columns
  // [i1, i2) are read.
  const float* U;
  int64_t ldu;
  int64_t i1, i2;        // 0 <= i1 < i2 <= K
  int bits;              // 2, 3, 4 or 8
  bool sym;
  int64_t group_size;    // effective width g (divides K; K itself for one group per row)
  // Static groups (act-order): group of each sweep column [K] int32, grids precomputed in
  // scales/zeros and only read. nullptr: groups are sweep columns [c*g, (c+1)*g), and a
  // group's grid is computed when the sweep enters it and written to scales/zeros.
  const int32_t* g_idx;
  float* scales;         // [N, n_groups] float32, float16-representable
  float* zeros;          // [N, n_groups] float32, integer-valued
  int64_t n_groups;
  int32_t* codes;        // [N, K] int32, sweep order; columns [i1, i2) are written
  float* err;            // [N, i2 - i1] float32 written: (w - q) / U[i, i], the lazy update's E
  float* loss;           // [N] float32, err^2 accumulated column after column
};

enum class SweepIsa : int { kAuto = 0, kAvx512 = 1, kAvx2 = 2, kGeneric = 3 };

// Status codes (the binding turns them into messages).
constexpr int kSweepOk = 0;
constexpr int kSweepBadArgs = 1;      // a size or index out of range (see gptq_sweep_check)
constexpr int kSweepIsaMissing = 2;   // the requested ISA is not supported by this CPU

// Runs the block sweep over rows in parallel (OpenMP). Returns a status code.
int gptq_sweep_block(const GptqSweepArgs& args, SweepIsa isa);

// "avx512", "avx2" or "generic": what kAuto picks on this CPU.
const char* gptq_sweep_best_isa();
// Whether this CPU can run `isa` (kAuto and kGeneric: always).
bool gptq_sweep_isa_supported(SweepIsa isa);

}  // namespace cpu
}  // namespace fade
