// CPU twin of kernels/select/similarity_select.cuh: the same parameters, the same steps (text
// weights, text direction, per-token scores, the shared key rule, softmaxes, fp64 prefix sums,
// ascending compaction) and the same roundings; parallel over rows with at::parallel_for.
#pragma once
#include <ATen/ATen.h>

#include "kernels/select/similarity_select.h"

namespace hires::select {

void similarity_select_cpu(const SimilaritySelectParams& p, at::ScalarType local_t, at::ScalarType text_t);
void gather_tokens_cpu(const GatherParams& p, at::ScalarType t);

}  // namespace hires::select
