// CPU quantized matmul driver: ISA dispatch, activation pre-processing, threading, and the
// large-M path (dequantize column chunks of W, then the dense GEMM torch already has).
#include "qmatmul_torch.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>
#include <cmath>
#include <algorithm>

#include <ATen/Parallel.h>

#include "fade/bitpack.h"
#include "qmatmul_cpu.h"

namespace fade {
namespace cpu {
namespace {

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"scalar", "avx2", "avx512"};

bool cpu_has(Isa isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  // libgcc's cpu model also checks XCR0, i.e. that the OS saves the wider registers.
  if (isa == kAvx512) return __builtin_cpu_supports("avx512f");
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
  return isa == kScalar;
}

bool cpu_has_avxvnni() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avxvnni");
#else
  return false;
#endif
}

// Whether the AVX2 family's int8 kernel uses AVX-VNNI (where the CPU has it) or vpmaddubsw.
std::atomic<bool>& avxvnni_slot() {
  static std::atomic<bool> use{cpu_has_avxvnni()};
  return use;
}

// Whether the int8-activation kernel of a family runs as SIMD code on this CPU: AVX-512 needs
// VNNI (vpdpbusd); the AVX2 family runs vpdpbusd with AVX-VNNI, else vpmaddubsw/vpmaddwd
// (q8_avx2.cpp). The portable family always can (plain C++).
bool cpu_has_q8(Isa isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (isa == kAvx512) return cpu_has(kAvx512) && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
  if (isa == kAvx2) return cpu_has(kAvx2);
#endif
  return isa == kScalar;
}

int parse_isa(const std::string& name) {
  for (int i = 0; i < 3; ++i)
    if (name == kIsaNames[i]) return i;
  return -1;
}

int detect_isa() {
  if (const char* env = std::getenv("FADE_CPU_ISA")) {
    const int want = parse_isa(env);
    if (want >= 0 && cpu_has(Isa(want))) return want;  // an unusable request falls back to detection
  }
  return cpu_has(kAvx512) ? kAvx512 : cpu_has(kAvx2) ? kAvx2 : kScalar;
}

std::atomic<int>& isa_slot() {
  static std::atomic<int> isa{detect_isa()};
  return isa;
}

// 2^e as a compile-time float (std::ldexp is not constexpr in C++17); exact for |e| < 126.
constexpr float pow2f(int e) {
  float f = 1.0f;
  for (; e > 0; --e) f *= 2.0f;
  for (; e < 0; ++e) f *= 0.5f;
  return f;
}

// Field FI of a 32-code run (bitpack.h "Fields"); a 4-bit run is 4 words of the 8-field table.
template <int BITS>
constexpr bitpack::Field run_field(int fi) {
  if (BITS == 3) return bitpack::kFieldTable3[fi];
  bitpack::Field f = bitpack::kFieldTable4[fi % bitpack::kFields4];
  f.word = fi / bitpack::kFields4;
  f.code = fi;
  return f;
}

// The pre-scale of field FI's activation (bitpack.h "Fields").
template <int BITS>
constexpr float field_factor(int fi) { return pow2f(bitpack::field_weight_log2(run_field<BITS>(fi))); }

// xs[f * stride] = x̃[code(f)] * 2^weight_log2(f) for every field f of one 32-code run: the
// activation each field value is multiplied by in the kernel. The field table is a compile-time
// constant, so this is straight-line code (loads, multiplies by constants, stores) that the
// compiler vectorizes when stride is the literal 1.
template <int BITS, size_t... FI>
inline void prescale_run(std::index_sequence<FI...>, const float* xc, float* xs, int64_t stride) {
  ((xs[int64_t(FI) * stride] = xc[run_field<BITS>(int(FI)).code] * field_factor<BITS>(int(FI))), ...);
}

template <int BITS>
void prescale_row(const float* xc, int64_t K, float* xs, int64_t stride) {
  constexpr int nf = bitpack::fields_per_run(BITS);
  using Seq = std::make_index_sequence<nf>;
  if (BITS == 4 && stride == 1) {
    // One row at 4 bits (every M = 1 call): field f is code f, the factor has period 8.
    constexpr float f4[8] = {field_factor<4>(0), field_factor<4>(1), field_factor<4>(2), field_factor<4>(3),
                             field_factor<4>(4), field_factor<4>(5), field_factor<4>(6), field_factor<4>(7)};
    for (int64_t k = 0; k < K; k += 8)
      for (int j = 0; j < 8; ++j) xs[k + j] = xc[k + j] * f4[j];
  } else if (stride == 1) {
    for (int64_t r = 0; r < K / 32; ++r) prescale_run<BITS>(Seq{}, xc + r * 32, xs + r * nf, 1);
  } else {
    for (int64_t r = 0; r < K / 32; ++r) prescale_run<BITS>(Seq{}, xc + r * 32, xs + r * nf * stride, stride);
  }
}

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

int row_block(int isa) { return isa == kAvx512 ? kRowBlockAvx512 : isa == kAvx2 ? kRowBlockAvx2 : kRowBlockScalar; }

// x -> group means μ, centred fp32 copy x̃ = x − μ (for the portable kernel) and its
// field-pre-scaled copy, in the row-block-interleaved layout of QGemvArgs.
// This runs serially before the threaded GEMV, so its cost adds to every M = 1 call in full:
// with one serial chain of double adds and a table-driven scalar scatter it cost ~3 µs more per
// call at K = 5120 (Zen 5), ~6% of a 2-thread large-v3 fc2 call.
template <typename T>
void prepare_activations(const T* x, int64_t M, int64_t K, int64_t group_size, int bits, int block, float* xf,
                         float* xs, int64_t ldxs, float* xmean) {
  const int64_t G = K / group_size;
  for (int64_t m0 = 0; m0 < M; m0 += block) {
    const int64_t mr = std::min<int64_t>(block, M - m0);
    float* xsb = xs + m0 * ldxs;
    float* xmeanb = xmean + m0 * G;
    for (int64_t i = 0; i < mr; ++i) {
      const T* xr = x + (m0 + i) * K;
      float* xc = xf + (m0 + i) * K;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t k0 = g * group_size;
        // Σ x(q − z) = Σ x̃ q + μ D − z Σ x̃ for any μ; the kernel drops z Σ x̃, which is 0 up to
        // the rounding of x̃ (an error of the order of rounding x itself). Eight independent
        // double partial sums (group_size is a multiple of 32) keep the adds pipelined.
        double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t k = k0; k < k0 + group_size; k += 8)
          for (int j = 0; j < 8; ++j) part[j] += to_float(xr[k + j]);
        const double s = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
        const float mu = float(s / double(group_size));
        for (int64_t k = k0; k < k0 + group_size; ++k) xc[k] = to_float(xr[k]) - mu;
        xmeanb[g * mr + i] = mu;
      }
      if (bits == 3) prescale_row<3>(xc, K, xsb + i, mr);
      else prescale_row<4>(xc, K, xsb + i, mr);
    }
  }
}

