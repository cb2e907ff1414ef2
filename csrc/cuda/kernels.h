// CUDA kernels of fastdiff (module fastdiff._C_cuda): raw device pointers, sizes and a
// cudaStream_t; no libtorch. Python (fastdiff/triton_kernels/cuda_native.py) checks every
// tensor, allocates outputs and workspaces, and passes torch's current stream.
#pragma once
#if defined(FASTDIFF_CUDA_HOST_EMULATION)
#include "cuda/host_emulation.h"
#else
#include <cuda_runtime.h>
// FASTDIFF_LAUNCH(grid, block, stream, kernel<...>)(args...): a launch, also under host emulation.
#define FASTDIFF_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
#endif

#include <cstdint>

#include "dtypes.h"

namespace fastdiff_cuda {

// Storage types: the codes of csrc/dtypes.h, shared with the CPU kernels (fp32 arithmetic
// except kF64, which computes in fp64).
enum Storage : int {
  kF32 = fastdiff::kFloat32,
  kF16 = fastdiff::kFloat16,
  kBF16 = fastdiff::kBFloat16,
  kF64 = fastdiff::kFloat64
};

struct SamplerStepArgs {
  const void* x;             // in,  (batch, numel) dense
  const void* model_output;  // in,  (batch, out_stride): mean part [0, numel), variance [numel, 2 numel)
  void* y;                   // out, (batch, numel) dense
  const double* coef_table;  // in,  (S, 7) [a1, a2, c1, c2, sigma, min_log, max_log], or nullptr
  const int64_t* step_index; // in,  () row of coef_table and Philox step, or nullptr
  int64_t table_rows;        // S: the index is clamped to [0, S)
  int64_t batch, numel, out_stride;
  double a1, a2, c1, c2, sigma, min_log, max_log;  // used when coef_table is nullptr
  uint64_t seed;
  uint32_t step;                                   // used when coef_table is nullptr
  uint32_t sample_offset;
  bool clip;
  int variance_mode;  // 0 fixed, 1 learned, 2 learned_range
  int storage;
};

cudaError_t sampler_step(const SamplerStepArgs& a, cudaStream_t stream);
cudaError_t philox_normal(void* y, int64_t batch, int64_t numel, uint64_t seed, uint32_t step,
                          uint32_t sample_offset, int storage, cudaStream_t stream);

struct GroupNormArgs {
  const void* x;        // in,  (N, C, S) NCS- or NSC-dense
  const float* weight;  // in,  (C,) fp32
  const float* bias;    // in,  (C,) fp32
  void* y;              // out, (N, C, S), x's layout and storage
  float* mean;          // out, (N, G)
  float* rstd;          // out, (N, G)
  float* workspace;     // (2, splits, N, C) fp32
  int64_t n, c, s, groups, splits;
  double eps;
  bool channels_last, act;
  int storage;          // kF32, kF16 or kBF16 (float64 is refused at the binding)
};

struct GroupNormBackwardArgs {
  const void* grad_y;   // in,  (N, C, S), x's layout
  const void* x;        // in,  (N, C, S)
  const float* weight;  // in,  (C,)
  const float* bias;    // in,  (C,)
  const float* mean;    // in,  (N, G)
  const float* rstd;    // in,  (N, G)
  void* grad_x;         // out, (N, C, S), x's layout
  float* grad_weight;   // out, (C,)
  float* grad_bias;     // out, (C,)
  float* workspace;     // (2, splits, N, C) + (2, N, G) fp32
  int64_t n, c, s, groups, splits;
  bool channels_last, act;
  int storage;
};

// How many S splits to use; the caller sizes the workspace with it:
// forward 2 * splits * N * C floats, backward that + 2 * N * G.
int64_t group_norm_splits(int64_t n, int64_t c, int64_t s, bool channels_last);
cudaError_t group_norm_silu_forward(const GroupNormArgs& a, cudaStream_t stream);
cudaError_t group_norm_silu_backward(const GroupNormBackwardArgs& a, cudaStream_t stream);

}  // namespace fastdiff_cuda
