// CPU twin of kernels/deepstack/inject_norm.cuh: the same parameters, the same lookup (binary
// search in the sorted index), the same roundings; rows split over at::parallel_for.
#pragma once
#include <ATen/ATen.h>

#include "kernels/deepstack/inject_norm.h"

namespace hires::deepstack {

void inject_norm_cpu(const InjectNormParams& p, at::ScalarType t, at::ScalarType e, Norm norm);

}  // namespace hires::deepstack
