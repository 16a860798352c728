// Fused depthwise 7x7 conv + LayerNorm over channels (the first half of a ConvNeXt block).
//
// Formula (per output pixel (b, h, w), channels c in [0, C)):
//   y[c]   = sum_{kh, kw in [0,7)} w_t[kh*7+kw][c] * x[b, h+kh-3, w+kw-3, c]  (taps on the zero
//            padding are skipped, not multiplied: an inf weight leaves border pixels finite)
//            + dw_bias[c]                       (fp32, taps row by row, bias added last)
//   mean   = sum_c y[c] / C;  var = sum_c (y[c] - mean)^2 / C   (two-pass, biased, fp32)
//   out[c] = round_T((y[c] - mean) * rsqrt(var + eps) * ln_weight[c] + ln_bias[c])
//   (a pixel whose fp32 var is not finite is redone in fp64: no overflow for finite y)
// Shapes: x (B,H,W,C) of T with strides (sx_b, sx_h, sx_w, 1); w_t (49, C) contiguous (the
//   checkpoint's (C,1,7,7) transposed by the binding, so one tap of VEC channels is one 16-byte
//   load); dw_bias, ln_weight, ln_bias (C,); out (B,H,W,C) contiguous.
//
// Design (why the conv output never reaches device memory): a LayerNorm over C needs all C conv
// outputs of a pixel before it can write any of them. C goes up to 3072 (ConvLLaVA stage 5), too
// many for one thread's registers, and recomputing the conv in a second pass would double the
// kernel's 98 FLOPs per output. So a block owns a segment of P consecutive output pixels of one
// image row and keeps their conv outputs for ALL C channels in shared memory as fp32
// (P * C <= kSmemFloats = 12288 floats = 48 KiB; P = 64 at C = 192 ... P = 4 at C = 3072):
//   Step 1 (conv): work item = (run of kRun consecutive pixels, pack of VEC channels); adjacent
//     threads take adjacent channel packs, so every 16-byte load of x, w_t and every shared
//     store is coalesced. Per kernel row kh a thread loads the kRun+6 input packs of its run once
//     into registers (fp32) and slides the 7 taps over them: 7*(kRun+6)/kRun = 17.5 loads per
//     output pack instead of 49. Weights come from L1/L2 (49*C values shared by every block).
//   Step 2 (norm): one warp per pixel reads the pixel's C values from shared memory, reduces
//     sum and sum of squared deviations with shuffles, then writes the normalized pixel with
//     16-byte stores (lane l owns packs l, l+32, ...).
// One __syncthreads separates the steps; every thread reaches it (no early return).
// Limits: C <= 12288 (the binding checks); VEC = 16/sizeof(T) needs C % VEC == 0, the strides
//   sx_* % VEC == 0 and 16-byte aligned pointers (the launcher checks, else VEC = 1: 2/4-byte
//   accesses, same math). All offsets are int64.
#pragma once
#include "kernels/common/numeric.cuh"
#include "kernels/convnext/dwconv_layernorm.h"

