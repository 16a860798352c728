// CPU twin of kernels/convnext/dwconv_bwd.cuh: the same formula, the same row chunks and the same
// per-(tap, channel) accumulation order (chunk rows, then columns), the chunks added in order.
#pragma once
#include <ATen/ATen.h>

#include "kernels/convnext/dwconv_bwd.h"

namespace hires::convnext {

void dwconv_bwd_cpu(const DwconvBwdParams& p, at::ScalarType t);

}  // namespace hires::convnext
