// The one binding file. Python (fastdiff/ops) validates every tensor and passes raw
// pointers, sizes and scalars; nothing here touches libtorch, and each kernel runs with
// the GIL released.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cpu/sampler_step.h"

namespace py = pybind11;
using fastdiff::NormalArgs;
using fastdiff::SamplerStepArgs;

template <typename T>
static T* as_ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdiff CPU kernels (raw-pointer interface; call through fastdiff.ops)";
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
        NormalArgs args{as_ptr<void>(y), batch, numel_per_sample, seed, step, sample_offset, dtype, num_threads};
        py::gil_scoped_release release;
        fastdiff::philox_normal_cpu(args);
      },
      py::arg("y"), py::arg("batch"), py::arg("numel_per_sample"), py::arg("seed"), py::arg("step"),
      py::arg("sample_offset"), py::arg("dtype"), py::arg("num_threads"));
}