namespace hires::convnext {

struct DwconvLnTile {
  static constexpr int kThreads = 128;   // 4 warps; at bf16 every checkpoint width gives exactly
                                         // 384 conv work items per block = 3 per thread
  static constexpr int kWarp = 32;
  static constexpr int kWarps = kThreads / kWarp;
  static constexpr int kRun = 4;         // consecutive output pixels per conv work item
  static constexpr int kMaxPixels = 64;  // pixels per block (small C: more reuse of input rows)
  static constexpr int kK = DwconvLnLimits::kKernel;
  static constexpr int kPad = DwconvLnLimits::kPad;
  static constexpr int kWindow = kRun + kK - 1;  // input columns one run reads per kernel row
  static_assert(kThreads % kWarp == 0, "step 2 gives whole warps to pixels");
  static_assert(kMaxPixels % kRun == 0, "a block's pixel segment is made of whole runs");
  static_assert(DwconvLnLimits::kSmemFloats * 4 <= 48 * 1024,
                "conv outputs must fit the 48 KiB of dynamic shared memory that needs no opt-in");
};

// The 7 taps of kernel row kh for one work item (kRun pixels x VEC channels). kEdge: the run's
// window reaches the zero padding left or right of the image; those taps are skipped, not
// multiplied by 0 (an inf weight must leave border pixels finite, as F.conv2d: README
// "Non-finite values"). Interior runs take the unpredicated instance.
template <typename T, int VEC, bool kEdge>
__device__ __forceinline__ void dwconv_row_taps(float (&acc)[DwconvLnTile::kRun][VEC],
                                                const float (&xin)[DwconvLnTile::kWindow][VEC],
                                                const T* __restrict__ wt, int kh, int64_t C,
                                                int64_t c, int64_t wf, int64_t W) {
  using Tile = DwconvLnTile;
  using PackT = Pack<T, VEC>;
#pragma unroll
  for (int kw = 0; kw < Tile::kK; ++kw) {
    const PackT wv = *reinterpret_cast<const PackT*>(wt + int64_t(kh * Tile::kK + kw) * C + c);
    float wf32[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) wf32[e] = to_f32<T>(wv.v[e]);
#pragma unroll
    for (int r = 0; r < Tile::kRun; ++r) {
      if constexpr (kEdge) {
        const int64_t iw = wf + r + kw - Tile::kPad;
        if (iw < 0 || iw >= W) continue;
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[r][e] = fmaf(wf32[e], xin[r + kw][e], acc[r][e]);
    }
  }
}

// Grid: one block per (b, h, segment of P pixels); blockIdx.x = (b*H + h) * segs + seg.
// Dynamic shared memory: P * C floats.
template <typename T, int VEC>
// min 1 block per SM: without it ptxas targets 3 blocks on sm_90a (168 registers) and spills
// 24 bytes inside the conv loop; with it the kernel keeps its 180 registers on both arches
// (2 blocks per SM; see `python -m hires_lmm.bench.sass --filter dwconv`).
__global__ void __launch_bounds__(DwconvLnTile::kThreads, 1)
dwconv_layernorm_kernel(const DwconvLnParams p, const int P, const int64_t segs) {
  using Tile = DwconvLnTile;
  using PackT = Pack<T, VEC>;
  extern __shared__ float conv[];  // [P][C] fp32 conv outputs of this block's pixels

  const int64_t C = p.C, W = p.W, H = p.H;
  const int64_t row = int64_t(blockIdx.x) / segs;
  const int64_t seg = int64_t(blockIdx.x) % segs;
  const int64_t b = row / H, h = row % H;
  const int64_t w0 = seg * P;
  const int npix = int(min(int64_t(P), W - w0));  // pixels of this block inside the image (>= 1)
  const int64_t npack = C / VEC;
  const int runs = (npix + Tile::kRun - 1) / Tile::kRun;

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ wt = static_cast<const T*>(p.w_t);
  const T* __restrict__ dwb = static_cast<const T*>(p.dw_bias);

  // ---- Step 1: depthwise conv of (run, channel pack) work items into shared memory ----------
  for (int64_t item = threadIdx.x; item < int64_t(runs) * npack; item += Tile::kThreads) {
    const int64_t cp = item % npack;  // adjacent threads -> adjacent channel packs (coalesced)
    const int run = int(item / npack);
    const int64_t c = cp * VEC;
    const int pw0 = run * Tile::kRun;   // first pixel of the run within the block
    const int64_t wf = w0 + pw0;        // its image column

    float acc[Tile::kRun][VEC];
#pragma unroll
    for (int r = 0; r < Tile::kRun; ++r)
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[r][v] = 0.f;

    // every input column of the run's window inside the image: no tap touches the padding
    const bool interior = wf >= Tile::kPad && wf + Tile::kWindow - Tile::kPad <= W;
#pragma unroll 1
    for (int kh = 0; kh < Tile::kK; ++kh) {
      const int64_t ih = h + kh - Tile::kPad;
      if (ih < 0 || ih >= H) continue;  // zero padding rows contribute nothing (block-uniform)
      const T* xrow = x + b * p.sx_b + ih * p.sx_h + c;
      // The kRun + 6 input packs this run's 7 taps touch on row ih, loaded once (0 outside the
      // image; edge runs skip those taps).
      float xin[Tile::kWindow][VEC];
#pragma unroll
      for (int j = 0; j < Tile::kWindow; ++j) {
        const int64_t iw = wf + j - Tile::kPad;
        if (iw >= 0 && iw < W) {
          const PackT v = *reinterpret_cast<const PackT*>(xrow + iw * p.sx_w);
#pragma unroll
          for (int e = 0; e < VEC; ++e) xin[j][e] = to_f32<T>(v.v[e]);
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) xin[j][e] = 0.f;
        }
      }
      if (interior) dwconv_row_taps<T, VEC, false>(acc, xin, wt, kh, C, c, wf, W);
      else dwconv_row_taps<T, VEC, true>(acc, xin, wt, kh, C, c, wf, W);
    }
    if (dwb != nullptr) {
      const PackT bv = *reinterpret_cast<const PackT*>(dwb + c);
#pragma unroll
      for (int r = 0; r < Tile::kRun; ++r)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[r][e] += to_f32<T>(bv.v[e]);
    }
#pragma unroll
    for (int r = 0; r < Tile::kRun; ++r) {
      if (pw0 + r >= npix) break;  // pixels past the image's right edge are not stored
      float* dst = conv + int64_t(pw0 + r) * C + c;
      if constexpr (VEC % 4 == 0) {
        // 16-byte shared stores: C % 4 == 0 and c % 4 == 0 keep dst 16-byte aligned.
#pragma unroll
        for (int e = 0; e < VEC; e += 4)
          *reinterpret_cast<float4*>(dst + e) = make_float4(acc[r][e], acc[r][e + 1], acc[r][e + 2], acc[r][e + 3]);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) dst[e] = acc[r][e];
      }
    }
  }
  __syncthreads();  // every conv output of the block is in shared memory

