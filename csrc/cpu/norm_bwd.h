// CPU twin of kernels/deepstack/norm_bwd.cuh: the same formula, the same row chunks and the same
// two-stage fp32 reduction order for dweight / dbias (chunks run in parallel, each in row order).
#pragma once
#include <ATen/ATen.h>

#include "kernels/deepstack/norm_bwd.h"

namespace hires::deepstack {

void norm_bwd_cpu(const NormBwdParams& p, at::ScalarType t);

}  // namespace hires::deepstack
