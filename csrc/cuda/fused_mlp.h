// Torch-free launcher of the fused ConvNeXt MLP kernel (kernels/convnext/fused_mlp.cuh):
//   out = res + gamma * (round_T(GELU_erf(x W1^T + b1)) W2^T + b2), the hidden never in HBM.
// Parameters and limits: kernels/convnext/fused_mlp.h (FusedMlpParams, fused_mlp_shape_ok).
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>
#include <string>

#include "kernels/common/dtype.h"
#include "kernels/convnext/fused_mlp.h"

namespace hires::convnext {

// fp16/bf16, C in kFusedMlpWidths, F % BH == 0. The caller also guarantees contiguous rows and
// 16-byte aligned pointers (x, w1, w2, residual, out; b1, b2, gamma 4-byte aligned or null).
bool fused_mlp_supported(DType t, int64_t C, int64_t F);

// Launches on `stream`; returns "" or the error text. Sets the kernel's dynamic shared-memory
// limit once per (instantiation, device).
std::string launch_fused_mlp(const FusedMlpParams& p, DType t, cudaStream_t stream);

}  // namespace hires::convnext