// Source code (0..31 within the run) of each activation byte of a run, in the order the int8
// kernels read them (qmatmul_cpu.h): 32 bytes at 4-bit, 40 at 3-bit.
constexpr int8_t kQ8Order4[32] = {0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15,
                                  16, 18, 20, 22, 17, 19, 21, 23, 24, 26, 28, 30, 25, 27, 29, 31};
constexpr int8_t kQ8Order3[40] = {0, 1, 2, 3, 12, 13, 14, 15, 24, 25, 26, 27,       // word 0: A, B, C lo
                                  4, 5, 6, 7, 16, 17, 18, 19, 28, 29, 30, 31,       // word 1: A, B, C lo
                                  8, 9, 10, 11, 20, 21, 22, 23, 24, 25, 26, 27,     // word 2: A, B, C hi (bit 6)
                                  28, 29, 30, 31};                                  //         C hi (bit 7)

// One group of n activations to int8: q = round_half_even(x * (127 / max|x|)); returns the
// scale max|x| / 127 (0 for an all-zero group, whose codes are then 0) and writes Σ q to *sum.
// The torch statement of the same rounding is fade_kernels.ops.reference.quantize_activations_q8.
// No contraction of x * inv + kRound into an FMA (which would round differently) in any build.
__attribute__((optimize("fp-contract=off"))) inline float quantize_group_q8(const float* x, int64_t n, int8_t* q,
                                                                            int32_t* sum) {
  // Written so that the compiler vectorizes it with the baseline ISA (this file is built without
  // -mavx*): a max reduction in the maxps form, and rounding by the 1.5 * 2^23 trick, which rounds
  // half to even in the default rounding mode for |v| <= 2^22 (here |v| <= 127); calling
  // nearbyintf per element cost ~5 ns each, 25 µs per call at K = 5120.
  float amax = 0.f;
  for (int64_t k = 0; k < n; ++k) {
    const float a = std::fabs(x[k]);
    amax = a > amax ? a : amax;
  }
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23
  int32_t s = 0;
  for (int64_t k = 0; k < n; ++k) {
    float v = (x[k] * inv + kRound) - kRound;
    v = v > 127.f ? 127.f : (v < -127.f ? -127.f : v);
    q[k] = int8_t(int32_t(v));
    s += q[k];
  }
  *sum = s;
  return amax / 127.f;
}

