// Parameters of the fused depthwise 7x7 conv + LayerNorm kernel (torch-free; shared by the CUDA
// launcher, the CPU twin and the C++ binding). See dwconv_layernorm.cuh for the formula.
#pragma once
#include <cstdint>

namespace hires::convnext {

struct DwconvLnParams {
  const void* x = nullptr;        // (B, H, W, C) of T, strides sx_b/sx_h/sx_w, unit channel stride
  int64_t sx_b = 0, sx_h = 0, sx_w = 0;
  const void* w_t = nullptr;      // (7*7, C) of T, contiguous: dw_weight (C,1,7,7) transposed to
                                  // tap-major so that one tap of C channels is contiguous
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
  // The CUDA kernel keeps the conv outputs of a block's pixels for all C channels in shared
  // memory as fp32 (12288 floats = 48 KiB, the static limit without an opt-in), so C <= 12288.
  static constexpr int64_t kSmemFloats = 12288;
  static constexpr int64_t kMaxChannels = kSmemFloats;
};

}  // namespace hires::convnext
