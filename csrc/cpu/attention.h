// CPU twin of kernels/attention/flash_fwd.cuh: the same FlashParams, the same Q/K/V tiling
// (flash_fwd_tile: 64- or 128-row Q blocks), the same online softmax in the log2 domain, P rounded to the input dtype
// before the P.V product (as the tensor-core kernel does), fp32 accumulation.
#pragma once
#include <ATen/ATen.h>

#include "kernels/attention/flash_params.h"

namespace hires::attention {

// o must be preallocated (dense: (B,Sq,Hq,D) with p.o_* strides; varlen: rows outside every
// sequence are left untouched); p.lse, when set, receives every row's natural-log lse. Causal,
// sliding window and softcap as in FlashParams; varlen work follows cu_seqlens, not max_seqlen.
void flash_fwd_cpu(const FlashParams& p, at::ScalarType t);

}  // namespace hires::attention