// x -> the int8 kernels' activation bytes, group scales and group sums (Q8Args layouts).
template <typename T>
void prepare_q8(const T* x, int64_t M, int64_t K, int64_t group_size, int bits, int8_t* xq, float* xscale,
                float* xsum) {
  const int64_t G = K / group_size, rb = q8_run_bytes(bits), K8 = K / 32 * rb;
  const int8_t* order = bits == 3 ? kQ8Order3 : kQ8Order4;
  float xf[kQ8MaxGroup];
  int8_t qg[kQ8MaxGroup];
  for (int64_t m0 = 0; m0 < M; m0 += kQ8RowBlock) {
    const int64_t mrb = std::min<int64_t>(kQ8RowBlock, M - m0);
    for (int64_t i = 0; i < mrb; ++i) {
      const T* xr = x + (m0 + i) * K;
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t k = 0; k < group_size; ++k) xf[k] = to_float(xr[g * group_size + k]);
        int32_t sum;
        xscale[m0 * G + g * mrb + i] = quantize_group_q8(xf, group_size, qg, &sum);
        xsum[m0 * G + g * mrb + i] = float(sum);
        for (int64_t r = 0; r < group_size / 32; ++r) {
          const int64_t run = g * (group_size / 32) + r;
          int8_t* dst = xq + m0 * K8 + (run * mrb + i) * rb;
          for (int64_t b = 0; b < rb; ++b) dst[b] = qg[r * 32 + order[b]];
        }
      }
    }
  }
}

void run_gemv(const QGemvArgs& a, int64_t T, int isa) {
  // Large M: sweep the columns once per pass of rows whose pre-scaled activations fit in L2
  // (~384 KB of the 1-2 MB), so every column tile re-reads them from L2 rather than L3/DRAM,
  // and the (small) packed weight is what gets re-streamed, once per pass.
  const int block = row_block(isa);
  const int64_t budget_rows = (int64_t(384) << 10) / (a.ldxs * int64_t(sizeof(float)));
  const int64_t pass_rows = std::max<int64_t>(block, budget_rows / block * block);
  // Split columns only when each thread gets enough work to amortise the fork/join (~ a few µs).
  const int64_t work_per_tile = a.K * kTileN * std::min(a.M, pass_rows);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(work_per_tile, 1));
  const size_t y_elem = a.y_bf16 ? sizeof(uint16_t) : sizeof(float);
  for (int64_t m0 = 0; m0 < a.M; m0 += pass_rows) {
    QGemvArgs p = a;  // rows [m0, m0 + p.M): blocks start at multiples of `block`, so offsets are plain
    p.M = std::min(pass_rows, a.M - m0);
    p.x = a.x + m0 * a.K;
    p.xs = a.xs + m0 * a.ldxs;
    p.xmean = a.xmean + m0 * a.G;
    p.y = static_cast<char*>(a.y) + m0 * a.ldy * y_elem;
    at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
      if (isa == kAvx512) qgemv_tiles_avx512(p, t0, t1);
      else if (isa == kAvx2) qgemv_tiles_avx2(p, t0, t1);
      else qgemv_tiles_scalar(p, t0, t1);
    });
  }
}

