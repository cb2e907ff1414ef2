// Argument checks at the binding boundary (csrc/bindings.cpp, csrc/cuda/bindings.cpp).
// fastdiff/ops validates tensors before it calls a kernel; these checks make the raw
// bindings safe on their own: an unknown enum or an impossible size throws
// std::invalid_argument, which pybind11 raises in Python as ValueError.
#pragma once
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "dtypes.h"

namespace fastdiff {

[[noreturn]] inline void fail(const std::string& where, const std::string& what) {
  throw std::invalid_argument(where + ": " + what);
}

// `code` must be one of `allowed` (codes of dtypes.h).
inline void check_dtype(const char* where, const char* arg, int code, std::initializer_list<int> allowed) {
  std::string names;
  for (int a : allowed) {
    if (a == code) return;
    names += std::string(names.empty() ? "" : ", ") + dtype_name(a) + " (" + std::to_string(a) + ")";
  }
  const char* got = dtype_name(code);
  fail(where, std::string(arg) + " code " + std::to_string(code) + (got ? std::string(" (") + got + ")" : "") +
                  " is not supported here; expected one of " + names);
}

inline void check_range(const char* where, const char* arg, int64_t value, int64_t low, int64_t high) {
  if (value < low || value > high)
    fail(where, std::string(arg) + " must be in [" + std::to_string(low) + ", " + std::to_string(high) +
                    "], got " + std::to_string(value));
}

inline void check_at_least(const char* where, const char* arg, int64_t value, int64_t low) {
  if (value < low) fail(where, std::string(arg) + " must be >= " + std::to_string(low) + ", got " + std::to_string(value));
}

inline void check_finite(const char* where, const char* arg, double value) {
  if (!std::isfinite(value)) fail(where, std::string(arg) + " must be finite, got " + std::to_string(value));
}

inline void check_pointer(const char* where, const char* arg, uintptr_t p) {
  if (p == 0) fail(where, std::string(arg) + " is a null pointer");
}

// 0 fixed, 1 learned, 2 learned_range (fastdiff/ops/sampler_step.py VARIANCE_MODES).
inline void check_variance_mode(const char* where, int mode) {
  if (mode < 0 || mode > 2)
    fail(where, "variance_mode must be 0 (fixed), 1 (learned) or 2 (learned_range), got " + std::to_string(mode));
}

// The noise counter's sample word is 32 bits: sample_offset + batch - 1 must fit.
inline void check_sample_range(const char* where, int64_t sample_offset, int64_t batch) {
  check_range(where, "sample_offset", sample_offset, 0, 0xFFFFFFFFll);
  if (batch > 0 && sample_offset + batch - 1 > 0xFFFFFFFFll)
    fail(where, "sample_offset + batch - 1 must be < 2^32, got " + std::to_string(sample_offset) + " + " +
                    std::to_string(batch));
}

// Sizes (N, C, S, G) of a GroupNorm call.
inline void check_group_norm_sizes(const char* where, int64_t n, int64_t c, int64_t s, int64_t groups) {
  check_at_least(where, "batch", n, 1);
  check_at_least(where, "channels", c, 1);
  check_at_least(where, "spatial", s, 1);
  check_range(where, "groups", groups, 1, c);
  if (c % groups != 0)
    fail(where, "groups must divide channels, got channels=" + std::to_string(c) + " groups=" + std::to_string(groups));
}

}  // namespace fastdiff
