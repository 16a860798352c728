// CPU twin of kernels/deepstack/inject_norm.cuh: the same parameters, the same lookup (binary
// search in the sorted index), the same roundings; rows split over at::parallel_for. By default
// (x86 with AVX2 + FMA + F16C) the same row algorithm runs vectorized, with LayerNorm statistics
// that stay exact on rows far from zero (csrc/cpu/deepstack.cpp); HIRES_LMM_CPU_TWIN=1 forces
// the scalar twin.
#pragma once
#include <ATen/ATen.h>

#include "kernels/deepstack/inject_norm.h"

namespace hires::deepstack {

void inject_norm_cpu(const InjectNormParams& p, at::ScalarType t, at::ScalarType e, Norm norm);

}  // namespace hires::deepstack