void run_dequant(const DequantArgs& a, int64_t t0, int64_t t1) {
  const int isa = isa_slot().load(std::memory_order_relaxed);
  at::parallel_for(t0, t1, 1, [&](int64_t b, int64_t e) {
    DequantArgs sub = a;
    // Output columns are relative to t0: shift the base so tile b lands at (b - t0) * kTileN.
    const int64_t offset = (b - t0) * kTileN;
    sub.out = a.out_bf16 ? static_cast<void*>(static_cast<uint16_t*>(a.out) + offset)
                         : static_cast<void*>(static_cast<float*>(a.out) + offset);
    if (isa == kAvx512) dequant_tiles_avx512(sub, b, e, 0, a.K);
    else if (isa == kAvx2) dequant_tiles_avx2(sub, b, e, 0, a.K);
    else dequant_tiles_scalar(sub, b, e, 0, a.K);
  });
}

// f(p) with x's elements as `const float*`, `const at::BFloat16*` or `const at::Half*` (the
// activation dtypes the kernels take; any other dtype fails in data_ptr's own type check).
template <class F>
void with_float_data(const at::Tensor& x, F&& f) {
  if (x.scalar_type() == at::kFloat) f(static_cast<const float*>(x.data_ptr<float>()));
  else if (x.scalar_type() == at::kBFloat16) f(static_cast<const at::BFloat16*>(x.data_ptr<at::BFloat16>()));
  else f(static_cast<const at::Half*>(x.data_ptr<at::Half>()));
}

// The output tensor (bf16 for bf16 x, written by the kernel epilogue; fp32 otherwise, fp16 x goes
// through fp32, rare on CPU) and the fields both fused kernels take, filled into `a`.
at::Tensor fill_gemv_common(GemvCommon& a, const at::Tensor& x, const at::Tensor& words, const at::Tensor& scales,
                            const c10::optional<at::Tensor>& bias, int bits, int64_t group_size, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  const bool out_bf16 = x.scalar_type() == at::kBFloat16;
  at::Tensor y = at::empty({M, N}, x.options().dtype(out_bf16 ? at::kBFloat16 : at::kFloat));
  a.words = words.data_ptr<int32_t>();
  a.scales = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  a.bias = bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
  a.y = y.data_ptr();
  a.ldy = N;
  a.y_bf16 = out_bf16;
  a.M = M;
  a.K = K;
  a.N = N;
  a.G = K / group_size;
  a.group_size = group_size;
  a.bits = bits;
  return y;
}

at::Tensor fused(const at::Tensor& x, const at::Tensor& words, const at::Tensor& scales, const at::Tensor& dsum,
                 const c10::optional<at::Tensor>& bias, int bits, int64_t group_size, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1), G = K / group_size, T = words.size(0);
  const int64_t ldxs = K / 32 * bitpack::fields_per_run(bits);
  // One scratch allocation for the three activation buffers (x̃ fp32, pre-scaled x̃, group means).
  at::Tensor scratch = at::empty({M * (K + ldxs + G)}, x.options().dtype(at::kFloat));
  float* xf = scratch.data_ptr<float>();
  float* xs = xf + M * K;
  float* xmean = xs + M * ldxs;
  // Read the kernel family once: the activation layout depends on its row block.
  const int isa = isa_slot().load(std::memory_order_relaxed);
  const int block = row_block(isa);
  with_float_data(x, [&](const auto* p) {
    prepare_activations(p, M, K, group_size, bits, block, xf, xs, ldxs, xmean);
  });

  QGemvArgs a;
  at::Tensor y = fill_gemv_common(a, x, words, scales, bias, bits, group_size, N);
  a.x = xf;
  a.xs = xs;
  a.ldxs = ldxs;
  a.xmean = xmean;
  a.dsum = dsum.data_ptr<int16_t>();
  run_gemv(a, T, isa);
  return x.scalar_type() == at::kHalf ? y.to(at::kHalf) : y;
}

