// Torch-free launcher of the fused depthwise 7x7 conv + LayerNorm kernel
// (kernels/convnext/dwconv_layernorm.cuh, csrc/cuda/dwconv_layernorm.cu).
#pragma once
#include <cuda_runtime_api.h>
#include <string>

#include "kernels/common/dtype.h"
#include "kernels/convnext/dwconv_layernorm.h"

namespace hires::convnext {

// Launches on `stream`; returns an empty string or the reason it could not launch.
std::string launch_dwconv_layernorm(const DwconvLnParams& p, DType t, cudaStream_t stream);

}  // namespace hires::convnext
