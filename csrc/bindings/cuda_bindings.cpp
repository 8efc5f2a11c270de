// fade_kernels._C_cuda: thin pybind11 boundary of the CUDA decode GEMV (csrc/cuda/qgemv.cu).
// Checks every tensor (device, dtype, shape, contiguity) with errors naming the argument and
// the constraint, calls the torch-free launcher on the stream it is given (an integer, the
// cudaStream_t of torch.cuda.current_stream()), and turns its status code into a message.
// Includes only torch/extension.h and cuda_runtime.h: no c10/cuda headers, so that it also
// compiles (-fsyntax-only) against a CPU torch wheel.
#include <torch/extension.h>

#include <cuda_runtime.h>

#include "../cuda/qgemv.h"

namespace {

void check_cuda_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == device, name, " must be on ", device, " (the device of x), got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", c10::toString(dtype), ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return FADE_QGEMV_F16;
    case at::kBFloat16: return FADE_QGEMV_BF16;
    case at::kFloat: return FADE_QGEMV_F32;
    default: TORCH_CHECK(false, "x must be float16, bfloat16 or float32, got ", t);
  }
  return -1;
}

// Makes `index` the current CUDA device for the launch and restores the previous one.
class DeviceScope {
 public:
  explicit DeviceScope(int index) {
    TORCH_CHECK(cudaGetDevice(&previous_) == cudaSuccess, "cudaGetDevice failed");
    if (previous_ != index) TORCH_CHECK(cudaSetDevice(index) == cudaSuccess, "cudaSetDevice(", index, ") failed");
  }
  ~DeviceScope() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

// y[M, N] = x[M, K] @ dequant(W)^T + bias (qgemv.h gives every tensor's layout).
at::Tensor qgemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                 const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group_size, int64_t stream) {
  TORCH_CHECK(bits == 3 || bits == 4, "bits must be 3 or 4 for the CUDA kernel, got ", bits);
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got device ", x.device());
  const int dt = dtype_code(x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [M, K] (flatten leading dimensions first), got shape ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M >= 1 && M <= FADE_QGEMV_MAX_M, "x must have between 1 and ", FADE_QGEMV_MAX_M, " rows, got M=", M);
  TORCH_CHECK(K > 0 && K % 32 == 0, "x.size(1) (in_features K) must be a positive multiple of 32, got ", K);
  const at::Device device = x.device();
  check_cuda_tensor(qweight, "qweight", at::kInt, device);
  check_cuda_tensor(qzeros, "qzeros", at::kInt, device);
  check_cuda_tensor(scales, "scales", at::kHalf, device);
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(0) == K * bits / 32, "qweight must have shape [K*bits/32=",
              K * bits / 32, ", N], got ", qweight.sizes());
  const int64_t N = qweight.size(1);
  TORCH_CHECK(N > 0, "qweight must have at least one column (out_features), got shape ", qweight.sizes());
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && K % group_size == 0,
              "group_size must be a positive multiple of 32 that divides K=", K, ", got ", group_size);
  const int64_t G = K / group_size;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == G && scales.size(1) == N, "scales must have shape [G=", G,
              ", N=", N, "], got ", scales.sizes());
  const int64_t zero_words = (N + 31) / 32 * bits;
  TORCH_CHECK(qzeros.dim() == 2 && qzeros.size(0) == G && qzeros.size(1) == zero_words,
              "qzeros must have shape [G=", G, ", ceil(N/32)*bits=", zero_words, "], got ", qzeros.sizes());
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    check_cuda_tensor(*bias, "bias", at::kFloat, device);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must have shape [N=", N, "], got ", bias->sizes());
    bias_ptr = bias->data_ptr<float>();
  }
  TORCH_CHECK(K <= INT32_MAX && N <= INT32_MAX, "K and N must fit in int32, got K=", K, ", N=", N);

  at::Tensor y = at::empty({M, N}, x.options());
  DeviceScope scope(device.index());
  const int status = fade_qgemv_launch(
      x.data_ptr(), dt, qweight.data_ptr<int32_t>(), qzeros.data_ptr<int32_t>(),
      reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()), bias_ptr, y.data_ptr(), int(M), int(K), int(N),
      int(group_size), int(bits), reinterpret_cast<void*>(static_cast<intptr_t>(stream)));
  if (status == FADE_QGEMV_ERR_LAUNCH) {
    TORCH_CHECK(false, "fade qgemv: ", fade_qgemv_error_string(status), ": ",
                cudaGetErrorString(static_cast<cudaError_t>(fade_qgemv_last_cuda_error())));
  }
  TORCH_CHECK(status == FADE_QGEMV_OK, "fade qgemv: ", fade_qgemv_error_string(status), " (status ", status, ")");
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fade-kernels CUDA kernels: 3/4-bit decode GEMV (M = 1..8) on the GPTQ layout";
  m.attr("MAX_M") = FADE_QGEMV_MAX_M;
  m.def("qgemv", &qgemv, "y[M,N] = x[M,K] @ dequant(W)^T + bias on a CUDA stream", py::arg("x"), py::arg("qweight"),
        py::arg("qzeros"), py::arg("scales"), py::arg("bias"), py::arg("bits"), py::arg("group_size"),
        py::arg("stream"));
  m.def("error_string", &fade_qgemv_error_string, "message of a launcher status code", py::arg("status"));
}
