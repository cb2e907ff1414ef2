// Fused reverse-diffusion step and Philox normals on the GPU: the same maths and the same
// noise stream as csrc/cpu/sampler_step.cpp, fastdiff/ops/sampler_step.py (reference) and
// triton_kernels/sampler_step.py. Philox4x32-10, counter (element / 4, sample, step, 0),
// key (seed mod 2^32, seed >> 32); each thread computes one counter = 4 elements.
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace fastdiff_cuda {
namespace {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
constexpr int kThreads = 256;

struct Quad {
  float v[4];
};

__device__ __forceinline__ uint4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                               uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    const uint32_t hi0 = __umulhi(kM0, c0), lo0 = kM0 * c0;
    const uint32_t hi1 = __umulhi(kM1, c2), lo1 = kM1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return make_uint4(c0, c1, c2, c3);
}

// 23 random bits -> odd multiple of 2^-24 in (0, 1), exact in fp32.
__device__ __forceinline__ float uniform_open01(uint32_t bits) {
  return static_cast<float>(((bits >> 9) << 1) | 1u) * 5.9604644775390625e-8f;
}

__device__ __forceinline__ Quad normals4(uint32_t quad, uint32_t sample, uint32_t step, uint64_t seed) {
  const uint4 r = philox4x32_10(quad, sample, step, 0u, static_cast<uint32_t>(seed),
                                static_cast<uint32_t>(seed >> 32));
  const float radius_a = sqrtf(-2.0f * logf(uniform_open01(r.x)));
  const float radius_b = sqrtf(-2.0f * logf(uniform_open01(r.z)));
  float sa, ca, sb, cb;
  sincospif(2.0f * uniform_open01(r.y), &sa, &ca);  // angle 2 pi u; sincospi reduces exactly
  sincospif(2.0f * uniform_open01(r.w), &sb, &cb);
  return {{radius_a * ca, radius_a * sa, radius_b * cb, radius_b * sb}};
}

// Four consecutive elements, loaded or stored as one vector access (16 bytes for fp32, 8 for
// fp16/bf16, two 16-byte accesses for fp64) when the launch found every row 4-aligned.
template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <typename T, bool kVec>
__device__ __forceinline__ void load4(const T* p, int64_t e0, int64_t numel, typename Acc<T>::type* out) {
  if (kVec) {
    const Vec4<T> q = *reinterpret_cast<const Vec4<T>*>(p + e0);
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = to_acc(q.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = e0 + j < numel ? to_acc(p[e0 + j]) : typename Acc<T>::type(0);
  }
}

template <typename T, int kMode, bool kClip, bool kVec>
__global__ void sampler_step_kernel(SamplerStepArgs a) {
  using acc_t = typename Acc<T>::type;
  const int64_t quads = (a.numel + 3) / 4;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid >= a.batch * quads) return;
  const int64_t sample = tid / quads, quad = tid % quads;
  acc_t a1 = a.a1, a2 = a.a2, c1 = a.c1, c2 = a.c2, sigma = a.sigma, min_log = a.min_log, max_log = a.max_log;
  uint32_t step = a.step;
  if (a.coef_table != nullptr) {  // device-side step index: one CUDA graph serves every step
    int64_t i = *a.step_index;
    i = i < 0 ? 0 : (i >= a.table_rows ? a.table_rows - 1 : i);  // never outside the table
    const double* row = a.coef_table + 7 * i;
    a1 = row[0], a2 = row[1], c1 = row[2], c2 = row[3], sigma = row[4], min_log = row[5], max_log = row[6];
    step = static_cast<uint32_t>(i);
  }
  const T* x = static_cast<const T*>(a.x) + sample * a.numel;
  const T* out = static_cast<const T*>(a.model_output) + sample * a.out_stride;
  T* y = static_cast<T*>(a.y) + sample * a.numel;
  Quad z{{0.f, 0.f, 0.f, 0.f}};
  if (sigma != acc_t(0))  // eta = 0 and the last step: no Philox at all
    z = normals4(static_cast<uint32_t>(quad), a.sample_offset + static_cast<uint32_t>(sample), step, a.seed);
  const int64_t e0 = 4 * quad;
  acc_t xv[4], mv[4], vv[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  load4<T, kVec>(x, e0, a.numel, xv);
  load4<T, kVec>(out, e0, a.numel, mv);
  if (kMode != 0 && sigma != acc_t(0)) load4<T, kVec>(out + a.numel, e0, a.numel, vv);
  Vec4<T> result;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    acc_t x0 = a1 * xv[j] + a2 * mv[j];
    if (kClip) x0 = x0 < acc_t(-1) ? acc_t(-1) : (x0 > acc_t(1) ? acc_t(1) : x0);
    acc_t value = c1 * x0 + c2 * xv[j];
    if (sigma != acc_t(0)) {
      acc_t scale = sigma;
      if (kMode == 1) scale *= exp(acc_t(0.5) * vv[j]);
      if (kMode == 2) {
        const acc_t frac = acc_t(0.5) * (vv[j] + acc_t(1));  // Eq. 101 (errata)
        scale *= exp(acc_t(0.5) * (frac * max_log + (acc_t(1) - frac) * min_log));
      }
      value += scale * static_cast<acc_t>(z.v[j]);
    }
    result.v[j] = from_acc<T>(value);
  }
  if (kVec) {
    *reinterpret_cast<Vec4<T>*>(y + e0) = result;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (e0 + j < a.numel) y[e0 + j] = result.v[j];
  }
}

template <typename T>
__global__ void normal_kernel(T* y, int64_t batch, int64_t numel, uint64_t seed, uint32_t step,
                              uint32_t sample_offset) {
  const int64_t quads = (numel + 3) / 4;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid >= batch * quads) return;
  const int64_t sample = tid / quads, quad = tid % quads;
  const Quad z = normals4(static_cast<uint32_t>(quad), sample_offset + static_cast<uint32_t>(sample), step, seed);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t e = 4 * quad + j;
    if (e < numel) y[sample * numel + e] = from_acc<T>(static_cast<typename Acc<T>::type>(z.v[j]));
  }
}

