// Torch-free dtype tag shared by launchers (.cu) and bindings (.cpp).
#pragma once
#include <cstdint>

namespace hires {

enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline const char* dtype_str(DType t) {
  switch (t) {
    case DType::kF32: return "float32";
    case DType::kF16: return "float16";
    case DType::kBF16: return "bfloat16";
  }
  return "?";
}

}  // namespace hires
