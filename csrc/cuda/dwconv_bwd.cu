// Launcher of kernels/convnext/dwconv_bwd.cuh: dW/dbias stage 1 and 2, then dx; one stream, no sync.
#include "csrc/cuda/dwconv_bwd.h"
#include "kernels/convnext/dwconv_bwd.cuh"

namespace hires::convnext {
namespace {

template <typename T>
std::string launch(const DwconvBwdParams& p, cudaStream_t stream) {
  constexpr int kT = DwconvBwdTile::kThreads;
  if (p.C == 0) return std::string();
  const int64_t cblocks = (p.C + kT - 1) / kT;
  if (cblocks > 65535) return "too many channels for one launch";
  if (p.chunks > 0) {
    dwconv_bwd_weight_kernel<T><<<dim3(unsigned(p.chunks), unsigned(cblocks)), kT, 0, stream>>>(p);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  dwconv_bwd_reduce_kernel<T><<<unsigned(((kDwTaps + 1) * p.C + kT - 1) / kT), kT, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return cudaGetErrorString(err);
  const int64_t n = p.B * p.H * p.W * p.C;
  if (n > 0) {
    const int64_t blocks = (n + kT - 1) / kT;
    if (blocks > 0x7fffffff) return "too many elements for one launch";
    dwconv_bwd_input_kernel<T><<<unsigned(blocks), kT, 0, stream>>>(p);
    err = cudaGetLastError();
  }
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

}  // namespace

std::string launch_dwconv_bwd(const DwconvBwdParams& p, DType t, cudaStream_t stream) {
  switch (t) {
    case DType::kF32: return launch<float>(p, stream);
    case DType::kF16: return launch<__half>(p, stream);
    case DType::kBF16: return launch<__nv_bfloat16>(p, stream);
  }
  return "unknown dtype";
}

}  // namespace hires::convnext
