// fastdiff._C_cuda: the CUDA kernels behind a raw-pointer interface (a module separate from
// fastdiff._C, so that a CUDA build problem never takes the CPU core down). Pointers are
// device addresses (tensor.data_ptr()), `stream` is torch.cuda.current_stream().cuda_stream;
// fastdiff/triton_kernels/cuda_native.py checks the tensors and calls these. Every enum and
// size is checked here as well (csrc/checks.h): std::invalid_argument -> ValueError.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "checks.h"
#include "cuda/kernels.h"
#include "dtypes.h"

namespace py = pybind11;
using namespace fastdiff_cuda;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

using fastdiff::check_at_least;
using fastdiff::check_dtype;
using fastdiff::check_pointer;
using fastdiff::check_range;
using fastdiff::fail;

constexpr int64_t kMaxGridX = 2147483647;  // gridDim.x limit
constexpr int64_t kMaxGridY = 65535;       // gridDim.y limit
constexpr int64_t kElementwiseThreads = 256;

// The elementwise kernels use one thread per 4 elements, 256 threads a block, a 1-D grid.
void check_elementwise_grid(const char* where, int64_t batch, int64_t numel) {
  const int64_t quads = (numel + 3) / 4;
  if (numel > 0 && batch > (kMaxGridX * kElementwiseThreads) / quads)
    fail(where, "batch * numel too large for one launch: " + std::to_string(batch) + " x " + std::to_string(numel));
}

void check_group_norm(const char* where, int64_t n, int64_t c, int64_t s, int64_t groups, int64_t splits,
                      int storage) {
  check_dtype(where, "storage", storage, {kF32, kF16, kBF16});
  fastdiff::check_group_norm_sizes(where, n, c, s, groups);
  check_range(where, "splits", splits, 1, s < kMaxGridY ? s : kMaxGridY);
  if (n > kMaxGridX / c) fail(where, "n * c too large for one launch");
}

}  // namespace

#ifndef FASTDIFF_CUDA_MODULE_NAME  // tests build a host-emulated copy under another name
#define FASTDIFF_CUDA_MODULE_NAME _C_cuda
#endif