at::Tensor fused_q8(const at::Tensor& x, const at::Tensor& words_q8, const at::Tensor& scales, const at::Tensor& zeros,
                    const c10::optional<at::Tensor>& bias, int bits, int64_t group_size, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1), G = K / group_size, T = words_q8.size(0);
  const int64_t K8 = K / 32 * q8_run_bytes(bits);
  // One scratch allocation: int8 activation bytes, then (16-byte aligned) scales and sums.
  const int64_t qbytes = (M * K8 + 15) / 16 * 16;
  at::Tensor scratch = at::empty({qbytes + 2 * M * G * int64_t(sizeof(float))}, x.options().dtype(at::kByte));
  int8_t* xq = reinterpret_cast<int8_t*>(scratch.data_ptr<uint8_t>());
  float* xscale = reinterpret_cast<float*>(scratch.data_ptr<uint8_t>() + qbytes);
  float* xsum = xscale + M * G;
  with_float_data(x, [&](const auto* p) { prepare_q8(p, M, K, group_size, bits, xq, xscale, xsum); });

  Q8Args a;
  at::Tensor y = fill_gemv_common(a, x, words_q8, scales, bias, bits, group_size, N);
  a.xq = xq;
  a.K8 = K8;
  a.xscale = xscale;
  a.xsum = xsum;
  a.zeros = zeros.data_ptr<uint8_t>();
  const int isa = isa_slot().load(std::memory_order_relaxed);
  const bool native = cpu_has_q8(Isa(isa));
  const bool vnni = isa == kAvx2 && avxvnni_slot().load(std::memory_order_relaxed);
  // Same work split as the fp32 kernel: columns across threads once each has enough work.
  const int64_t work_per_tile = K * kTileN * M;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(work_per_tile, 1));
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    if (native && isa == kAvx512) q8_tiles_avx512(a, t0, t1);
    else if (native && isa == kAvx2) {
      if (vnni) q8_tiles_avxvnni(a, t0, t1);
      else q8_tiles_avx2(a, t0, t1);
    }
    else q8_tiles_scalar(a, t0, t1);
  });
  return x.scalar_type() == at::kHalf ? y.to(at::kHalf) : y;
}

// Columns per dequantized chunk: the whole W^T when it is at most ~32 MB (one GEMM call is the
// fastest and the buffer is no larger than a 1500 x 5120 activation), else the widest multiple of
// kTileN that fits, so memory stays bounded for huge layers.
int64_t chunk_columns(int64_t K, int64_t N, int64_t elem_bytes) {
  const int64_t budget = int64_t(32) << 20;
  const int64_t padded = (N + kTileN - 1) / kTileN * kTileN;
  if (K * padded * elem_bytes <= budget) return padded;
  return std::max<int64_t>(kTileN, budget / (K * elem_bytes) / kTileN * kTileN);
}

at::Tensor dequant_gemm(const at::Tensor& x_in, const at::Tensor& words, const at::Tensor& scales,
                        const at::Tensor& zeros, const c10::optional<at::Tensor>& bias, int bits, int64_t group_size,
                        int64_t N, int64_t chunk_cols) {
  // bf16 activations multiply a bf16 weight (what F.linear in bf16 does, and the bf16 GEMM is
  // ~2-4x faster than fp32 where AVX512_BF16/AMX exist); fp32 and fp16 use an fp32 GEMM.
  const bool use_bf16 = x_in.scalar_type() == at::kBFloat16;
  const at::Tensor x = use_bf16 || x_in.scalar_type() == at::kFloat ? x_in : x_in.to(at::kFloat);
  const int64_t M = x.size(0), K = x.size(1), G = K / group_size, T = words.size(0);
  const auto wdtype = use_bf16 ? at::kBFloat16 : at::kFloat;
  const int64_t padded = (N + kTileN - 1) / kTileN * kTileN;
  const int64_t cols = chunk_cols > 0 ? std::min(padded, (chunk_cols + kTileN - 1) / kTileN * kTileN)
                                      : chunk_columns(K, N, use_bf16 ? 2 : 4);
  at::Tensor wt = at::empty({K, cols}, x.options().dtype(wdtype));  // W^T chunk, row-major
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(wdtype);

  DequantArgs a;
  a.words = words.data_ptr<int32_t>();
  a.scales = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  a.zeros = zeros.data_ptr<uint8_t>();
  a.K = K;
  a.G = G;
  a.group_size = group_size;
  a.bits = bits;
  a.out = wt.data_ptr();
  a.ldo = cols;
  a.out_bf16 = use_bf16;
  const int64_t tiles_per_chunk = cols / kTileN;
  for (int64_t t0 = 0; t0 < T; t0 += tiles_per_chunk) {
    const int64_t t1 = std::min(T, t0 + tiles_per_chunk);
    const int64_t n0 = t0 * kTileN, nb = std::min(N, t1 * kTileN) - n0;
    run_dequant(a, t0, t1);
    at::Tensor wchunk = wt.narrow(1, 0, nb);
    // A column slice of row-major y has unit column stride: BLAS writes into it in place.
    at::Tensor ychunk = nb == N ? y : y.narrow(1, n0, nb);
    if (b.defined()) at::addmm_out(ychunk, b.narrow(0, n0, nb), x, wchunk);
    else at::mm_out(ychunk, x, wchunk);
  }
  return x_in.scalar_type() == at::kHalf ? y.to(at::kHalf) : y;
}

}  // namespace

