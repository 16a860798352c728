// Fused erf-GELU value and derivative on the CPU (the ConvNeXt MLP backward, csrc/convnext_bwd.cpp).
#pragma once
#include <ATen/ATen.h>

namespace hires::convnext {

// For u and dh of one shape, float32, contiguous (fp16 / bf16: false; ATen's two passes measured
// faster for them on this CPU: 2.5 vs 3.2-3.7 ms at 2304 x 768, one thread; fp32 1.5-2.9x faster):
//   gu = GELU(u) = u Phi(u),   du = dh * GELU'(u) = dh * (Phi(u) + u phi(u)),
// each computed in fp32 and rounded to the dtype once, Phi / phi the normal CDF / density, with
// one exp(-u^2 / 2) per element for both (what at::gelu and at::gelu_backward compute in two
// passes). Phi from the Abramowitz-Stegun 7.1.26 erfc form (absolute error < 1.5e-7, the one
// ATen's vectorized erf uses), taken as erfc(|z|) directly for u < 0 (no 1 - erf cancellation).
// dh undefined: gu only (du left undefined). Returns false (and writes nothing) where there is no
// AVX2 / FMA: the caller runs ATen's ops.
bool gelu_fwd_bwd_cpu(const at::Tensor& u, const at::Tensor& dh, at::Tensor& gu, at::Tensor& du);

}  // namespace hires::convnext