// Every row of x, y and the model output starts on a 4-element boundary (vector accesses).
template <typename T>
bool rows_aligned(const SamplerStepArgs& a) {
  const uintptr_t bytes = 4 * sizeof(T);
  return a.numel % 4 == 0 && (a.batch <= 1 || a.out_stride % 4 == 0) &&
         reinterpret_cast<uintptr_t>(a.x) % bytes == 0 && reinterpret_cast<uintptr_t>(a.y) % bytes == 0 &&
         reinterpret_cast<uintptr_t>(a.model_output) % bytes == 0;
}

template <typename T, int kMode, bool kClip>
void launch_vec(const SamplerStepArgs& a, dim3 grid, cudaStream_t stream) {
  if (rows_aligned<T>(a))
    FASTDIFF_LAUNCH(grid, kThreads, stream, sampler_step_kernel<T, kMode, kClip, true>)(a);
  else
    FASTDIFF_LAUNCH(grid, kThreads, stream, sampler_step_kernel<T, kMode, kClip, false>)(a);
}

template <typename T, int kMode>
void launch_mode(const SamplerStepArgs& a, dim3 grid, cudaStream_t stream) {
  if (a.clip)
    launch_vec<T, kMode, true>(a, grid, stream);
  else
    launch_vec<T, kMode, false>(a, grid, stream);
}

template <typename T>
void launch_step(const SamplerStepArgs& a, dim3 grid, cudaStream_t stream) {
  switch (a.variance_mode) {
    case 1: return launch_mode<T, 1>(a, grid, stream);
    case 2: return launch_mode<T, 2>(a, grid, stream);
    default: return launch_mode<T, 0>(a, grid, stream);  // the binding admits only 0, 1, 2
  }
}

}  // namespace

cudaError_t sampler_step(const SamplerStepArgs& a, cudaStream_t stream) {
  const int64_t threads = a.batch * ((a.numel + 3) / 4);
  if (threads == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((threads + kThreads - 1) / kThreads));
  switch (a.storage) {
    case kF16: launch_step<__half>(a, grid, stream); break;
    case kBF16: launch_step<__nv_bfloat16>(a, grid, stream); break;
    case kF64: launch_step<double>(a, grid, stream); break;
    case kF32: launch_step<float>(a, grid, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t philox_normal(void* y, int64_t batch, int64_t numel, uint64_t seed, uint32_t step,
                          uint32_t sample_offset, int storage, cudaStream_t stream) {
  const int64_t threads = batch * ((numel + 3) / 4);
  if (threads == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((threads + kThreads - 1) / kThreads));
  switch (storage) {
    case kF16: FASTDIFF_LAUNCH(grid, kThreads, stream, normal_kernel)(static_cast<__half*>(y), batch, numel, seed, step, sample_offset); break;
    case kBF16: FASTDIFF_LAUNCH(grid, kThreads, stream, normal_kernel)(static_cast<__nv_bfloat16*>(y), batch, numel, seed, step, sample_offset); break;
    case kF64: FASTDIFF_LAUNCH(grid, kThreads, stream, normal_kernel)(static_cast<double*>(y), batch, numel, seed, step, sample_offset); break;
    case kF32: FASTDIFF_LAUNCH(grid, kThreads, stream, normal_kernel)(static_cast<float*>(y), batch, numel, seed, step, sample_offset); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace fastdiff_cuda