std::string active_isa() { return kIsaNames[isa_slot().load()]; }

std::string cpu_vendor() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_is("intel")) return "intel";
  if (__builtin_cpu_is("amd")) return "amd";
#endif
  return "other";
}

bool cpu_has_bf16_dot() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
#else
  return false;
#endif
}

bool q8_native() { return cpu_has_q8(Isa(isa_slot().load())); }

bool use_avxvnni(bool enabled) {
  avxvnni_slot().store(enabled && cpu_has_avxvnni());
  return avxvnni_slot().load();
}

std::vector<at::Tensor> quantize_activations_q8(const at::Tensor& x, int64_t group_size) {
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t M = xf.size(0), K = xf.size(1), G = K / group_size;
  at::Tensor q = at::empty({M, K}, xf.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M, G}, xf.options());
  at::Tensor sum = at::empty({M, G}, xf.options().dtype(at::kInt));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g)
      scale[m][g] = quantize_group_q8(xf.data_ptr<float>() + m * K + g * group_size, group_size,
                                      q.data_ptr<int8_t>() + m * K + g * group_size, sum.data_ptr<int32_t>() + m * G + g);
  return {q, scale, sum};
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (int i = 2; i >= 0; --i)
    if (cpu_has(Isa(i))) out.push_back(kIsaNames[i]);
  return out;
}

void set_isa(const std::string& name) {
  const int isa = parse_isa(name);
  TORCH_CHECK(isa >= 0, "isa must be one of 'avx512', 'avx2', 'scalar', got '", name, "'");
  TORCH_CHECK(cpu_has(Isa(isa)), "isa '", name, "' is not supported by this CPU");
  isa_slot().store(isa);
}

at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& words, const at::Tensor& scales, const at::Tensor& zeros,
                   const at::Tensor& dsum, const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group_size, int64_t out_features,
                   const std::string& path, int64_t fused_max_m, int64_t chunk_cols,
                   const c10::optional<at::Tensor>& words_q8) {
  const bool use_fused = path == "fused" || (path == "auto" && x.size(0) <= fused_max_m);
  if (x.size(0) == 0) return at::empty({0, out_features}, x.options());
  if (use_fused && words_q8.has_value() && words_q8->defined())
    return fused_q8(x, *words_q8, scales, zeros, bias, int(bits), group_size, out_features);
  if (use_fused) return fused(x, words, scales, dsum, bias, int(bits), group_size, out_features);
  return dequant_gemm(x, words, scales, zeros, bias, int(bits), group_size, out_features, chunk_cols);
}

at::Tensor dequantize_t(const at::Tensor& words, const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                        int64_t group_size, int64_t out_features) {
  const int64_t T = words.size(0), K = words.size(1) * 32 / bits;
  at::Tensor wt = at::empty({K, T * kTileN}, words.options().dtype(at::kFloat));
  DequantArgs a;
  a.words = words.data_ptr<int32_t>();
  a.scales = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  a.zeros = zeros.data_ptr<uint8_t>();
  a.K = K;
  a.G = K / group_size;
  a.group_size = group_size;
  a.bits = int(bits);
  a.out = wt.data_ptr();
  a.ldo = T * kTileN;
  a.out_bf16 = false;
  run_dequant(a, 0, T);
  return wt.narrow(1, 0, out_features);
}

}  // namespace cpu
}  // namespace fade
