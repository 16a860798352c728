// CPU twin of kernels/convnext/fused_mlp.cuh (the fused ConvNeXt MLP): the kernel's tiling in
// plain loops, used under HIRES_LMM_CPU_TWIN=1 to prove the algorithm against the reference.
#pragma once
#include <ATen/ATen.h>

#include "kernels/convnext/fused_mlp.h"

namespace hires::convnext {

// out = round_T(res + gamma * (round_T(GELU_erf(x W1^T + b1)) W2^T + b2)), any C and F (a last
// partial hidden chunk where F % BH != 0, which the CUDA kernel does not take). T = t.
void fused_mlp_cpu(const FusedMlpParams& p, at::ScalarType t);

}  // namespace hires::convnext
