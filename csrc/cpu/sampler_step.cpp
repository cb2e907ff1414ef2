// Fused reverse-diffusion step (DDPM ancestral and DDIM) and the Philox normal generator.
//
// One pass over x_t and the model output computes, per element,
//   x0   = a1 * x_t + a2 * model_out                (eps / x0 / v parameterisation)
//   x0   = clamp(x0, -1, 1)                         (optional)
//   mean = c1 * x0 + c2 * x_t                       (posterior mean, Eq. 68, or DDIM, Eq. 114)
//   x    = mean + sigma * std * z,   z ~ N(0, 1) from the counter-based stream
// where std = 1 for a fixed variance, or exp(0.5 * log_var) with log_var read from the
// model's variance channels (learned: v; learned_range: Eq. 101 interpolation).
// fastdiff/ops/sampler_step.py derives the coefficients and checks every argument.
#include "cpu/sampler_step.h"

#include <algorithm>
#include <cmath>

#include "cpu/parallel.h"
#include "cpu/philox.h"

namespace fastdiff {

void normal_block(uint64_t seed, uint32_t sample, uint32_t step, uint32_t first_quad, int quads, float* out) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  static_assert(kNoiseQuads == 16, "the AVX-512 Philox computes 16 quads at once");
  // 1. the Philox words (all 16 quads; the caller uses the first `quads`)
  alignas(64) uint32_t r0[kNoiseQuads], r1[kNoiseQuads], r2[kNoiseQuads], r3[kNoiseQuads];
#if defined(__AVX512F__)
  philox4x32_10_x16(first_quad, sample, step, 0u, k0, k1, r0, r1, r2, r3);
#else
#pragma omp simd
  for (int l = 0; l < kNoiseQuads; ++l) {
    const Philox4 r = philox4x32_10(first_quad + static_cast<uint32_t>(l), sample, step, 0u, k0, k1);
    r0[l] = r.v[0];
    r1[l] = r.v[1];
    r2[l] = r.v[2];
    r3[l] = r.v[3];
  }
#endif
  // 2. Box-Muller on the pairs (r0, r1) and (r2, r3)
  float n0[kNoiseQuads], n1[kNoiseQuads], n2[kNoiseQuads], n3[kNoiseQuads];
#pragma omp simd
  for (int l = 0; l < kNoiseQuads; ++l) {
    const float radius_a = std::sqrt(-2.0f * log_unit(uniform_open01(r0[l])));
    const float radius_b = std::sqrt(-2.0f * log_unit(uniform_open01(r2[l])));
    float sa, ca, sb, cb;
    sincos_2pi(uniform_open01(r1[l]), &sa, &ca);
    sincos_2pi(uniform_open01(r3[l]), &sb, &cb);
    n0[l] = radius_a * ca;
    n1[l] = radius_a * sa;
    n2[l] = radius_b * cb;
    n3[l] = radius_b * sb;
  }
  for (int l = 0; l < quads; ++l) {
    out[4 * l + 0] = n0[l];
    out[4 * l + 1] = n1[l];
    out[4 * l + 2] = n2[l];
    out[4 * l + 3] = n3[l];
  }
}

namespace {

// Elements per parallel task: large enough to amortise scheduling, small enough to
// balance 2-64 threads on a (64, 3, 32, 32) batch. Below kSerialBelow elements in all,
// one thread does the work: a fork/join costs more than it saves (and much more when the
// other cores are busy).
constexpr int64_t kChunk = 4096;
constexpr int64_t kSerialBelow = 32768;
static_assert(kChunk % kNoiseBlock == 0, "chunks must hold whole noise blocks");

// Splits (batch, numel_per_sample) into tasks of about kChunk elements: pieces of one
// sample when samples are large, runs of whole samples when they are small.
struct TaskGrid {
  int64_t batch, numel, chunks_per_sample, samples_per_task, num_tasks;
  TaskGrid(int64_t batch_, int64_t numel_) : batch(batch_), numel(numel_) {
    chunks_per_sample = numel > kChunk ? (numel + kChunk - 1) / kChunk : 1;
    samples_per_task = numel > kChunk ? 1 : std::max<int64_t>(1, kChunk / std::max<int64_t>(numel, 1));
    num_tasks = numel > kChunk ? batch * chunks_per_sample : (batch + samples_per_task - 1) / samples_per_task;
  }
  // Calls fn(sample, begin, end) for each piece of work in `task`.
  template <typename Fn>
  void run(int64_t task, Fn&& fn) const {
    if (numel > kChunk) {
      const int64_t begin = (task % chunks_per_sample) * kChunk;
      fn(task / chunks_per_sample, begin, std::min(begin + kChunk, numel));
      return;
    }
    const int64_t first = task * samples_per_task;
    const int64_t last = std::min(first + samples_per_task, batch);
    for (int64_t sample = first; sample < last; ++sample) fn(sample, int64_t(0), numel);
  }
  int threads(int requested) const { return batch * numel < kSerialBelow ? 1 : requested; }
};

template <typename scalar_t, int kMode, bool kClip, bool kNoise>
void step_chunk(const SamplerStepArgs& a, const scalar_t* x, const scalar_t* out, const scalar_t* var,
                scalar_t* y, int64_t sample, int64_t begin, int64_t end) {
  const scalar_t a1 = a.a1, a2 = a.a2, c1 = a.c1, c2 = a.c2, sigma = a.sigma;
  const scalar_t min_log = a.min_log, max_log = a.max_log;
  float z[kNoiseBlock];
  for (int64_t b0 = begin; b0 < end; b0 += kNoiseBlock) {
    const int64_t len = std::min<int64_t>(kNoiseBlock, end - b0);
    if (kNoise)
      normal_block(a.seed, static_cast<uint32_t>(a.sample_offset + sample), a.step,
                   static_cast<uint32_t>(b0 / 4), static_cast<int>((len + 3) / 4), z);
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const int64_t e = b0 + j;
      scalar_t x0 = a1 * x[e] + a2 * out[e];
      if (kClip) x0 = std::min(std::max(x0, scalar_t(-1)), scalar_t(1));
      scalar_t value = c1 * x0 + c2 * x[e];
      if (kNoise) {
        scalar_t scale = sigma;
        if (kMode == kVarianceLearned) scale *= std::exp(scalar_t(0.5) * var[e]);
        if (kMode == kVarianceLearnedRange) {
          const scalar_t frac = scalar_t(0.5) * (var[e] + scalar_t(1));
          scale *= std::exp(scalar_t(0.5) * (frac * max_log + (scalar_t(1) - frac) * min_log));
        }
        value += scale * static_cast<scalar_t>(z[j]);
      }
      y[e] = value;
    }
  }
}

