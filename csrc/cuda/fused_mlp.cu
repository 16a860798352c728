// Launcher of the fused ConvNeXt MLP kernel (kernels/convnext/fused_mlp.cuh): one instantiation
// per (dtype, C) of kFusedMlpWidths, chosen by one switch; 1-D grid of ceil(M / BM) blocks of
// 256 threads; dynamic shared memory FusedMlpTile<C>::kSmemBytes, its limit raised once per
// (instantiation, device).
#include "csrc/cuda/fused_mlp.h"

#include <climits>

#include "csrc/cuda/func_attr.h"
#include "kernels/convnext/fused_mlp.cuh"

namespace hires::convnext {
namespace {

template <typename T, int C>
std::string launch(const FusedMlpParams& p, cudaStream_t stream) {
  using Tile = FusedMlpTile<C>;
  const int64_t blocks = (p.M + Tile::kBM - 1) / Tile::kBM;
  if (blocks > INT_MAX) return "fused MLP: too many rows for a 1-D grid (M / BM > 2^31 - 1)";
  const std::string err = cuda_util::ensure_dynamic_smem<fused_mlp_kernel<T, C>>(Tile::kSmemBytes);
  if (!err.empty()) return err;
  fused_mlp_kernel<T, C><<<dim3(unsigned(blocks)), dim3(Tile::kThreads), Tile::kSmemBytes, stream>>>(p);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e));
}

template <typename T>
std::string by_width(const FusedMlpParams& p, cudaStream_t stream) {
  switch (p.C) {  // kFusedMlpWidths
    case 96: return launch<T, 96>(p, stream);
    case 128: return launch<T, 128>(p, stream);
    case 192: return launch<T, 192>(p, stream);
    case 256: return launch<T, 256>(p, stream);
    case 384: return launch<T, 384>(p, stream);
    default: return "fused MLP: no kernel for C = " + std::to_string(p.C);
  }
}

}  // namespace

bool fused_mlp_supported(DType t, int64_t C, int64_t F) {
  return (t == DType::kF16 || t == DType::kBF16) && fused_mlp_shape_ok(C, F);
}

std::string launch_fused_mlp(const FusedMlpParams& p, DType t, cudaStream_t stream) {
  if (p.M == 0) return std::string();
  if (!fused_mlp_shape_ok(p.C, p.F))
    return "fused MLP: unsupported shape C = " + std::to_string(p.C) + ", F = " + std::to_string(p.F);
  switch (t) {
    case DType::kF16: return by_width<__half>(p, stream);
    case DType::kBF16: return by_width<__nv_bfloat16>(p, stream);
    default: return std::string("fused MLP: no kernel for dtype ") + dtype_str(t);
  }
}

}  // namespace hires::convnext
