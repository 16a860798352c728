// Torch-free launchers of SliME's text-guided selection and of gather_tokens
// (csrc/cuda/similarity_select.cu; kernels in kernels/select/similarity_select.cuh).
#pragma once
#include <cuda_runtime_api.h>
#include <string>

#include "kernels/common/dtype.h"
#include "kernels/select/similarity_select.h"

namespace hires::select {

// Limits of the CUDA path (the binding checks them; the CPU path has none).
constexpr int64_t kMaxSelectTokens = 8192;   // a row's keys (8 B each) are sorted in shared memory
constexpr int64_t kMaxSelectDim = 32768;     // the text direction (fp32) lives in shared memory
constexpr int64_t kMaxSelectBatch = 65535;   // batch rows are gridDim.y

// Three kernels on `stream`, no host sync; p.text_weight, p.text_dir, p.counters must be set.
std::string launch_similarity_select(const SimilaritySelectParams& p, DType local_t, DType text_t,
                                     cudaStream_t stream);

std::string launch_gather_tokens(const GatherParams& p, DType t, cudaStream_t stream);

}  // namespace hires::select
