// fade_kernels._C: thin pybind11 boundary of the CPU kernels. Every tensor is checked here
// (device, dtype, shape, contiguity) and errors name the argument and the constraint; the
// kernels behind (csrc/cpu) assume valid input.
#include <torch/extension.h>

#include "../cpu/qmatmul_cpu.h"
#include "../cpu/qmatmul_torch.h"
#include "fade/gptq_sweep.h"

namespace {

using fade::cpu::kTileN;

void check_cpu_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_dtype(const at::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, name, " must be ", c10::toString(want), ", got ", t.scalar_type());
}

// Checks the tiled layout (qmatmul_cpu.h) and returns K.
int64_t check_tiled(const at::Tensor& words, const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                    int64_t group_size, int64_t out_features) {
  TORCH_CHECK(bits == 3 || bits == 4, "bits must be 3 or 4 for the CPU kernels, got ", bits);
  TORCH_CHECK(out_features > 0, "out_features must be positive, got ", out_features);
  check_cpu_contiguous(words, "words");
  check_cpu_contiguous(scales, "scales");
  check_cpu_contiguous(zeros, "zeros");
  check_dtype(words, "words", at::kInt);
  check_dtype(scales, "scales", at::kHalf);
  check_dtype(zeros, "zeros", at::kByte);
  const int64_t tiles = (out_features + kTileN - 1) / kTileN;
  TORCH_CHECK(words.dim() == 3 && words.size(0) == tiles && words.size(2) == kTileN,
              "words must have shape [ceil(out_features/", kTileN, ")=", tiles, ", K*bits/32, ", kTileN, "], got ",
              words.sizes());
  TORCH_CHECK(words.size(1) % bits == 0, "words.size(1)=", words.size(1), " must be a multiple of bits=", bits,
              " (K must be a multiple of 32)");
  const int64_t K = words.size(1) * 32 / bits;
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0, "group_size must be a positive multiple of 32, got ", group_size);
  TORCH_CHECK(K % group_size == 0, "group_size=", group_size, " must divide K=", K);
  const int64_t G = K / group_size;
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == tiles && scales.size(1) == G && scales.size(2) == kTileN,
              "scales must have shape [", tiles, ", ", G, ", ", kTileN, "], got ", scales.sizes());
  TORCH_CHECK(zeros.sizes() == scales.sizes(), "zeros must have shape ", scales.sizes(), ", got ", zeros.sizes());
  return K;
}

at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& words, const at::Tensor& scales, const at::Tensor& zeros,
                   const at::Tensor& dsum, const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group_size, int64_t out_features,
                   const std::string& path, int64_t fused_max_m, int64_t chunk_cols,
                   const c10::optional<at::Tensor>& words_q8) {
  const int64_t K = check_tiled(words, scales, zeros, bits, group_size, out_features);
  if (words_q8.has_value() && words_q8->defined()) {
    check_cpu_contiguous(*words_q8, "words_q8");
    check_dtype(*words_q8, "words_q8", at::kInt);
    TORCH_CHECK(words_q8->sizes() == words.sizes(), "words_q8 must have the shape of words ", words.sizes(), ", got ",
                words_q8->sizes());
    TORCH_CHECK(group_size <= fade::cpu::kQ8MaxGroup, "group_size must be at most ", fade::cpu::kQ8MaxGroup,
                " for the int8 kernel, got ", group_size);
  }
  check_cpu_contiguous(dsum, "dsum");
  check_dtype(dsum, "dsum", at::kShort);
  TORCH_CHECK(dsum.sizes() == scales.sizes(), "dsum must have shape ", scales.sizes(), ", got ", dsum.sizes());
  TORCH_CHECK(group_size * ((1 << bits) - 1) <= 32767, "group_size=", group_size,
              " is too large for int16 dsum (split groups to at most ", 32767 / ((1 << bits) - 1), " inputs)");
  check_cpu_contiguous(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [M, K] (flatten leading dimensions first), got shape ", x.sizes());
  TORCH_CHECK(x.size(1) == K, "x.size(1) must equal in_features K=", K, ", got ", x.size(1));
  if (bias.has_value() && bias->defined()) {
    check_cpu_contiguous(*bias, "bias");
    check_dtype(*bias, "bias", at::kFloat);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, "bias must have shape [", out_features, "], got ",
                bias->sizes());
  }
  TORCH_CHECK(path == "auto" || path == "fused" || path == "dequant",
              "path must be 'auto', 'fused' or 'dequant', got '", path, "'");
  TORCH_CHECK(chunk_cols >= 0, "chunk_cols must be >= 0 (0 = automatic), got ", chunk_cols);
  return fade::cpu::qmatmul(x, words, scales, zeros, dsum, bias, bits, group_size, out_features, path, fused_max_m,
                            chunk_cols, words_q8);
}

