// CPU implementations of dwconv_layernorm (kernels/convnext/dwconv_layernorm.cuh has the formula):
//   dwconv_layernorm_cpu       the CPU twin of the tiled CUDA kernel: the same tile choice
//                              (DwconvLnTiling::pick), tiles, channel chunks, staged input rows
//                              (converted to fp32 once), per-thread 8-column strips, fp32 FMA
//                              order, warp-style lane-strided + butterfly LayerNorm statistics;
//                              tiles split over at::parallel_for. Used with HIRES_LMM_CPU_TWIN=1
//                              and for what the fast path does not take.
//   dwconv_layernorm_cpu_fast  the default CPU path: a fused AVX2/FMA kernel (input rows
//                              converted to fp32 once per thread, 4-pixel x 8-channel register
//                              tiles, LayerNorm of each 4-pixel group while it is in L1).
#pragma once
#include <ATen/ATen.h>

#include "kernels/convnext/dwconv_layernorm.h"

namespace hires::convnext {

void dwconv_layernorm_cpu(const DwconvLnParams& p, at::ScalarType t);

// Returns false (and writes nothing) when it does not apply: no AVX2/FMA on this CPU, C % 8 != 0,
// or a non-finite conv weight (the padding must not be multiplied). A pixel whose fp32 statistic
// is not finite is redone in fp64, as the kernels do.
bool dwconv_layernorm_cpu_fast(const DwconvLnParams& p, at::ScalarType t);

}  // namespace hires::convnext
