// Torch-free launcher of the depthwise conv backward (kernels/convnext/dwconv_bwd.cuh).
#pragma once
#include <cuda_runtime_api.h>
#include <string>

#include "kernels/common/dtype.h"
#include "kernels/convnext/dwconv_bwd.h"

namespace hires::convnext {

// Launches the three kernels on `stream`; returns an empty string or the reason it could not.
std::string launch_dwconv_bwd(const DwconvBwdParams& p, DType t, cudaStream_t stream);

}  // namespace hires::convnext
