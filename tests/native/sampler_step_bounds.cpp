// Bounds harness for the CPU sampler_step kernel, built with AddressSanitizer by
// tests/test_kernel_bounds.py. Every buffer is its own heap allocation of exactly the
// size the kernel may touch, so any read or write past it aborts the run.
#include <cstdio>
#include <cstdlib>
#include <vector>

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

int main() {
  const int64_t shapes[][2] = {{1, 1}, {1, 3}, {2, 5}, {3, 63}, {1, 64}, {2, 65}, {4097, 1}, {5000, 2},
                               {3, 4095}, {2, 4097}, {1, 8193}, {9, 3 * 17 * 19}};
  for (const auto& s : shapes)
    for (int mode = 0; mode < 3; ++mode)
      for (int dtype = 0; dtype < 2; ++dtype)
        for (int threads : {1, 2})
          for (double sigma : {0.0, 0.5}) run(s[0], s[1], mode, mode == 1, sigma, dtype, threads);
  std::printf("ok\n");
  return 0;
}
