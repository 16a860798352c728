// Choice between the default CPU path of an op and its CPU twin (the line-by-line model of the
// CUDA kernel's tiling that the tests use to prove the CUDA algorithm; README "CPU paths").
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

namespace hires {

// HIRES_LMM_CPU_TWIN=1 (read at each call): every CPU call runs the twin, never the default
// (ATen-based or vectorized) CPU path.
inline bool cpu_twin_forced() {
  const char* twin = std::getenv("HIRES_LMM_CPU_TWIN");
  return twin != nullptr && std::strcmp(twin, "1") == 0;
}

// True when every entry of a LayerNorm's rstd is finite and > 0 (a direct loop: the tensor is
// small, one entry per row, and a chain of ATen reductions would cost more than the check).
inline bool rstd_ok(const at::Tensor& rstd) {
  const at::Tensor r = rstd.to(at::kFloat).contiguous();
  const float* p = r.const_data_ptr<float>();
  bool ok = true;
  for (int64_t i = 0, n = r.numel(); i < n; ++i) ok &= std::isfinite(p[i]) && p[i] > 0.f;
  return ok;
}

}  // namespace hires
