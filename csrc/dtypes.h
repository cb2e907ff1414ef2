// The one table of storage dtype codes, shared by every kernel (CPU in csrc/cpu, CUDA in
// csrc/cuda) and by both binding files. Python never hard-codes a code: each module
// exports this table as `dtype_codes` ({"float32": 0, ...}) and the launchers look codes up
// there. Each binding checks that the code it receives is one its kernel supports.
#pragma once
#include <string>

namespace fastdiff {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    case kFloat64: return "float64";
    default: return nullptr;
  }
}

}  // namespace fastdiff
