// Choice between the default CPU path of an op and its CPU twin (the line-by-line model of the
// CUDA kernel's tiling that the tests use to prove the CUDA algorithm; README "CPU paths").
#pragma once
#include <cstdlib>
#include <cstring>

namespace hires {

// HIRES_LMM_CPU_TWIN=1 (read at each call): every CPU call runs the twin, never the default
// (ATen-based or vectorized) CPU path.
inline bool cpu_twin_forced() {
  const char* twin = std::getenv("HIRES_LMM_CPU_TWIN");
  return twin != nullptr && std::strcmp(twin, "1") == 0;
}

}  // namespace hires
