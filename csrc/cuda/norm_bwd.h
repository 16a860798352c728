// Torch-free launcher of the fused norm backward (kernels/deepstack/norm_bwd.cuh).
#pragma once
#include <cuda_runtime_api.h>
#include <string>

#include "kernels/common/dtype.h"
#include "kernels/deepstack/norm_bwd.h"

namespace hires::deepstack {

// Launches both stages on `stream`; returns an empty string or the reason it could not launch.
std::string launch_norm_bwd(const NormBwdParams& p, DType t, cudaStream_t stream);

}  // namespace hires::deepstack
