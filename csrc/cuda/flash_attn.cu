// Launcher of kernels/attention/flash_fwd.cuh: turns the runtime dtype and head dim into the
// template arguments (the only place that does) and sizes grid and shared memory.
// Instantiations: {__half, __nv_bfloat16} x {64, 128} x {64-row tile, 128-row tile}; the tile is
// flash_fwd_tile(p) (flash_params.h: 64 rows for split-KV and seqlen_q <= 64), the one the CPU
// twin uses; causal and split-KV are runtime flags.
// Split-KV launches the combine kernel after the main one (same stream, no sync).
#include "csrc/cuda/flash_attn.h"
#include "csrc/cuda/func_attr.h"
#include "kernels/attention/flash_fwd.cuh"

namespace hires::attention {
namespace {

constexpr int64_t kMaxGridYZ = 65535;

template <typename T, int D, int MT>
std::string launch(const FlashParams& p, cudaStream_t stream) {
  using Tile = FlashFwdTile<D, MT>;
  const int64_t m_blocks = (p.seqlen_q + Tile::kBlockM - 1) / Tile::kBlockM;
  if (m_blocks == 0 || p.batch == 0 || p.heads_q == 0) return std::string();
  const int splits = p.num_splits > 1 ? p.num_splits : 1;
  if (splits > 1 && (p.cu_seqlens_q != nullptr || p.o_accum == nullptr || p.lse_accum == nullptr))
    return "split-KV needs a dense launch and both workspaces";
  if (m_blocks * splits > 0x7fffffff) return "seqlen_q too large for one launch";
  // the kernel's loop holds key indices in 32 bits (seqlen_k bounds every sequence's keys)
  if (p.seqlen_q > 0x7fffffff - 2 * Tile::kBlockM || p.seqlen_k > 0x7fffffff - 2 * Tile::kBlockN)
    return "seqlen_q / seqlen_k of 2^31 - 128 or more";
  if (p.heads_q > kMaxGridYZ) return "more than 65535 query heads";
  if (p.batch > kMaxGridYZ) return "batch larger than 65535";
  const size_t smem = size_t(Tile::kSmemElems) * sizeof(T);
  auto kernel = flash_fwd_kernel<T, D, MT>;
  // Above 48 KiB dynamic shared memory needs the opt-in (set once per device; fails cleanly where
  // the device lacks it).
  std::string attr = cuda_util::ensure_dynamic_smem<flash_fwd_kernel<T, D, MT>>(int(smem));
  if (!attr.empty()) return attr;
  cudaError_t err;
  FlashParams prm = p;
  prm.num_splits = splits;
  const dim3 grid(unsigned(m_blocks * splits), unsigned(p.heads_q), unsigned(p.batch));
  kernel<<<grid, Tile::kThreads, smem, stream>>>(prm);
  err = cudaGetLastError();
  if (err != cudaSuccess) return std::string(cudaGetErrorString(err));
  if (splits > 1) {
    const int64_t work = p.batch * p.seqlen_q * p.heads_q;
    const int64_t blocks = (work + kCombineWarps - 1) / kCombineWarps;
    if (blocks > 0x7fffffff) return "too many rows for the split-KV combine";
    flash_combine_kernel<T><<<unsigned(blocks), kCombineWarps * 32, 0, stream>>>(prm);
    err = cudaGetLastError();
    if (err != cudaSuccess) return std::string("combine: ") + cudaGetErrorString(err);
  }
  return std::string();
}

template <typename T, int D>
std::string pick_tile(const FlashParams& p, cudaStream_t stream) {
  if constexpr (flash_fwd_large_tile(D)) {
    if (flash_fwd_tile(p).large) return launch<T, D, 2>(p, stream);
  }
  return launch<T, D, 1>(p, stream);
}

template <typename T>
std::string pick_dim(const FlashParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return pick_tile<T, 64>(p, stream);
    case 128: return pick_tile<T, 128>(p, stream);
    default: return "head_dim " + std::to_string(p.head_dim) + " has no kernel (64, 128)";
  }
}

}  // namespace

int device_sm_count(int device) {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {0};  // benign race: every writer stores the same value
  if (device < 0 || device >= kMaxDevices) return 1;
  if (cache[device] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
      cudaGetLastError();  // clear the sticky-free error state
      return 1;
    }
    cache[device] = n;
  }
  return cache[device];
}

bool flash_fwd_supported_head_dim(int64_t head_dim) { return head_dim == 64 || head_dim == 128; }

std::string launch_flash_fwd(const FlashParams& p, DType t, cudaStream_t stream) {
  switch (t) {
    case DType::kF16: return pick_dim<__half>(p, stream);
    case DType::kBF16: return pick_dim<__nv_bfloat16>(p, stream);
    case DType::kF32: return "float32 has no tensor-core kernel (the binding routes it to ATen)";
  }
  return "unknown dtype";
}

}  // namespace hires::attention
