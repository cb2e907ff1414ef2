// Bit-level reinterpretation between float and uint32, shared by the CPU kernels.
// memcpy, not a union or a pointer cast: defined behaviour, and compiled to a register move.
#pragma once
#include <cstdint>
#include <cstring>

namespace fastdiff {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

}  // namespace fastdiff
