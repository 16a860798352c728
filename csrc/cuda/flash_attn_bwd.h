// Torch-free launcher of the flash attention backward (csrc/cuda/flash_attn_bwd.cu,
// kernels/attention/flash_bwd.cuh).
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>
#include <string>

#include "kernels/attention/flash_bwd_params.h"
#include "kernels/common/dtype.h"

namespace hires::attention {

// Head dims with a backward tensor-core kernel (the binding runs ATen math for the others).
bool flash_bwd_supported_head_dim(int64_t head_dim);

// Launches preprocess (dsum), the main kernel (dK, dV, atomics into dq_accum) and the dQ convert
// on `stream` (fp16/bf16 only; p.dq_accum zeroed by the caller). Returns an empty string or the
// reason it could not launch. Never synchronizes.
std::string launch_flash_bwd(const FlashBwdParams& p, DType t, cudaStream_t stream);

}  // namespace hires::attention
