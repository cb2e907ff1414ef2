// Fused GroupNorm (+ affine + SiLU) on CPU, and the small vector helpers that the fused
// CPU kernels share (bf16 <-> fp32 by bit shifts, a vectorisable exp).
//
// fastdiff/ops/group_norm.py validates every argument; these kernels assume valid input.
#pragma once
#include "cpu/bits.h"
#include "dtypes.h"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastdiff {


struct GroupNormArgs {
  const void* x;        // in,  (N, C, S) dense: NCS (channels-first) or NSC (channels_last)
  const float* weight;  // in,  (C,) gamma (ones when the op has no affine)
  const float* bias;    // in,  (C,) beta (zeros when the op has no affine)
  void* y;              // out, same shape and layout as x
  float* mean;          // out, (N, G) group means, saved for backward
  float* rstd;          // out, (N, G) 1 / sqrt(var + eps), saved for backward
  int64_t batch, channels, spatial, groups;
  double eps;
  bool channels_last;  // false: x[n, c, s] at (n*C + c)*S + s; true: at (n*S + s)*C + c
  bool act;            // apply SiLU after the affine
  int dtype;           // dtypes.h code of x, y: kFloat32 or kBFloat16 (fp32 math)
  int num_threads;
};

struct GroupNormBackwardArgs {
  const void* grad_y;   // in,  (N, C, S), same layout as x
  const void* x;        // in,  (N, C, S)
  const float* weight;  // in,  (C,)
  const float* bias;    // in,  (C,)
  const float* mean;    // in,  (N, G)
  const float* rstd;    // in,  (N, G)
  void* grad_x;         // out, (N, C, S), same layout as x
  float* grad_weight;   // out, (C,)
  float* grad_bias;     // out, (C,)
  int64_t batch, channels, spatial, groups;
  bool channels_last;
  bool act;
  int dtype;
  int num_threads;
};

void group_norm_silu_forward_cpu(const GroupNormArgs& args);
void group_norm_silu_backward_cpu(const GroupNormBackwardArgs& args);

// ----------------------------------------------------------------------------- helpers
// Written as plain scalar code that GCC vectorises inside `#pragma omp simd` loops.

inline float load_value(const float* p, int64_t i) { return p[i]; }
inline float load_value(const uint16_t* p, int64_t i) { return bits_to_float(uint32_t(p[i]) << 16); }

// fp32 -> bf16, round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t((u >> 16) | 0x40u) : uint16_t(rounded);
}

inline void store_value(float* p, int64_t i, float v) { p[i] = v; }
inline void store_value(uint16_t* p, int64_t i, float v) { p[i] = float_to_bf16(v); }

// e^x for fp32, ~2 ulp, for x in [-87.3, 88.3] (2^n stays a normal float): Cody-Waite
// reduction x = n ln2 + r, |r| <= ln2/2, then a polynomial of e^r scaled by 2^n through
// the exponent bits.
inline float exp_in_range(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693145751953125f;     // ln 2, first 16 bits (exact n * kLn2Hi)
  const float kLn2Lo = 1.428606765330187e-06f;  // ln 2 - kLn2Hi
  const float n = std::nearbyint(x * kLog2e);
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  // Degree-6 near-minimax fit of e^r on [-ln2/2, ln2/2] (iteratively reweighted least
  // squares on the relative error): 1.9e-9 in exact arithmetic, 1e-7 evaluated in fp32,
  // as accurate as the degree-7 Taylor series with one FMA less.
  float p = 0.001383684342727065f;
  p = p * r + 0.008374815806746483f;
  p = p * r + 0.04166822507977486f;
  p = p * r + 0.16666419804096222f;
  p = p * r + 0.49999991059303284f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * bits_to_float(uint32_t(int32_t(n) + 127) << 23);
}

// e^x for any x: 0 below -87.3 (so exp(-inf) = 0, as online softmax needs), about
// e^88.3 = 2e38 above 88.3, NaN stays NaN (through r). std::max/min map to single
// vmaxps/vminps (std::fmax/fmin stay libm calls: NaN rules).
inline float exp_approx(float x) {
  const float result = exp_in_range(std::min(std::max(x, -87.3f), 88.3f));
  return x < -87.3f ? 0.0f : result;
}

// 1 / (1 + e^-z). Clamping z (not -z) keeps the clamp two vmaxps/vminps; outside the
// clamp e^-z is < 1.2e-38 or > 2e38, where the quotient is 1 or 0 to fp32 precision.
inline float sigmoid_approx(float z) {
  const float zc = std::min(std::max(z, -88.3f), 87.3f);
  return 1.0f / (1.0f + exp_in_range(-zc));
}

}  // namespace fastdiff
