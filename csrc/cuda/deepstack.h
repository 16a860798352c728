// Torch-free launcher of the DeepStack injection + norm kernel (csrc/cuda/deepstack.cu).
#pragma once
#include <cuda_runtime_api.h>
#include <string>

#include "kernels/common/dtype.h"
#include "kernels/deepstack/inject_norm.h"

namespace hires::deepstack {

// Largest dim the kernel holds in registers for a dtype (the binding checks against it).
int64_t max_dim(DType t);

// Launches on `stream`; returns an empty string or the reason it could not launch.
std::string launch_inject_norm(const InjectNormParams& p, DType t, DType e, Norm norm,
                               cudaStream_t stream);

}  // namespace hires::deepstack
