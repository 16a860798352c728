// Launcher of kernels/deepstack/norm_bwd.cuh: stage 1 (one block per row chunk) then stage 2
// (the ordered sum of the chunks' partials), on one stream, no sync.
#include "csrc/cuda/norm_bwd.h"
#include "kernels/deepstack/norm_bwd.cuh"

namespace hires::deepstack {
namespace {

template <typename T>
std::string launch(const NormBwdParams& p, cudaStream_t stream) {
  if (p.dim == 0) return std::string();
  if (p.chunks > 0x7fffffff) return "too many row chunks for one launch";
  constexpr int kT = NormBwdTile::kThreads;
  cudaError_t err;
  if (p.chunks > 0) {  // rows == 0: no chunk, stage 2 writes zeros
    norm_bwd_rows_kernel<T><<<unsigned(p.chunks), kT, 0, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  norm_bwd_reduce_kernel<T><<<unsigned((p.dim + kT - 1) / kT), kT, 0, stream>>>(p);
  err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

}  // namespace

std::string launch_norm_bwd(const NormBwdParams& p, DType t, cudaStream_t stream) {
  switch (t) {
    case DType::kF32: return launch<float>(p, stream);
    case DType::kF16: return launch<__half>(p, stream);
    case DType::kBF16: return launch<__nv_bfloat16>(p, stream);
  }
  return "unknown dtype";
}

}  // namespace hires::deepstack
