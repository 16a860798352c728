// Backward of the depthwise 7x7 conv (zero padding 3) of dwconv_layernorm, given the gradient dy
// of the conv output (fp32, from the LayerNorm backward: hires_lmm::norm_backward). NHWC.
//
//   dx[b,h,w,c]  = sum_{i,j} dy[b, h+3-i, w+3-j, c] * W[c,i,j]   (taps inside the image only:
//                                                                 the transposed conv)
//   dW[c,i,j]    = sum_{b,h,w} dy[b,h,w,c] * x[b, h+i-3, w+j-3, c] (taps inside the image only)
//   dbias[c]     = sum_{b,h,w} dy[b,h,w,c]
// A tap on the padding adds nothing (not a product with 0), as the forward.
// dW / dbias: deterministic two-stage reduction (dwconv_bwd.h): stage 1, grid (chunks,
//   ceil(C / kThreads)), one thread per channel holding its 50 sums in registers over the chunk's
//   rows (loads coalesced over c); stage 2 adds the chunks in order. dx: one thread per element,
//   the 49 taps in fixed order. fp32 accumulation, one rounding to T.
// Not tuned: no shared-memory tiling of the 7x7 halo (each x / dy element is read up to 49 times,
//   from L1/L2); a fused LayerNorm + conv backward kernel is the next step.
#pragma once
#include "kernels/common/numeric.cuh"
#include "kernels/convnext/dwconv_bwd.h"

namespace hires::convnext {

struct DwconvBwdTile {
  static constexpr int kThreads = 128;
};

template <typename T>
__global__ void __launch_bounds__(DwconvBwdTile::kThreads)
dwconv_bwd_weight_kernel(const DwconvBwdParams p) {
  const int64_t c = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= p.C) return;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  float acc[kDwTaps + 1];
#pragma unroll
  for (int k = 0; k <= kDwTaps; ++k) acc[k] = 0.f;
  const int64_t r0 = int64_t(blockIdx.x) * p.rows_per_chunk;
  const int64_t r1 = min(p.B * p.H, r0 + p.rows_per_chunk);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / p.H, h = r % p.H;
    for (int64_t w = 0; w < p.W; ++w) {
      const float g = p.dy[((r * p.W) + w) * p.C + c];
#pragma unroll
      for (int i = 0; i < kDwK; ++i) {
        const int64_t hh = h + i - kDwK / 2;
        if (hh < 0 || hh >= p.H) continue;
#pragma unroll
        for (int j = 0; j < kDwK; ++j) {
          const int64_t ww = w + j - kDwK / 2;
          if (ww < 0 || ww >= p.W) continue;
          acc[i * kDwK + j] += g * to_f32<T>(x[((b * p.H + hh) * p.W + ww) * p.C + c]);
        }
      }
      acc[kDwTaps] += g;
    }
  }
  float* out = p.partial + int64_t(blockIdx.x) * (kDwTaps + 1) * p.C;
#pragma unroll
  for (int k = 0; k <= kDwTaps; ++k) out[k * p.C + c] = acc[k];
}

template <typename T>
__global__ void __launch_bounds__(DwconvBwdTile::kThreads)
dwconv_bwd_reduce_kernel(const DwconvBwdParams p) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // k * C + c
  if (t >= (kDwTaps + 1) * p.C) return;
  const int64_t k = t / p.C, c = t % p.C;
  float s = 0.f;
  for (int64_t b = 0; b < p.chunks; ++b) s += p.partial[b * (kDwTaps + 1) * p.C + t];  // chunk order
  if (k < kDwTaps) {
    static_cast<T*>(p.dweight)[c * kDwTaps + k] = from_f32<T>(s);
  } else if (p.dbias != nullptr) {
    static_cast<T*>(p.dbias)[c] = from_f32<T>(s);
  }
}

template <typename T>
__global__ void __launch_bounds__(DwconvBwdTile::kThreads)
dwconv_bwd_input_kernel(const DwconvBwdParams p) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= p.B * p.H * p.W * p.C) return;
  const int64_t c = t % p.C;
  const int64_t w = (t / p.C) % p.W;
  const int64_t h = (t / (p.C * p.W)) % p.H;
  const int64_t b = t / (p.C * p.W * p.H);
  const T* __restrict__ wt = static_cast<const T*>(p.weight) + c * kDwTaps;
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < kDwK; ++i) {
    const int64_t hh = h + kDwK / 2 - i;
    if (hh < 0 || hh >= p.H) continue;
#pragma unroll
    for (int j = 0; j < kDwK; ++j) {
      const int64_t ww = w + kDwK / 2 - j;
      if (ww < 0 || ww >= p.W) continue;
      s += p.dy[((b * p.H + hh) * p.W + ww) * p.C + c] * to_f32<T>(wt[i * kDwK + j]);
    }
  }
  static_cast<T*>(p.dx)[t] = from_f32<T>(s);
}

}  // namespace hires::convnext
