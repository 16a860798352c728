// CPU twin of kernels/convnext/dwconv_layernorm.cuh: per output pixel the same fp32 sums in the
// same order (taps row by row, bias last), then a two-pass LayerNorm over C; rows (b, h) are
// split over at::parallel_for.
#pragma once
#include <ATen/ATen.h>

#include "kernels/convnext/dwconv_layernorm.h"

namespace hires::convnext {

void dwconv_layernorm_cpu(const DwconvLnParams& p, at::ScalarType t);

}  // namespace hires::convnext