PYBIND11_MODULE(FASTDIFF_CUDA_MODULE_NAME, m) {
  m.doc() = "fastdiff CUDA kernels (raw-pointer interface; see fastdiff.triton_kernels.cuda_native)";
  m.attr("dtype_codes") = py::dict(py::arg("float32") = int(kF32), py::arg("float16") = int(kF16),
                                   py::arg("bfloat16") = int(kBF16), py::arg("float64") = int(kF64));

  m.def("device_count", []() {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
  });

  m.def(
      "sampler_step",
      [](uintptr_t x, uintptr_t model_output, uintptr_t y, uintptr_t coef_table, uintptr_t step_index,
         int64_t table_rows, int64_t batch, int64_t numel, int64_t out_stride, double a1, double a2, double c1, double c2,
         double sigma, double min_log, double max_log, uint64_t seed, uint32_t step, uint32_t sample_offset,
         bool clip, int variance_mode, int storage, uintptr_t stream) {
        const char* where = "sampler_step";
        check_dtype(where, "storage", storage, {kF32, kF16, kBF16, kF64});
        fastdiff::check_variance_mode(where, variance_mode);
        check_at_least(where, "batch", batch, 0);
        check_at_least(where, "numel", numel, 0);
        if (batch > 1) check_at_least(where, "out_stride", out_stride, variance_mode ? 2 * numel : numel);
        fastdiff::check_sample_range(where, sample_offset, batch);
        check_elementwise_grid(where, batch, numel);
        if ((coef_table == 0) != (step_index == 0))
          fail(where, "coef_table and step_index must be given together (or neither)");
        if (coef_table != 0) check_at_least(where, "table_rows", table_rows, 1);
        if (batch * numel > 0)
          for (uintptr_t p : {x, model_output, y}) check_pointer(where, "tensor", p);
        SamplerStepArgs a{ptr<const void>(x), ptr<const void>(model_output), ptr<void>(y),
                          ptr<const double>(coef_table), ptr<const int64_t>(step_index), table_rows, batch, numel,
                          out_stride,
                          a1, a2, c1, c2, sigma, min_log, max_log, seed, step, sample_offset, clip,
                          variance_mode, storage};
        py::gil_scoped_release release;
        check(fastdiff_cuda::sampler_step(a, as_stream(stream)), "sampler_step");
      },
      py::arg("x"), py::arg("model_output"), py::arg("y"), py::arg("coef_table"), py::arg("step_index"),
      py::arg("table_rows"), py::arg("batch"), py::arg("numel"), py::arg("out_stride"), py::arg("a1"), py::arg("a2"), py::arg("c1"),
      py::arg("c2"), py::arg("sigma"), py::arg("min_log"), py::arg("max_log"), py::arg("seed"), py::arg("step"),
      py::arg("sample_offset"), py::arg("clip"), py::arg("variance_mode"), py::arg("storage"), py::arg("stream"));

  m.def(
      "philox_normal",
      [](uintptr_t y, int64_t batch, int64_t numel, uint64_t seed, uint32_t step, uint32_t sample_offset,
         int storage, uintptr_t stream) {
        const char* where = "philox_normal";
        check_dtype(where, "storage", storage, {kF32, kF16, kBF16, kF64});
        check_at_least(where, "batch", batch, 0);
        check_at_least(where, "numel", numel, 0);
        fastdiff::check_sample_range(where, sample_offset, batch);
        check_elementwise_grid(where, batch, numel);
        if (batch * numel > 0) check_pointer(where, "y", y);
        py::gil_scoped_release release;
        check(fastdiff_cuda::philox_normal(ptr<void>(y), batch, numel, seed, step, sample_offset, storage,
                                           as_stream(stream)),
              "philox_normal");
      },
      py::arg("y"), py::arg("batch"), py::arg("numel"), py::arg("seed"), py::arg("step"), py::arg("sample_offset"),
      py::arg("storage"), py::arg("stream"));

  m.def(
      "group_norm_splits",
      [](int64_t n, int64_t c, int64_t s, bool channels_last) {
        check_at_least("group_norm_splits", "n", n, 1);
        check_at_least("group_norm_splits", "c", c, 1);
        check_at_least("group_norm_splits", "s", s, 1);
        const int64_t splits = fastdiff_cuda::group_norm_splits(n, c, s, channels_last);
        return splits < kMaxGridY ? splits : kMaxGridY;
      },
      py::arg("n"), py::arg("c"), py::arg("s"), py::arg("channels_last"));

  m.def(
      "group_norm_silu_forward",
      [](uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t y, uintptr_t mean, uintptr_t rstd,
         uintptr_t workspace, int64_t n, int64_t c, int64_t s, int64_t groups, int64_t splits, double eps,
         bool channels_last, bool act, int storage, uintptr_t stream) {
        const char* where = "group_norm_silu_forward";
        check_group_norm(where, n, c, s, groups, splits, storage);
        if (!(eps >= 0.0) || !std::isfinite(eps)) fail(where, "eps must be finite and >= 0");
        for (uintptr_t p : {x, weight, bias, y, mean, rstd, workspace}) check_pointer(where, "tensor", p);
        GroupNormArgs a{ptr<const void>(x), ptr<const float>(weight), ptr<const float>(bias), ptr<void>(y),
                        ptr<float>(mean), ptr<float>(rstd), ptr<float>(workspace), n, c, s, groups, splits, eps,
                        channels_last, act, storage};
        py::gil_scoped_release release;
        check(fastdiff_cuda::group_norm_silu_forward(a, as_stream(stream)), "group_norm_silu_forward");
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"), py::arg("mean"), py::arg("rstd"),
      py::arg("workspace"), py::arg("n"), py::arg("c"), py::arg("s"), py::arg("groups"), py::arg("splits"),
      py::arg("eps"), py::arg("channels_last"), py::arg("act"), py::arg("storage"), py::arg("stream"));

  m.def(
      "group_norm_silu_backward",
      [](uintptr_t grad_y, uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t mean, uintptr_t rstd,
         uintptr_t grad_x, uintptr_t grad_weight, uintptr_t grad_bias, uintptr_t workspace, int64_t n, int64_t c,
         int64_t s, int64_t groups, int64_t splits, bool channels_last, bool act, int storage, uintptr_t stream) {
        const char* where = "group_norm_silu_backward";
        check_group_norm(where, n, c, s, groups, splits, storage);
        for (uintptr_t p : {grad_y, x, weight, bias, mean, rstd, grad_x, grad_weight, grad_bias, workspace})
          check_pointer(where, "tensor", p);
        GroupNormBackwardArgs a{ptr<const void>(grad_y), ptr<const void>(x), ptr<const float>(weight),
                                ptr<const float>(bias), ptr<const float>(mean), ptr<const float>(rstd),
                                ptr<void>(grad_x), ptr<float>(grad_weight), ptr<float>(grad_bias),
                                ptr<float>(workspace), n, c, s, groups, splits, channels_last, act, storage};
        py::gil_scoped_release release;
        check(fastdiff_cuda::group_norm_silu_backward(a, as_stream(stream)), "group_norm_silu_backward");
      },
      py::arg("grad_y"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("mean"), py::arg("rstd"),
      py::arg("grad_x"), py::arg("grad_weight"), py::arg("grad_bias"), py::arg("workspace"), py::arg("n"),
      py::arg("c"), py::arg("s"), py::arg("groups"), py::arg("splits"), py::arg("channels_last"), py::arg("act"),
      py::arg("storage"), py::arg("stream"));
}
