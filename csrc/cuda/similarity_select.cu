// Launchers of kernels/select/similarity_select.cuh: pick the pack width per tensor, size the
// shared memory of the selection, and turn the runtime dtypes into template arguments (the only
// place that does). Instantiations: 3 dtypes x {16-byte packs, scalars} per kernel.
#include <algorithm>

#include "csrc/cuda/func_attr.h"
#include "csrc/cuda/similarity_select.h"
#include "kernels/select/similarity_select.cuh"

namespace hires::select {
namespace {

template <typename T> constexpr int vec_width() { return 16 / int(sizeof(T)); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::string last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

// 16-byte packs need the row length, every row stride and the base aligned to the pack.
template <typename T>
bool can_vectorize(const void* base, int64_t dim, int64_t s0, int64_t s1) {
  constexpr int V = vec_width<T>();
  return dim % V == 0 && s0 % V == 0 && s1 % V == 0 && is_aligned(base, 16);
}

template <typename TT>
std::string launch_text(const SimilaritySelectParams& p, cudaStream_t stream) {
  constexpr int V = vec_width<TT>();
  const bool vec = can_vectorize<TT>(p.text, p.dim, p.text_stride_b, p.text_stride_t);
  const int64_t rows = p.batch * p.t;
  const dim3 g1(unsigned(ceil_div(rows, SelectTile::kNormWarps)));
  if (ceil_div(rows, SelectTile::kNormWarps) > 0x7fffffff) return "too many text rows for one launch";
  if (vec) text_weight_kernel<TT, V><<<g1, SelectTile::kNormThreads, 0, stream>>>(p);
  else text_weight_kernel<TT, 1><<<g1, SelectTile::kNormThreads, 0, stream>>>(p);
  std::string err = last_error();
  if (!err.empty()) return err;
  const int64_t packs = p.dim / (vec ? V : 1);
  const dim3 g2(unsigned(ceil_div(packs, SelectTile::kWarp)), unsigned(p.batch));
  const int threads = SelectTile::kDirWarps * SelectTile::kWarp;
  if (vec) text_dir_kernel<TT, V><<<g2, threads, 0, stream>>>(p);
  else text_dir_kernel<TT, 1><<<g2, threads, 0, stream>>>(p);
  return last_error();
}

template <typename TL, int VEC>
std::string launch_score(const SimilaritySelectParams& p, cudaStream_t stream) {
  const int64_t smem = select_smem_bytes(p.dim, p.n);
  int device = 0, optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (smem + int64_t(sizeof(SelectScratch)) > optin) {
    return "the selection needs " + std::to_string(smem) + " bytes of shared memory (hidden size " +
           std::to_string(p.dim) + ", " + std::to_string(p.n) + " tokens); this device allows " +
           std::to_string(optin);
  }
  // Always set (not only above 48 KiB): the default limit is 48 KiB for dynamic + static
  // (SelectScratch) together, so e.g. N in (2048, 4096] with D <= 8192 (exactly 48 KiB dynamic)
  // would fail to launch without it. Set once per (kernel, device) and raised only when a larger
  // selection comes (the attribute is an upper bound).
  {
    const std::string e = cuda_util::ensure_dynamic_smem<score_select_kernel<TL, VEC>>(int(smem));
    if (!e.empty()) return e;
  }
  const dim3 grid(unsigned(ceil_div(p.n, SelectTile::kScoreWarps)), unsigned(p.batch));
  score_select_kernel<TL, VEC><<<grid, SelectTile::kScoreThreads, size_t(smem), stream>>>(p);
  return last_error();
}

template <typename TL>
std::string pick_score(const SimilaritySelectParams& p, cudaStream_t stream) {
  if (can_vectorize<TL>(p.local, p.dim, p.local_stride_b, p.local_stride_n))
    return launch_score<TL, vec_width<TL>()>(p, stream);
  return launch_score<TL, 1>(p, stream);
}

template <typename T>
std::string launch_gather(const GatherParams& p, cudaStream_t stream) {
  constexpr int V = vec_width<T>();
  const int64_t rows = p.batch * p.k;
  if (ceil_div(rows, SelectTile::kGatherWarps) > 0x7fffffff) return "too many rows for one launch";
  const dim3 grid(unsigned(ceil_div(rows, SelectTile::kGatherWarps)));
  const int threads = SelectTile::kGatherWarps * SelectTile::kWarp;
  if (can_vectorize<T>(p.tokens, p.dim, p.tokens_stride_b, p.tokens_stride_n) && is_aligned(p.out, 16))
    gather_tokens_kernel<T, V><<<grid, threads, 0, stream>>>(p);
  else
    gather_tokens_kernel<T, 1><<<grid, threads, 0, stream>>>(p);
  return last_error();
}

}  // namespace

std::string launch_similarity_select(const SimilaritySelectParams& p, DType local_t, DType text_t,
                                     cudaStream_t stream) {
  if (p.batch == 0) return std::string();
  if (p.n < 1 || p.n > SelectTile::kMaxSortKeys) return "N must be in [1, 8192] for the CUDA kernel";
  if (p.t < 1) return "at least one text token is required";
  if (p.batch > kMaxSelectBatch || p.dim > kMaxSelectDim) return "batch or hidden size beyond the kernel limits";
  if (p.text_weight == nullptr || p.text_dir == nullptr || p.counters == nullptr) return "workspace not set";
  std::string err;
  switch (text_t) {
    case DType::kF32: err = launch_text<float>(p, stream); break;
    case DType::kF16: err = launch_text<__half>(p, stream); break;
    case DType::kBF16: err = launch_text<__nv_bfloat16>(p, stream); break;
  }
  if (!err.empty()) return err;
  switch (local_t) {
    case DType::kF32: return pick_score<float>(p, stream);
    case DType::kF16: return pick_score<__half>(p, stream);
    case DType::kBF16: return pick_score<__nv_bfloat16>(p, stream);
  }
  return "unknown local dtype";
}

std::string launch_gather_tokens(const GatherParams& p, DType t, cudaStream_t stream) {
  if (p.batch * p.k == 0 || p.dim == 0) return std::string();
  switch (t) {
    case DType::kF32: return launch_gather<float>(p, stream);
    case DType::kF16: return launch_gather<__half>(p, stream);
    case DType::kBF16: return launch_gather<__nv_bfloat16>(p, stream);
  }
  return "unknown dtype";
}

}  // namespace hires::select
