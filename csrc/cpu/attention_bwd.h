// CPU twin of kernels/attention/flash_bwd.cuh (FlashAttention-2 backward): the same
// FlashBwdParams, the same tiling (one work item = kBlockN keys of one (batch, kv head), walking
// the Q blocks of every query head of its GQA group), fp32 accumulation.
#pragma once
#include <ATen/ATen.h>

#include "kernels/attention/flash_bwd_params.h"

namespace hires::attention {

// p.dq/dk/dv preallocated with the strides of q/k/v; p.dq_accum and p.dsum zeroed fp32
// workspaces (see FlashBwdParams). Varlen rows outside every sequence get dq = 0.
void flash_bwd_cpu(const FlashBwdParams& p, at::ScalarType t);

}  // namespace hires::attention
