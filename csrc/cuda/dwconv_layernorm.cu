// Launcher of kernels/convnext/dwconv_layernorm.cuh: picks the tile shape from C and the device's
// shared memory (DwconvLnTiling::pick, the choice the CPU twin makes too), the pack width (16-byte
// path when C and every stride and pointer allow it) and turns the runtime dtype into a template
// argument (the only place that does). C past the tiled kernel's shared memory runs the generic
// kernel.
#include "csrc/cuda/dwconv_layernorm.h"
#include "csrc/cuda/func_attr.h"
#include "kernels/convnext/dwconv_layernorm.cuh"

namespace hires::convnext {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, int VEC, int RH, int S>
std::string launch_tiled(const DwconvLnParams& p, cudaStream_t stream) {
  using Cfg = DwconvLnTileCfg<VEC, RH, S>;
  const int64_t tiles_h = ceil_div(p.H, RH), tiles_w = ceil_div(p.W, Cfg::kTW);
  const int64_t blocks = p.B * tiles_h * tiles_w;
  if (blocks > 0x7fffffff) return "too many tiles for one launch";
  const int64_t smem = DwconvLnTiling::smem_bytes({RH, S}, p.C);
  if (smem > 48 * 1024) {
    // opt-in above 48 KiB, set once per (kernel, device)
    const std::string err =
        cuda_util::ensure_dynamic_smem<dwconv_layernorm_kernel<T, VEC, RH, S>>(int(smem));
    if (!err.empty()) return err;
  }
  dwconv_layernorm_kernel<T, VEC, RH, S>
      <<<unsigned(blocks), Cfg::kThreads, size_t(smem), stream>>>(p, tiles_h, tiles_w);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

template <typename T, int VEC>
std::string launch_generic(const DwconvLnParams& p, cudaStream_t stream) {
  using Tile = DwconvLnGenericTile;
  // P pixels per block: as many as the shared-memory budget holds (whole runs when possible),
  // never more than the row (rounded up to a run).
  int64_t P = std::min<int64_t>(Tile::kMaxPixels, DwconvLnLimits::kSmemFloats / p.C);
  if (P < 1) return "C too large for the kernel's shared memory";
  if (P >= Tile::kRun) P = P / Tile::kRun * Tile::kRun;
  P = std::min<int64_t>(P, ceil_div(p.W, Tile::kRun) * Tile::kRun);
  const int64_t segs = ceil_div(p.W, P);
  const int64_t blocks = p.B * p.H * segs;
  if (blocks > 0x7fffffff) return "too many pixel segments for one launch";
  const size_t smem = size_t(P) * size_t(p.C) * sizeof(float);
  dwconv_layernorm_generic_kernel<T, VEC><<<unsigned(blocks), Tile::kThreads, smem, stream>>>(p, int(P), segs);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

template <typename T, int VEC>
std::string pick_tile(const DwconvLnParams& p, cudaStream_t stream) {
  // The scalar path (C % VEC != 0 or a misaligned / odd-strided view) runs the generic kernel:
  // the tiled one's scalar staging (up to 14 loads per thread per row) spilled under its
  // 128-register cap.
  if constexpr (VEC == 1) {
    return launch_generic<T, 1>(p, stream);
  } else {
    int device = 0, max_smem = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
      const cudaError_t e = cudaGetLastError();
      return std::string("reading the device's shared-memory limit: ") + cudaGetErrorString(e);
    }
    switch (DwconvLnTiling::pick(p.C, max_smem)) {  // the order of DwconvLnTiling::kShapes
      case 0: return launch_tiled<T, VEC, 2, 4>(p, stream);
      case 1: return launch_tiled<T, VEC, 2, 2>(p, stream);
      case 2: return launch_tiled<T, VEC, 2, 1>(p, stream);
      case 3: return launch_tiled<T, VEC, 1, 1>(p, stream);
      default: return launch_generic<T, VEC>(p, stream);
    }
  }
}
static_assert(DwconvLnTiling::kShapes[0].rh == 2 && DwconvLnTiling::kShapes[0].strips == 4 &&
                  DwconvLnTiling::kShapes[1].rh == 2 && DwconvLnTiling::kShapes[1].strips == 2 &&
                  DwconvLnTiling::kShapes[2].rh == 2 && DwconvLnTiling::kShapes[2].strips == 1 &&
                  DwconvLnTiling::kShapes[3].rh == 1 && DwconvLnTiling::kShapes[3].strips == 1,
              "pick_tile's cases follow DwconvLnTiling::kShapes");

template <typename T>
std::string pick_width(const DwconvLnParams& p, cudaStream_t stream) {
  constexpr int V = 16 / int(sizeof(T));
  const bool vec_ok = p.C % V == 0 && p.sx_b % V == 0 && p.sx_h % V == 0 && p.sx_w % V == 0 &&
                      is_aligned(p.x, 16) && is_aligned(p.w_t, 16) && is_aligned(p.ln_weight, 16) &&
                      is_aligned(p.out, 16) && (p.dw_bias == nullptr || is_aligned(p.dw_bias, 16)) &&
                      (p.ln_bias == nullptr || is_aligned(p.ln_bias, 16));
  if (vec_ok) return pick_tile<T, V>(p, stream);
  return pick_tile<T, 1>(p, stream);
}

}  // namespace

std::string launch_dwconv_layernorm(const DwconvLnParams& p, DType t, cudaStream_t stream) {
  if (p.B == 0 || p.H == 0 || p.W == 0 || p.C == 0) return std::string();  // empty: no 0-block grid
  if (p.C > DwconvLnLimits::kMaxChannels) return "C exceeds the kernel's limit";
  switch (t) {
    case DType::kF32: return pick_width<float>(p, stream);
    case DType::kF16: return pick_width<__half>(p, stream);
    case DType::kBF16: return pick_width<__nv_bfloat16>(p, stream);
  }
  return "unknown dtype";
}

}  // namespace hires::convnext