template <typename scalar_t, int kMode, bool kClip, bool kNoise>
void run_step(const SamplerStepArgs& a) {
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* out = static_cast<const scalar_t*>(a.model_output);
  auto* y = static_cast<scalar_t*>(a.y);
  const TaskGrid grid(a.batch, a.numel_per_sample);
  parallel_for(grid.num_tasks, grid.threads(a.num_threads), [&](int64_t task) {
    grid.run(task, [&](int64_t sample, int64_t begin, int64_t end) {
      const scalar_t* out_s = out + sample * a.output_sample_stride;
      step_chunk<scalar_t, kMode, kClip, kNoise>(a, x + sample * a.numel_per_sample, out_s,
                                                 out_s + a.numel_per_sample,
                                                 y + sample * a.numel_per_sample, sample, begin, end);
    });
  });
}

template <typename scalar_t, int kMode>
void dispatch_flags(const SamplerStepArgs& a) {
  const bool noise = a.sigma != 0.0;
  if (a.clip) {
    noise ? run_step<scalar_t, kMode, true, true>(a) : run_step<scalar_t, kMode, true, false>(a);
  } else {
    noise ? run_step<scalar_t, kMode, false, true>(a) : run_step<scalar_t, kMode, false, false>(a);
  }
}

template <typename scalar_t>
void dispatch_mode(const SamplerStepArgs& a) {
  switch (a.variance_mode) {
    case kVarianceLearned: return dispatch_flags<scalar_t, kVarianceLearned>(a);
    case kVarianceLearnedRange: return dispatch_flags<scalar_t, kVarianceLearnedRange>(a);
    default: return dispatch_flags<scalar_t, kVarianceFixed>(a);
  }
}

template <typename scalar_t>
void run_normal(const NormalArgs& a) {
  auto* y = static_cast<scalar_t*>(a.y);
  const TaskGrid grid(a.batch, a.numel_per_sample);
  parallel_for(grid.num_tasks, grid.threads(a.num_threads), [&](int64_t task) {
    grid.run(task, [&](int64_t sample, int64_t begin, int64_t end) {
      scalar_t* ys = y + sample * a.numel_per_sample;
      float z[kNoiseBlock];
      for (int64_t b0 = begin; b0 < end; b0 += kNoiseBlock) {
        const int64_t len = std::min<int64_t>(kNoiseBlock, end - b0);
        normal_block(a.seed, static_cast<uint32_t>(a.sample_offset + sample), a.step,
                     static_cast<uint32_t>(b0 / 4), static_cast<int>((len + 3) / 4), z);
        for (int64_t j = 0; j < len; ++j) ys[b0 + j] = static_cast<scalar_t>(z[j]);
      }
    });
  });
}

}  // namespace

void sampler_step_cpu(const SamplerStepArgs& args) {
  if (args.dtype == kFloat64) {
    dispatch_mode<double>(args);
  } else {
    dispatch_mode<float>(args);
  }
}

void philox_normal_cpu(const NormalArgs& args) {
  if (args.dtype == kFloat64) {
    run_normal<double>(args);
  } else {
    run_normal<float>(args);
  }
}

}  // namespace fastdiff
