// Parameters of the fused depthwise 7x7 conv + LayerNorm kernel (torch-free; shared by the CUDA
// launcher, the CPU twin and the C++ binding), and the tile choice both the launcher and the twin
// make. See dwconv_layernorm.cuh for the formula and the design.
#pragma once
#include <cstdint>

namespace hires::convnext {

struct DwconvLnParams {
  const void* x = nullptr;        // (B, H, W, C) of T, strides sx_b/sx_h/sx_w, unit channel stride
  int64_t sx_b = 0, sx_h = 0, sx_w = 0;
  const void* w_t = nullptr;      // (7*7, C) of T, contiguous: dw_weight (C,1,7,7) transposed to
                                  // tap-major so that one tap of C channels is contiguous
  const void* w_c = nullptr;      // (C, 7*7) of T, contiguous: dw_weight (C,1,7,7) as stored (the
                                  // tiled kernel: one thread's 49 taps at constant offsets)
  const void* dw_bias = nullptr;  // (C,) of T, or null
  const void* ln_weight = nullptr;  // (C,) of T
  const void* ln_bias = nullptr;    // (C,) of T, or null
  void* out = nullptr;            // (B, H, W, C) contiguous T
  int64_t B = 0, H = 0, W = 0, C = 0;
  float eps = 1e-6f;
};

struct DwconvLnLimits {
  static constexpr int kKernel = 7;                 // 7x7 window
  static constexpr int kPad = kKernel / 2;          // zero padding 3 ("same" output size)
  static constexpr int kTaps = kKernel * kKernel;
  // The generic CUDA kernel (wide C) keeps the conv outputs of a block's pixels for all C channels
  // in shared memory as fp32 (12288 floats = 48 KiB, the static limit without an opt-in), so
  // C <= 12288.
  static constexpr int64_t kSmemFloats = 12288;
  static constexpr int64_t kMaxChannels = kSmemFloats;
};

// Tiled kernel (dwconv_layernorm_kernel<T, VEC, RH, S>): a block of kThreads threads owns an
// output tile of RH rows x (S * kRw) columns of one image and all C channels; channel chunks of
// kThreads / S channels are convolved one after the other. The tile shapes, widest first.
struct DwconvLnTiling {
  static constexpr int kThreads = 256;  // 8 warps
  static constexpr int kRw = 8;         // output columns per thread (the sliding window)
  static constexpr int kInCols = kRw + DwconvLnLimits::kKernel - 1;  // 14 input columns per thread
  // 2 blocks (16 warps) per SM on sm_80 (164 KiB per SM) and sm_90 (228 KiB) below this budget.
  static constexpr int64_t kSmemBudget = 80 * 1024;
  struct Shape {
    int rh;       // output rows per block (= per thread)
    int strips;   // 8-column strips per block row: tile width S * kRw, channel chunk kThreads / S
  };
  static constexpr int kNumShapes = 4;
  static constexpr Shape kShapes[kNumShapes] = {{2, 4}, {2, 2}, {2, 1}, {1, 1}};

  static constexpr int64_t tile_w(int strips) { return int64_t(strips) * kRw; }
  static constexpr int64_t chunk(int strips) { return kThreads / strips; }
  static constexpr int64_t pixels(Shape s) { return s.rh * tile_w(s.strips); }
  // Dynamic shared memory of a launch: P * C fp32 conv outputs + two staged input rows
  // ((tile width + 6) columns x chunk channels, fp32).
  static constexpr int64_t smem_bytes(Shape s, int64_t C) {
    return (pixels(s) * C + 2 * (tile_w(s.strips) + DwconvLnLimits::kKernel - 1) * chunk(s.strips)) * 4;
  }
  // The first shape (widest tile: least halo) within kSmemBudget; else the smallest tile if the
  // device's opt-in limit `max_smem` holds it (1 block per SM); else -1: the generic kernel.
  static constexpr int pick(int64_t C, int64_t max_smem) {
    for (int i = 0; i < kNumShapes; ++i)
      if (smem_bytes(kShapes[i], C) <= kSmemBudget) return i;
    return smem_bytes(kShapes[kNumShapes - 1], C) <= max_smem ? kNumShapes - 1 : -1;
  }
  // sm_90's opt-in limit (227 KiB): the widest C the tiled kernel takes on an H100/H200 (6368).
  static constexpr int64_t kSm90MaxSmem = 232448;
};

}  // namespace hires::convnext
