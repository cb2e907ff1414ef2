// The one binding file of the CPU core. Python (fastdiff/ops) validates every tensor and
// passes raw pointers, sizes and scalars; nothing here touches libtorch, and each kernel
// runs with the GIL released. Every enum and size is checked here too (csrc/checks.h):
// a bad value raises ValueError instead of reaching a kernel.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <initializer_list>
#include <cstdint>

#include "cpu/attention.h"
#include "cpu/group_norm_silu.h"
#include "cpu/sampler_step.h"
#include "checks.h"
#include "dtypes.h"

namespace py = pybind11;
using fastdiff::NormalArgs;
using fastdiff::SamplerStepArgs;
using fastdiff::AttentionArgs;
using fastdiff::AttentionBackwardArgs;
using fastdiff::GroupNormArgs;
using fastdiff::GroupNormBackwardArgs;

template <typename T>
static T* as_ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

namespace {

using fastdiff::check_at_least;
using fastdiff::check_dtype;
using fastdiff::check_finite;
using fastdiff::check_pointer;
using fastdiff::check_range;
using fastdiff::kBFloat16;
using fastdiff::kFloat32;
using fastdiff::kFloat64;

constexpr int64_t kMaxThreads = 1 << 16;
constexpr int64_t kMaxHeadDim = 256;  // csrc/cpu/attention.cpp's widest compiled head dim

void check_attention(const char* where, int64_t batch, int64_t heads, int64_t len_q, int64_t len_k,
                     int64_t head_dim, double scale, int dtype, int num_threads,
                     std::initializer_list<const std::array<int64_t, 3>*> strides) {
  check_dtype(where, "dtype", dtype, {kFloat32, kBFloat16});
  check_at_least(where, "batch", batch, 1);
  check_at_least(where, "heads", heads, 1);
  check_at_least(where, "len_q", len_q, 1);
  check_at_least(where, "len_k", len_k, 1);
  check_range(where, "head_dim", head_dim, 1, kMaxHeadDim);
  check_finite(where, "scale", scale);
  check_range(where, "num_threads", num_threads, 1, kMaxThreads);
  for (const auto* st : strides)
    for (int64_t v : *st) check_at_least(where, "stride", v, 0);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdiff CPU kernels (raw-pointer interface; call through fastdiff.ops)";
  m.attr("dtype_codes") = py::dict(py::arg("float32") = int(kFloat32), py::arg("float16") = int(fastdiff::kFloat16),
                                   py::arg("bfloat16") = int(kBFloat16), py::arg("float64") = int(kFloat64));
  m.attr("max_head_dim") = kMaxHeadDim;
#if defined(_OPENMP)
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif

  m.def(
      "sampler_step",
      [](uintptr_t x, uintptr_t model_output, uintptr_t y, int64_t batch, int64_t numel_per_sample,
         int64_t output_sample_stride, double a1, double a2, double c1, double c2, double sigma,
         double min_log, double max_log, uint64_t seed, uint32_t step, int64_t sample_offset, bool clip,
         int variance_mode, int dtype, int num_threads) {
        const char* where = "sampler_step";
        check_dtype(where, "dtype", dtype, {kFloat32, kFloat64});
        fastdiff::check_variance_mode(where, variance_mode);
        check_at_least(where, "batch", batch, 0);
        check_at_least(where, "numel_per_sample", numel_per_sample, 0);
        if (batch > 1)  // the variance part sits numel_per_sample after the mean part
          check_at_least(where, "output_sample_stride", output_sample_stride,
                         variance_mode ? 2 * numel_per_sample : numel_per_sample);
        fastdiff::check_sample_range(where, sample_offset, batch);
        check_range(where, "num_threads", num_threads, 1, kMaxThreads);
        if (batch * numel_per_sample > 0) {
          check_pointer(where, "x", x);
          check_pointer(where, "model_output", model_output);
          check_pointer(where, "y", y);
        }
        SamplerStepArgs args{as_ptr<const void>(x), as_ptr<const void>(model_output), as_ptr<void>(y),
                             batch, numel_per_sample, output_sample_stride, a1, a2, c1, c2, sigma,
                             min_log, max_log, seed, step, sample_offset, clip, variance_mode, dtype,
                             num_threads};
        py::gil_scoped_release release;
        fastdiff::sampler_step_cpu(args);
      },
      py::arg("x"), py::arg("model_output"), py::arg("y"), py::arg("batch"), py::arg("numel_per_sample"),
      py::arg("output_sample_stride"), py::arg("a1"), py::arg("a2"), py::arg("c1"), py::arg("c2"),
      py::arg("sigma"), py::arg("min_log"), py::arg("max_log"), py::arg("seed"), py::arg("step"),
      py::arg("sample_offset"), py::arg("clip"), py::arg("variance_mode"), py::arg("dtype"),
      py::arg("num_threads"));

  m.def(
      "philox_normal",
      [](uintptr_t y, int64_t batch, int64_t numel_per_sample, uint64_t seed, uint32_t step,
         int64_t sample_offset, int dtype, int num_threads) {
        const char* where = "philox_normal";
        check_dtype(where, "dtype", dtype, {kFloat32, kFloat64});
        check_at_least(where, "batch", batch, 0);
        check_at_least(where, "numel_per_sample", numel_per_sample, 0);
        fastdiff::check_sample_range(where, sample_offset, batch);
        check_range(where, "num_threads", num_threads, 1, kMaxThreads);
        if (batch * numel_per_sample > 0) check_pointer(where, "y", y);
        NormalArgs args{as_ptr<void>(y), batch, numel_per_sample, seed, step, sample_offset, dtype, num_threads};
        py::gil_scoped_release release;
        fastdiff::philox_normal_cpu(args);
      },
      py::arg("y"), py::arg("batch"), py::arg("numel_per_sample"), py::arg("seed"), py::arg("step"),
      py::arg("sample_offset"), py::arg("dtype"), py::arg("num_threads"));

  m.def(
      "group_norm_silu_forward",
      [](uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t y, uintptr_t mean, uintptr_t rstd,
         int64_t batch, int64_t channels, int64_t spatial, int64_t groups, double eps, bool channels_last,
         bool act, int dtype, int num_threads) {
        const char* where = "group_norm_silu_forward";
        check_dtype(where, "dtype", dtype, {kFloat32, kBFloat16});
        fastdiff::check_group_norm_sizes(where, batch, channels, spatial, groups);
        if (!(eps >= 0.0) || !std::isfinite(eps)) fastdiff::fail(where, "eps must be finite and >= 0");
        check_range(where, "num_threads", num_threads, 1, kMaxThreads);
        for (uintptr_t p : {x, weight, bias, y, mean, rstd}) check_pointer(where, "tensor", p);
        GroupNormArgs args{as_ptr<const void>(x), as_ptr<const float>(weight), as_ptr<const float>(bias),
                           as_ptr<void>(y), as_ptr<float>(mean), as_ptr<float>(rstd), batch, channels,
                           spatial, groups, eps, channels_last, act, dtype, num_threads};
        py::gil_scoped_release release;
        fastdiff::group_norm_silu_forward_cpu(args);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"), py::arg("mean"), py::arg("rstd"),
      py::arg("batch"), py::arg("channels"), py::arg("spatial"), py::arg("groups"), py::arg("eps"),
      py::arg("channels_last"), py::arg("act"), py::arg("dtype"), py::arg("num_threads"));

  m.def(
      "group_norm_silu_backward",
      [](uintptr_t grad_y, uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t mean, uintptr_t rstd,
         uintptr_t grad_x, uintptr_t grad_weight, uintptr_t grad_bias, int64_t batch, int64_t channels,
         int64_t spatial, int64_t groups, bool channels_last, bool act, int dtype, int num_threads) {
        const char* where = "group_norm_silu_backward";
        check_dtype(where, "dtype", dtype, {kFloat32, kBFloat16});
        fastdiff::check_group_norm_sizes(where, batch, channels, spatial, groups);
        check_range(where, "num_threads", num_threads, 1, kMaxThreads);
        for (uintptr_t p : {grad_y, x, weight, bias, mean, rstd, grad_x, grad_weight, grad_bias})
          check_pointer(where, "tensor", p);
        GroupNormBackwardArgs args{as_ptr<const void>(grad_y), as_ptr<const void>(x), as_ptr<const float>(weight),
                                   as_ptr<const float>(bias), as_ptr<const float>(mean),
                                   as_ptr<const float>(rstd), as_ptr<void>(grad_x), as_ptr<float>(grad_weight),
                                   as_ptr<float>(grad_bias), batch, channels, spatial, groups, channels_last,
                                   act, dtype, num_threads};
        py::gil_scoped_release release;
        fastdiff::group_norm_silu_backward_cpu(args);
      },
      py::arg("grad_y"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("mean"), py::arg("rstd"),
      py::arg("grad_x"), py::arg("grad_weight"), py::arg("grad_bias"), py::arg("batch"), py::arg("channels"),
      py::arg("spatial"), py::arg("groups"), py::arg("channels_last"), py::arg("act"), py::arg("dtype"),
      py::arg("num_threads"));

  // Strides are (batch, head, position) in elements; the head dim must be dense.
  m.def(
      "attention_forward",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, int64_t batch, int64_t heads,
         int64_t len_q, int64_t len_k, int64_t head_dim, std::array<int64_t, 3> q_stride,
         std::array<int64_t, 3> k_stride, std::array<int64_t, 3> v_stride, double scale, int dtype,
         int num_threads) {
        check_attention("attention_forward", batch, heads, len_q, len_k, head_dim, scale, dtype, num_threads,
                        {&q_stride, &k_stride, &v_stride});
        for (uintptr_t p : {q, k, v, out, lse}) check_pointer("attention_forward", "tensor", p);
        AttentionArgs args{as_ptr<const void>(q), as_ptr<const void>(k), as_ptr<const void>(v), as_ptr<void>(out),
                           as_ptr<float>(lse), batch, heads, len_q, len_k, head_dim, {}, {}, {},
                           static_cast<float>(scale), dtype, num_threads};
        for (int i = 0; i < 3; ++i) {
          args.q_stride[i] = q_stride[i];
          args.k_stride[i] = k_stride[i];
          args.v_stride[i] = v_stride[i];
        }
        py::gil_scoped_release release;
        fastdiff::attention_forward_cpu(args);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("batch"),
      py::arg("heads"), py::arg("len_q"), py::arg("len_k"), py::arg("head_dim"), py::arg("q_stride"),
      py::arg("k_stride"), py::arg("v_stride"), py::arg("scale"), py::arg("dtype"), py::arg("num_threads"));

  m.def(
      "attention_backward",
      [](uintptr_t grad_out, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
         uintptr_t grad_q, uintptr_t grad_k, uintptr_t grad_v, int64_t batch, int64_t heads, int64_t len_q,
         int64_t len_k, int64_t head_dim, std::array<int64_t, 3> grad_out_stride, std::array<int64_t, 3> q_stride,
         std::array<int64_t, 3> k_stride, std::array<int64_t, 3> v_stride, double scale, int dtype,
         int num_threads) {
        check_attention("attention_backward", batch, heads, len_q, len_k, head_dim, scale, dtype, num_threads,
                        {&grad_out_stride, &q_stride, &k_stride, &v_stride});
        for (uintptr_t p : {grad_out, q, k, v, out, lse, grad_q, grad_k, grad_v})
          check_pointer("attention_backward", "tensor", p);
        AttentionBackwardArgs args{as_ptr<const void>(grad_out), as_ptr<const void>(q), as_ptr<const void>(k),
                                   as_ptr<const void>(v), as_ptr<const void>(out), as_ptr<const float>(lse),
                                   as_ptr<void>(grad_q), as_ptr<void>(grad_k), as_ptr<void>(grad_v), batch,
                                   heads, len_q, len_k, head_dim, {}, {}, {}, {},
                                   static_cast<float>(scale), dtype, num_threads};
        for (int i = 0; i < 3; ++i) {
          args.grad_out_stride[i] = grad_out_stride[i];
          args.q_stride[i] = q_stride[i];
          args.k_stride[i] = k_stride[i];
          args.v_stride[i] = v_stride[i];
        }
        py::gil_scoped_release release;
        fastdiff::attention_backward_cpu(args);
      },
      py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
      py::arg("grad_q"), py::arg("grad_k"), py::arg("grad_v"), py::arg("batch"), py::arg("heads"),
      py::arg("len_q"), py::arg("len_k"), py::arg("head_dim"), py::arg("grad_out_stride"), py::arg("q_stride"),
      py::arg("k_stride"), py::arg("v_stride"), py::arg("scale"), py::arg("dtype"), py::arg("num_threads"));
}
