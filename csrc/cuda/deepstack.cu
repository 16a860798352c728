// Launcher of kernels/deepstack/inject_norm.cuh: picks the pack width and the block shape, and
// turns the runtime dtypes and norm into template arguments (the only place that does).
#include "csrc/cuda/deepstack.h"
#include "kernels/deepstack/inject_norm.cuh"

namespace hires::deepstack {
namespace {

// Every path gives a thread kElemsPerThread elements of the row: 4 packs of 8 for 16-bit types
// (64 B in flight per thread) and 8 packs of 4 for fp32, held in registers; 32 scalars in the
// unaligned / odd-size fallback (VEC = 1), streamed pass by pass (no local memory).
constexpr int kElems = InjectNormTile::kElemsPerThread;

template <typename T> constexpr int vec_width() { return 16 / int(sizeof(T)); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int pow2_at_least(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

template <typename T, typename E, Norm kNorm, int VEC, int MAXV>
std::string launch(const InjectNormParams& p, cudaStream_t stream) {
  const int64_t nvec = p.dim / VEC;
  const int tpr = std::max<int>(InjectNormTile::kWarp, pow2_at_least(ceil_div(nvec, MAXV)));
  if (tpr > InjectNormTile::kMaxThreadsPerRow) return "hidden size too large for the kernel";
  const int rpb = std::max(1, InjectNormTile::kMinThreadsPerBlock / tpr);
  const dim3 block(tpr, rpb);
  const int64_t blocks = ceil_div(p.rows, rpb);
  if (blocks > 0x7fffffff) return "too many rows for one launch";
  inject_norm_kernel<T, E, kNorm, VEC, MAXV><<<unsigned(blocks), block, 0, stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

template <typename T, typename E, Norm kNorm>
std::string pick_width(const InjectNormParams& p, cudaStream_t stream) {
  constexpr int V = vec_width<T>();
  const bool vec_ok = p.dim % V == 0 && p.hidden_stride % V == 0 && is_aligned(p.hidden, 16) &&
                      (p.num_visual == 0 || (p.embeds_stride % V == 0 &&
                                             is_aligned(p.embeds, int(sizeof(E)) * V))) &&
                      (p.weight == nullptr || is_aligned(p.weight, 16)) &&
                      (p.bias == nullptr || is_aligned(p.bias, 16)) &&
                      (p.normed == nullptr || is_aligned(p.normed, 16)) &&
                      (p.injected == nullptr || is_aligned(p.injected, 16));
  static_assert(kElems % V == 0, "whole packs per thread");
  if (vec_ok) return launch<T, E, kNorm, V, kElems / V>(p, stream);
  return launch<T, E, kNorm, 1, kElems>(p, stream);
}

template <typename T, typename E>
std::string pick_norm(const InjectNormParams& p, Norm norm, cudaStream_t stream) {
  switch (norm) {
    case Norm::kNone: return pick_width<T, E, Norm::kNone>(p, stream);
    case Norm::kRms: return pick_width<T, E, Norm::kRms>(p, stream);
    case Norm::kLayer: return pick_width<T, E, Norm::kLayer>(p, stream);
  }
  return "unknown norm";
}

template <typename T>
std::string pick_embeds(const InjectNormParams& p, DType e, Norm norm, cudaStream_t stream) {
  switch (e) {
    case DType::kF32: return pick_norm<T, float>(p, norm, stream);
    case DType::kF16: return pick_norm<T, __half>(p, norm, stream);
    case DType::kBF16: return pick_norm<T, __nv_bfloat16>(p, norm, stream);
  }
  return "unknown embeds dtype";
}

}  // namespace

int64_t max_dim(DType t) {
  (void)t;  // the same for every dtype and path
  return int64_t(InjectNormTile::kMaxThreadsPerRow) * kElems;
}

std::string launch_inject_norm(const InjectNormParams& p, DType t, DType e, Norm norm,
                               cudaStream_t stream) {
  if (p.rows == 0 || p.dim == 0) return std::string();  // nothing to do; launching a 0 grid is an error
  switch (t) {
    case DType::kF32: return pick_embeds<float>(p, e, norm, stream);
    case DType::kF16: return pick_embeds<__half>(p, e, norm, stream);
    case DType::kBF16: return pick_embeds<__nv_bfloat16>(p, e, norm, stream);
  }
  return "unknown hidden dtype";
}

}  // namespace hires::deepstack
