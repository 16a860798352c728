// Launcher of kernels/attention/flash_bwd.cuh (torch-free): dtype and head dim -> template
// arguments, grid and shared memory sizes. Instantiations {__half, __nv_bfloat16} x {64, 128}.
// Order on one stream, no sync: dot(dO, O) -> main kernel (dK, dV, atomics into dq_accum) ->
// dq convert. p.dq_accum must be zeroed by the caller.
#include "csrc/cuda/flash_attn_bwd.h"
#include "csrc/cuda/func_attr.h"
#include "kernels/attention/flash_bwd.cuh"

namespace hires::attention {
namespace {

constexpr int64_t kMaxGridYZ = 65535;

template <typename T, int D>
std::string launch(const FlashBwdParams& p, cudaStream_t stream) {
  using Tile = bwd::FlashBwdTile<D>;
  if (p.batch == 0 || p.heads_q == 0 || p.rows == 0) return std::string();
  if (p.heads_kv > kMaxGridYZ) return "more than 65535 kv heads";
  if (p.batch > kMaxGridYZ) return "batch larger than 65535";
  if (p.dq_accum == nullptr || p.dsum == nullptr) return "the backward needs the dq_accum and dsum workspaces";
  const int64_t dot_blocks = (p.rows * p.heads_q + 3) / 4;
  const int64_t cvt_blocks = (p.rows * p.heads_q * p.head_dim + 255) / 256;
  const int64_t n_blocks = (p.seqlen_k + Tile::kBlockN - 1) / Tile::kBlockN;
  if (dot_blocks > 0x7fffffff || cvt_blocks > 0x7fffffff || n_blocks > 0x7fffffff) return "too many rows for one launch";
  bwd::flash_bwd_dot_do_o_kernel<T><<<unsigned(dot_blocks), 128, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return std::string("dot(dO, O): ") + cudaGetErrorString(err);
  if (n_blocks > 0) {
    auto kernel = bwd::flash_bwd_kernel<T, D>;
    const std::string attr = cuda_util::ensure_dynamic_smem<bwd::flash_bwd_kernel<T, D>>(int(Tile::kSmemBytes));
    if (!attr.empty()) return attr;
    const dim3 grid(unsigned(n_blocks), unsigned(p.heads_kv), unsigned(p.batch));
    kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return std::string(cudaGetErrorString(err));
  }
  bwd::flash_bwd_convert_dq_kernel<T><<<unsigned(cvt_blocks), 256, 0, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return std::string("dq convert: ") + cudaGetErrorString(err);
  return std::string();
}

template <typename T>
std::string pick_dim(const FlashBwdParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch<T, 64>(p, stream);
    case 128: return launch<T, 128>(p, stream);
    default: return "head_dim " + std::to_string(p.head_dim) + " has no backward kernel (64, 128)";
  }
}

}  // namespace

bool flash_bwd_supported_head_dim(int64_t head_dim) { return head_dim == 64 || head_dim == 128; }

std::string launch_flash_bwd(const FlashBwdParams& p, DType t, cudaStream_t stream) {
  switch (t) {
    case DType::kF16: return pick_dim<__half>(p, stream);
    case DType::kBF16: return pick_dim<__nv_bfloat16>(p, stream);
    case DType::kF32: return "float32 has no backward tensor-core kernel (the binding routes it to ATen)";
  }
  return "unknown dtype";
}

}  // namespace hires::attention
