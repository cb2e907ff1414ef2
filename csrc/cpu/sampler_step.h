#pragma once
#include <cstdint>

#include "dtypes.h"

namespace fastdiff {

enum VarianceMode : int { kVarianceFixed = 0, kVarianceLearned = 1, kVarianceLearnedRange = 2 };

struct SamplerStepArgs {
  const void* x;             // in,  (batch, numel_per_sample), contiguous
  const void* model_output;  // in,  (batch, output_sample_stride): mean part, then variance part
  void* y;                   // out, (batch, numel_per_sample), contiguous
  int64_t batch;
  int64_t numel_per_sample;
  int64_t output_sample_stride;  // numel_per_sample, or 2 * numel_per_sample (learned variance)
  double a1, a2, c1, c2, sigma, min_log, max_log;
  uint64_t seed;
  uint32_t step;
  int64_t sample_offset;  // global index of sample 0 of this batch (noise stream)
  bool clip;
  int variance_mode;
  int dtype;
  int num_threads;
};

struct NormalArgs {
  void* y;  // out, (batch, numel_per_sample), contiguous
  int64_t batch;
  int64_t numel_per_sample;
  uint64_t seed;
  uint32_t step;
  int64_t sample_offset;
  int dtype;
  int num_threads;
};

void sampler_step_cpu(const SamplerStepArgs& args);
void philox_normal_cpu(const NormalArgs& args);

}  // namespace fastdiff
