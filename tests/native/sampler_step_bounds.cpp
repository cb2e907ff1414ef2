// Bounds harness for the CPU sampler_step kernel, built with AddressSanitizer by
// tests/test_kernel_bounds.py. Every buffer is its own heap allocation of exactly the
// size the kernel may touch, so any read or write past it aborts the run.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cpu/philox.h"
#include "cpu/sampler_step.h"

using namespace fastdiff;

static int run(int64_t batch, int64_t numel, int mode, bool clip, double sigma, int dtype, int threads) {
  const size_t elem = dtype == kFloat64 ? 8 : 4;
  const int64_t out_stride = mode == kVarianceFixed ? numel : 2 * numel;
  // exact-size allocations: ASan catches a single byte past the end
  char* x = static_cast<char*>(std::malloc(batch * numel * elem));
  char* out = static_cast<char*>(std::malloc(batch * out_stride * elem));
  char* y = static_cast<char*>(std::malloc(batch * numel * elem));
  for (int64_t i = 0; i < batch * numel * (int64_t)elem; ++i) x[i] = 0;
  for (int64_t i = 0; i < batch * out_stride * (int64_t)elem; ++i) out[i] = 0;
  SamplerStepArgs a{x, out, y, batch, numel, out_stride, 1.0, -0.5, 0.3, 0.6, sigma, -5.0, -2.0,
                    12345ull, 7u, 3, clip, mode, dtype, threads};
  sampler_step_cpu(a);
  NormalArgs n{y, batch, numel, 99ull, 1u, 0, dtype, threads};
  philox_normal_cpu(n);
  std::free(x);
  std::free(out);
  std::free(y);
  return 0;
}

// philox_normal_cpu against the stream's definition, element by element (scalar Philox,
// Box-Muller in double): checks whichever Philox path this build compiled.
static int check_stream(int64_t batch, int64_t numel) {
  std::vector<float> y(batch * numel);
  NormalArgs n{y.data(), batch, numel, 0x123456789abcull, 42u, 5, kFloat32, 2};
  philox_normal_cpu(n);
  for (int64_t i = 0; i < batch; ++i)
    for (int64_t e = 0; e < numel; ++e) {
      const Philox4 r = philox4x32_10(static_cast<uint32_t>(e / 4), static_cast<uint32_t>(5 + i), 42u, 0u,
                                      0x56789abcu, 0x1234u);
      const int pair = (e % 4) / 2;
      const double u0 = uniform_open01(r.v[2 * pair]), u1 = uniform_open01(r.v[2 * pair + 1]);
      const double radius = std::sqrt(-2.0 * std::log(u0)), angle = 6.283185307179586 * u1;
      const double expected = e % 2 == 0 ? radius * std::cos(angle) : radius * std::sin(angle);
      if (std::fabs(y[i * numel + e] - expected) > 2e-6 * (1.0 + std::fabs(expected))) {
        std::printf("stream mismatch at sample %ld element %ld: %g vs %g\n", (long)i, (long)e,
                    (double)y[i * numel + e], expected);
        return 1;
      }
    }
  return 0;
}

int main() {
  if (check_stream(3, 1001) || check_stream(40, 7)) return 1;
  const int64_t shapes[][2] = {{1, 1}, {1, 3}, {2, 5}, {3, 63}, {1, 64}, {2, 65}, {4097, 1}, {5000, 2},
                               {3, 4095}, {2, 4097}, {1, 8193}, {9, 3 * 17 * 19}};
  for (const auto& s : shapes)
    for (int mode = 0; mode < 3; ++mode)
      for (int dtype : {int(kFloat32), int(kFloat64)})
        for (int threads : {1, 2})
          for (double sigma : {0.0, 0.5}) run(s[0], s[1], mode, mode == 1, sigma, dtype, threads);
  std::printf("ok\n");
  return 0;
}