at::Tensor dequantize_t(const at::Tensor& words, const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                        int64_t group_size, int64_t out_features) {
  check_tiled(words, scales, zeros, bits, group_size, out_features);
  return fade::cpu::dequantize_t(words, scales, zeros, bits, group_size, out_features);
}

// A float32 CPU matrix whose rows may be strided (a view of a wider matrix) but whose
// elements within a row are contiguous, as the sweep reads them.
void check_row_major(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  check_dtype(t, name, at::kFloat);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, " must have shape [", rows, ", ", cols,
              "], got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1 && t.stride(0) >= cols, name, " must have unit column stride and row stride >= ", cols,
              " (row-major), got strides ", t.strides());
}

fade::cpu::SweepIsa parse_sweep_isa(const std::string& isa) {
  if (isa == "auto") return fade::cpu::SweepIsa::kAuto;
  if (isa == "avx512") return fade::cpu::SweepIsa::kAvx512;
  if (isa == "avx2") return fade::cpu::SweepIsa::kAvx2;
  if (isa == "generic") return fade::cpu::SweepIsa::kGeneric;
  TORCH_CHECK(false, "isa must be 'auto', 'avx512', 'avx2' or 'generic', got '", isa, "'");
}

void gptq_sweep_block(const at::Tensor& W, const at::Tensor& U, int64_t i1, int64_t i2, int64_t bits, bool sym,
                      int64_t group_size, const c10::optional<at::Tensor>& g_idx, const at::Tensor& scales, const at::Tensor& zeros,
                      const at::Tensor& codes, const at::Tensor& err, const at::Tensor& loss, const std::string& isa) {
  TORCH_CHECK(W.dim() == 2, "W must be 2-D [N, K], got shape ", W.sizes());
  const int64_t N = W.size(0), K = W.size(1);
  TORCH_CHECK(K > 0, "W must have at least one column");
  check_row_major(W, "W", N, K);
  check_row_major(U, "U", K, K);
  TORCH_CHECK(0 <= i1 && i1 < i2 && i2 <= K, "the block [i1, i2) must satisfy 0 <= i1 < i2 <= K=", K, ", got [", i1,
              ", ", i2, ")");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(group_size > 0 && K % group_size == 0, "group_size must be positive and divide K=", K, " (pass K for "
              "one group per row), got ", group_size);
  const int64_t G = K / group_size;
  for (const at::Tensor* t : {&scales, &zeros}) {
    const char* name = t == &scales ? "scales" : "zeros";
    check_cpu_contiguous(*t, name);
    check_dtype(*t, name, at::kFloat);
    TORCH_CHECK(t->dim() == 2 && t->size(0) == N && t->size(1) == G, name, " must have shape [", N, ", K/group_size=",
                G, "], got ", t->sizes());
  }
  check_cpu_contiguous(codes, "codes");
  check_dtype(codes, "codes", at::kInt);
  TORCH_CHECK(codes.dim() == 2 && codes.size(0) == N && codes.size(1) == K, "codes must have shape [", N, ", ", K,
              "], got ", codes.sizes());
  check_cpu_contiguous(err, "err");
  check_dtype(err, "err", at::kFloat);
  TORCH_CHECK(err.dim() == 2 && err.size(0) == N && err.size(1) == i2 - i1, "err must have shape [", N, ", i2-i1=",
              i2 - i1, "], got ", err.sizes());
  check_cpu_contiguous(loss, "loss");
  check_dtype(loss, "loss", at::kFloat);
  TORCH_CHECK(loss.dim() == 1 && loss.size(0) == N, "loss must have shape [", N, "], got ", loss.sizes());
  const int32_t* g_idx_ptr = nullptr;
  if (g_idx.has_value() && g_idx->defined()) {
    check_cpu_contiguous(*g_idx, "g_idx");
    check_dtype(*g_idx, "g_idx", at::kInt);
    TORCH_CHECK(g_idx->dim() == 1 && g_idx->size(0) == K, "g_idx must have shape [", K, "], got ", g_idx->sizes());
    const auto block = g_idx->slice(0, i1, i2);
    TORCH_CHECK(block.min().item<int32_t>() >= 0 && block.max().item<int32_t>() < G,
                "g_idx[i1:i2] must lie in [0, K/group_size=", G, ")");
    g_idx_ptr = g_idx->data_ptr<int32_t>();
  }
  const fade::cpu::SweepIsa which = parse_sweep_isa(isa);
  TORCH_CHECK(fade::cpu::gptq_sweep_isa_supported(which), "isa='", isa, "' is not supported by this CPU (best: ",
              fade::cpu::gptq_sweep_best_isa(), ")");

  fade::cpu::GptqSweepArgs a;
  a.W = W.data_ptr<float>();
  a.ldw = W.stride(0);
  a.N = N;
  a.K = K;
  a.U = U.data_ptr<float>();
  a.ldu = U.stride(0);
  a.i1 = i1;
  a.i2 = i2;
  a.bits = (int)bits;
  a.sym = sym;
  a.group_size = group_size;
  a.g_idx = g_idx_ptr;
  a.scales = scales.data_ptr<float>();
  a.zeros = zeros.data_ptr<float>();
  a.n_groups = G;
  a.codes = codes.data_ptr<int32_t>();
  a.err = err.data_ptr<float>();
  a.loss = loss.data_ptr<float>();
  int status;
  {
    pybind11::gil_scoped_release no_gil;
    status = fade::cpu::gptq_sweep_block(a, which);
  }
  TORCH_CHECK(status == fade::cpu::kSweepOk, "gptq_sweep_block failed with status ", status,
              " (an argument passed the checks but not the kernel's: please report)");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fade-kernels CPU kernels: fused 3/4-bit dequant-GEMV, tile dequant + dense GEMM, fused GPTQ block sweep";
  m.attr("TILE_N") = kTileN;
  m.def("qmatmul", &qmatmul, "y[M,N] = x[M,K] @ dequant(tiled W)^T + bias", py::arg("x"), py::arg("words"),
        py::arg("scales"), py::arg("zeros"), py::arg("dsum"), py::arg("bias"), py::arg("bits"), py::arg("group_size"),
        py::arg("out_features"), py::arg("path") = "auto", py::arg("fused_max_m") = 32, py::arg("chunk_cols") = 0,
        py::arg("words_q8") = py::none());
  m.def("q8_native", &fade::cpu::q8_native, "the active family's int8-activation kernel runs as SIMD code on this CPU");
  m.def("quantize_activations_q8", [](const at::Tensor& x, int64_t group_size) {
          TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a 2-D CPU tensor, got shape ", x.sizes());
          TORCH_CHECK(group_size > 0 && group_size <= fade::cpu::kQ8MaxGroup && x.size(1) % group_size == 0,
                      "group_size=", group_size, " must divide K=", x.size(1), " and be at most ", fade::cpu::kQ8MaxGroup);
          return fade::cpu::quantize_activations_q8(x, group_size);
        }, "the int8 kernels' activation quantizer: (q int8 [M,K], scale fp32 [M,G], sum int32 [M,G])",
        py::arg("x"), py::arg("group_size"));
  m.def("dequantize_t", &dequantize_t, "W^T float32 [K, N] from the tiled layout", py::arg("words"),
        py::arg("scales"), py::arg("zeros"), py::arg("bits"), py::arg("group_size"), py::arg("out_features"));
  m.def("active_isa", &fade::cpu::active_isa, "kernel family in use: 'avx512', 'avx2' or 'scalar'");
  m.def("supported_isas", &fade::cpu::supported_isas, "kernel families this CPU can run, best first");
  m.def("use_avxvnni", &fade::cpu::use_avxvnni,
        "AVX2 int8 kernel: AVX-VNNI if enabled and present, else vpmaddubsw (tests); returns the choice",
        py::arg("enabled"));
  m.def("set_isa", &fade::cpu::set_isa, "force a kernel family (tests)", py::arg("name"));
  m.def("cpu_vendor", &fade::cpu::cpu_vendor, "'intel', 'amd' or 'other'");
  m.def("gptq_sweep_block", &gptq_sweep_block,
        "GPTQ in-block sweep over sweep columns [i1, i2) (fade/gptq_sweep.h); writes codes[:, i1:i2], err, loss, "
        "and the grids of groups entered in the block",
        py::arg("W"), py::arg("U"), py::arg("i1"), py::arg("i2"), py::arg("bits"), py::arg("sym"), py::arg("group_size"),
        py::arg("g_idx"), py::arg("scales"), py::arg("zeros"), py::arg("codes"), py::arg("err"), py::arg("loss"),
        py::arg("isa") = "auto");
  m.def("gptq_sweep_best_isa", &fade::cpu::gptq_sweep_best_isa, "what isa='auto' picks for the GPTQ sweep");
  m.def("cpu_has_bf16_dot", &fade::cpu::cpu_has_bf16_dot, "AVX512_BF16 or AMX-BF16 present");
}