  // ---- Step 2: LayerNorm over C, one warp per pixel ----------------------------------------
  const int lane = threadIdx.x % Tile::kWarp, warp = threadIdx.x / Tile::kWarp;
  const T* __restrict__ lw = static_cast<const T*>(p.ln_weight);
  const T* __restrict__ lb = static_cast<const T*>(p.ln_bias);
  T* __restrict__ out = static_cast<T*>(p.out);
  const float inv_c = 1.f / float(C);
  for (int pw = warp; pw < npix; pw += Tile::kWarps) {
    const float* y = conv + int64_t(pw) * C;
    float s = 0.f;
    for (int64_t c = lane; c < C; c += Tile::kWarp) s += y[c];
    const float mean = warp_sum(s) * inv_c;
    float ss = 0.f;
    for (int64_t c = lane; c < C; c += Tile::kWarp) {
      const float d = y[c] - mean;
      ss += d * d;
    }
    const float var = warp_sum(ss) * inv_c;  // the same value in every lane: uniform branches
    T* o = out + ((b * H + h) * W + w0 + pw) * C;
    if (!isfinite(var)) {
      // The fp32 statistic overflowed (huge conv outputs, or a non-finite one): redo the pixel in
      // fp64, which cannot overflow for finite fp32 values (README "Non-finite values"). Rare:
      // the fast path below stays fp32. Scalar accesses; this is not the hot path.
      double sd = 0.0;
      for (int64_t c = lane; c < C; c += Tile::kWarp) sd += y[c];
      const double md = warp_sum(sd) / double(C);
      double ssd = 0.0;
      for (int64_t c = lane; c < C; c += Tile::kWarp) ssd += (y[c] - md) * (y[c] - md);
      const double rd = 1.0 / sqrt(warp_sum(ssd) / double(C) + double(p.eps));
      for (int64_t c = lane; c < C; c += Tile::kWarp) {
        const float bias = lb != nullptr ? to_f32<T>(lb[c]) : 0.f;
        o[c] = from_f32<T>(float((y[c] - md) * rd) * to_f32<T>(lw[c]) + bias);
      }
      continue;
    }
    const float rstd = rsqrtf(var + p.eps);
    for (int64_t cp = lane; cp < npack; cp += Tile::kWarp) {
      const int64_t c = cp * VEC;
      const PackT wv = *reinterpret_cast<const PackT*>(lw + c);
      PackT bv{};
      if (lb != nullptr) bv = *reinterpret_cast<const PackT*>(lb + c);
      float yv[VEC];
      if constexpr (VEC % 4 == 0) {
        // 16-byte shared loads (lanes VEC floats apart: 2-way conflicts instead of VEC-way).
#pragma unroll
        for (int e = 0; e < VEC; e += 4) {
          const float4 q = *reinterpret_cast<const float4*>(y + c + e);
          yv[e] = q.x;
          yv[e + 1] = q.y;
          yv[e + 2] = q.z;
          yv[e + 3] = q.w;
        }
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) yv[e] = y[c + e];
      }
      PackT ov;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float bias = lb != nullptr ? to_f32<T>(bv.v[e]) : 0.f;
        ov.v[e] = from_f32<T>((yv[e] - mean) * rstd * to_f32<T>(wv.v[e]) + bias);
      }
      *reinterpret_cast<PackT*>(o + c) = ov;
    }
  }
}

}  // namespace hires::convnext
