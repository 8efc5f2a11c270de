// Torch-facing entry points of the CPU quantized matmul (qmatmul_cpu.cpp). The bindings
// (csrc/bindings/cpu_bindings.cpp) validate every tensor before calling these; these assume
// valid, contiguous inputs in the tiled CPU layout described in qmatmul_cpu.h.
#pragma once

#include <string>
#include <vector>

#include <torch/extension.h>

namespace fade {
namespace cpu {

// The kernel family in use ("avx512", "avx2" or "scalar"); chosen once from the CPU, or from
// FADE_CPU_ISA when set, and changeable with set_isa (tests drive every path on one machine).
std::string active_isa();
std::vector<std::string> supported_isas();
void set_isa(const std::string& name);  // throws if `name` is unknown or unsupported here
// "intel", "amd" or "other": MKL runs its AVX-512 sgemm kernels only on Intel CPUs.
std::string cpu_vendor();
// Whether the CPU has bf16 dot-product instructions (AVX512_BF16 or AMX-BF16), i.e. a fast bf16 GEMM.
bool cpu_has_bf16_dot();

// y = x @ dequant(W)^T + bias.
//   x      float32 / bfloat16 / float16 [M, K]            contiguous
//   words  int32   [T, K * bits / 32, 32]                  tiled qweight
//   scales float16 [T, G, 32]; zeros uint8 [T, G, 32]      tiled metadata (kernel groups)
//   dsum   int16   [T, G, 32]                              Σ (q − z) per kernel group
//   bias   float32 [N] or undefined
// path: "fused" (GEMV kernel), "dequant" (dequantize column chunks + dense GEMM) or "auto"
// (fused when M <= fused_max_m). words_q8: when given, the fused path is the int8-activation
// kernel on these words (qmatmul_cpu.h: the tiled words at 4-bit, the q8 layout at 3-bit). chunk_cols: columns of W dequantized per GEMM call on the
// dequant path (0 = automatic). Returns [M, N] in x's dtype.
at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& words, const at::Tensor& scales, const at::Tensor& zeros,
                   const at::Tensor& dsum, const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group_size, int64_t out_features,
                   const std::string& path, int64_t fused_max_m, int64_t chunk_cols,
                   const c10::optional<at::Tensor>& words_q8);

// Whether the active family's int8-activation kernel runs natively (VNNI) on this CPU.
bool q8_native();
// The AVX2 family's int8 kernel: AVX-VNNI when `enabled` and the CPU has it, else vpmaddubsw
// (tests drive both); returns which one is now used (true: AVX-VNNI).
bool use_avxvnni(bool enabled);
// The int8 kernels' activation quantizer on x float [M, K] (K a multiple of group_size):
// {q int8 [M, K], scale float32 [M, K/group_size], sum int32 [M, K/group_size]} (tests).
std::vector<at::Tensor> quantize_activations_q8(const at::Tensor& x, int64_t group_size);

// W^T as float32 [K, N] from the tiled layout (the large-M path's dequantizer, exposed for tests).
at::Tensor dequantize_t(const at::Tensor& words, const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                        int64_t group_size, int64_t out_features);

}  // namespace cpu
}  // namespace fade
