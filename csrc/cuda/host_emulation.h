// Runs the CUDA kernels of csrc/cuda on the CPU, for tests on machines without a GPU.
//
// With -DFASTDIFF_CUDA_HOST_EMULATION the .cu files compile as plain C++ (g++ -x c++): every
// launch runs its blocks one after another, each block as blockDim.x std::threads sharing
// the kernel's `__shared__` arrays (made `static`: one block at a time uses them) and a
// barrier for `__syncthreads()`. The kernels' own code -- indexing, tiling, reductions,
// workspace layout, stores -- is what runs; only the device math intrinsics are replaced by
// host equivalents (sincospi via double sin/cos, __expf via expf, __umulhi exactly).
// tests/test_cuda_build.py builds this and compares it to the references.
#pragma once

#include <math.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

// ----------------------------------------------------------------- qualifiers and types
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
using cudaStream_t = struct CUstream_st*;
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid argument"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 0;
  return cudaSuccess;
}

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 {
  uint32_t x, y, z, w;
};
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

// fp16: IEEE binary16 (GCC's _Float16 converts with round-to-nearest-even, as __float2half_rn).
using __half = _Float16;
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half_rn(float f) { return static_cast<__half>(f); }

// bf16: the high half of an fp32, rounded to nearest even.
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}

// ----------------------------------------------------------------- intrinsics
inline uint32_t __umulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}
inline void sincospif(float x, float* s, float* c) {
  const double a = 3.14159265358979323846 * static_cast<double>(x);
  *s = static_cast<float>(std::sin(a));
  *c = static_cast<float>(std::cos(a));
}
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
using std::exp;  // sqrtf, logf, fmaxf: the C library's, from <math.h>
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }

namespace fastdiff_cuda_emulation {

inline std::barrier<>*& block_barrier() {
  static std::barrier<>* current = nullptr;
  return current;
}
inline float* exchange() {
  static float slots[1024];
  return slots;
}

// Run a grid: blocks sequentially, the threads of a block concurrently.
template <typename Body>
void run_grid(dim3 grid, dim3 block, Body body) {
  const unsigned threads = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> barrier(threads);
        block_barrier() = &barrier;
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            blockIdx = dim3(bx, by, bz);
            blockDim = block;
            gridDim = grid;
            body();
          });
        for (auto& th : pool) th.join();
        block_barrier() = nullptr;
      }
}

}  // namespace fastdiff_cuda_emulation

inline void __syncthreads() { fastdiff_cuda_emulation::block_barrier()->arrive_and_wait(); }

// Every thread of the (single-warp) block calls it together, as on the device.
inline float __shfl_down_sync(unsigned, float v, int offset) {
  float* slots = fastdiff_cuda_emulation::exchange();
  const unsigned lane = threadIdx.x;
  slots[lane] = v;
  __syncthreads();
  const float r = (lane % 32 + offset < 32 && lane + offset < blockDim.x) ? slots[lane + offset] : v;
  __syncthreads();
  return r;
}

#define FASTDIFF_LAUNCH(grid, block, stream, ...)                                                      \
  [&](auto... launch_args) {                                                                          \
    fastdiff_cuda_emulation::run_grid(dim3(grid), dim3(block), [&] { __VA_ARGS__(launch_args...); }); \
  }
