// Fused depthwise 7x7 conv + LayerNorm over channels (the first half of a ConvNeXt block).
//
// Formula (per output pixel (b, h, w), channels c in [0, C)):
//   y[c]   = sum_{kh, kw in [0,7)} w_t[kh*7+kw][c] * x[b, h+kh-3, w+kw-3, c]  (taps on the zero
//            padding are skipped, not multiplied: an inf weight leaves border pixels finite)
//            + dw_bias[c]                       (fp32 FMAs, taps row by row, bias added last)
//   mean   = sum_c y[c] / C;  var = sum_c (y[c] - mean)^2 / C   (two-pass, biased, fp32)
//   out[c] = round_T((y[c] - mean) * rsqrt(var + eps) * ln_weight[c] + ln_bias[c])
//   (a pixel whose fp32 var is not finite is redone in fp64: no overflow for finite y)
// Shapes: x (B,H,W,C) of T with strides (sx_b, sx_h, sx_w, 1); w_c (C, 49) contiguous (the
//   checkpoint's (C,1,7,7); tiled kernel) and w_t (49, C) (its transpose; generic kernel); dw_bias,
//   ln_weight, ln_bias (C,); out (B,H,W,C) contiguous.
//
// Why the conv output stays on chip: the LayerNorm needs all C conv outputs of a pixel before it
// can write one, and recomputing the conv would double its 49 FMAs per output, the kernel's
// floor: at 49 fp32 FFMA per output it is FFMA-issue-bound (ConvLLaVA stage 1, 384x384x192, is
// 1.39 G FFMA: ~41 us on an H100's 132 SMs at 1.98 GHz, against ~113 MB of HBM traffic). So the
// design goal is few instructions per output besides the 49 FFMA.
//
// Tiled kernel dwconv_layernorm_kernel<T, VEC, RH, S> (DwconvLnTiling in dwconv_layernorm.h):
//   Ownership: a block of 256 threads owns an output tile of RH rows x TW = 8*S columns of one
//     image, all C channels. Channels are convolved in chunks of CC = 256/S; within a chunk thread
//     t owns channel c0 + t % CC (a warp = 32 consecutive channels) and the 8-column strip t / CC,
//     i.e. RH x 8 outputs of one channel, accumulated in registers (a sliding window along W).
//   Shapes (first whose shared memory fits the 80 KiB budget; launcher and CPU twin choose alike):
//     RH x S   tile    CC   smem at model C                       ConvLLaVA stage
//     2 x 4    2x32    64   (64 C + 2*38*64) * 4 = 67 KiB @ 192      1 (384x384)
//     2 x 2    2x16   128   (32 C + 2*22*128)* 4 = 70 KiB @ 384      2 (192x192)
//     2 x 1    2x8    256   (16 C + 2*14*256)* 4 = 76 KiB @ 768      3 (96x96, 27 of 36 blocks)
//     1 x 1    1x8    256   ( 8 C + 2*14*256)* 4 = 76 KiB @ 1536     4 (48x48)
//     C = 3072 (stage 5) takes 1x1 with 124 KiB (opt-in, 1 block per SM); past the device's
//     opt-in limit (C > 4320 on sm_80, > 6368 on sm_90) the generic kernel below runs.
//   Shared memory: conv[P][C] fp32 (P = RH*TW outputs of the tile, kept for the LayerNorm) and a
//     double-buffered ring of staged input rows ring[2][TW+6][CC] fp32.
//   Conv pipeline, per chunk, per input row i of the RH+6 rows the tile reads (ih = h0-3+i):
//     16-byte global loads of row i+1 (TW+6 columns x CC channels, zeros outside the image) into
//     registers (issued before the taps on the 2-row 16-byte shapes, after them otherwise); the
//     taps of row i (each thread: 14 LDS.32 of its channel's staged row,
//     conflict-free, then for each of its output rows r with kh = i - r in [0,7), 7 x 8 FFMA
//     against its fp32 weights in registers, kernel row kh loaded at step kh - 1); the loaded row converted to fp32 ONCE and
//     stored (STS.128) into the other buffer; one __syncthreads. Rows outside the image are
//     staged as zeros and skipped (block-uniform); strips whose window crosses the left/right
//     border take the predicated instance (taps on padding skipped, not multiplied).
//   LayerNorm: one warp per pixel of the tile reads its C fp32 conv outputs from shared memory
//     (LDS.128), two-pass mean / variance with lane-strided fp32 partial sums and a butterfly
//     (xor-shuffle) reduction, then 16-byte stores of the normalized pixel (st.global.v4).
//   Per output (bf16, stage 1, shape 2x4): 49 FFMA; 14*8/16 = 7 LDS.32; weights 49 LDG.16 + 49
//     conversions per thread per chunk = 6.1 (the S threads of a channel each load them, from L1);
//     staging (8 rows x 38 cols)/(2 x 32) = 4.75 input elements per output, each converted once
//     (1 shift/LOP each, 1/8 LDG.128, 1/4 STS.128); LayerNorm ~3/32 LDS.128 x 3 passes. L2->SM
//     traffic: 4.75x the input at 2x4, 5.5x at 2x2, 7x at 2x1, 12.25x at 1x1 (generic: 7.66x).
//   Compiled (cuda_check, bf16): one interior row step of a 2-row shape is ~230 SASS instructions
//     for 112 FFMA (49%; the generic kernel's kernel-row step ~720 for 224 FFMA, 31%: it converts
//     every input and weight pack per use); the 1-row shape ~170 for 56 (33%). What is left per
//     step: the next row's address/predicate arithmetic and the 7 weight loads (next to attack:
//     4 output rows per thread once the registers allow it).
//   Registers: (RH+1)*7 live weights (a kernel row is live only for the RH steps that use it) +
//     RH*8 accumulators + 14 staged values + 4 x kLoads prefetch + addressing; __launch_bounds__(256,
//     2) caps them at 128 (2 blocks = 16 warps per SM). With all 49 weights resident, ptxas spilled.
//   Accumulation order (what fp32 rounding depends on; the CPU twin follows it): per output,
//     acc = 0, fmaf over kh ascending, kw ascending, skipped padding taps, then + dw_bias; the
//     statistics as described above (fmaf(d, d, ss) for the squares).
// Limits: the tiled kernel is the 16-byte path: C % VEC == 0, strides % VEC == 0 and 16-byte
//   aligned pointers for VEC = 16/sizeof(T) (the launcher checks); other calls run the generic
//   kernel with VEC = 1 (2/4-byte accesses, same math). All offsets are int64.
#pragma once
#include <type_traits>

#include "kernels/common/numeric.cuh"
#include "kernels/convnext/dwconv_layernorm.h"

namespace hires::convnext {

// Compile-time geometry of one tile shape (see the table above).
template <int VEC, int RH, int S>
struct DwconvLnTileCfg {
  using Tiling = DwconvLnTiling;
  static constexpr int kThreads = Tiling::kThreads;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kK = DwconvLnLimits::kKernel;
  static constexpr int kPad = DwconvLnLimits::kPad;
  static constexpr int kTaps = DwconvLnLimits::kTaps;
  static constexpr int kRw = Tiling::kRw;
  static constexpr int kInCols = Tiling::kInCols;        // input columns one thread reads per row
  static constexpr int kTW = S * kRw;                    // tile width (output columns)
  static constexpr int kCC = kThreads / S;               // channels per chunk
  static constexpr int kP = RH * kTW;                    // output pixels per block
  static constexpr int kInRows = RH + kK - 1;            // input rows per chunk
  static constexpr int kInW = kTW + kK - 1;              // staged columns (tile + halo)
  static constexpr int kRowFloats = kInW * kCC;          // one staged row, fp32
  static constexpr int kPacksPerCol = kCC / VEC;
  static constexpr int kRowPacks = kInW * kPacksPerCol;  // global packs of one staged row
  static constexpr int kLoads = (kRowPacks + kThreads - 1) / kThreads;  // per thread per row
  // Prefetch (the next row's loads in flight during this row's taps) costs kLoads packs of
  // registers across the taps: on for the 16-byte 2-row shapes (8 registers); the scalar path
  // (up to 14 loads) and the 1-row shape load after the taps instead (ptxas spilled with it
  // under the 128-register cap; the other 15 warps of the SM hide the latency).
  static constexpr bool kPrefetch = VEC > 1 && RH == 2;
  static_assert(kThreads % S == 0 && kCC % 32 == 0, "a warp is 32 channels of one strip");
  static_assert(kCC % VEC == 0, "a chunk is whole packs");
  static_assert(RH >= 1 && RH <= 2, "RH * 8 accumulators + 49 weights must fit 128 registers");
  static_assert(kP % 4 == 0 && kRowFloats % 4 == 0, "the ring starts and its rows stay 16-byte aligned");
  static_assert(Tiling::pixels({RH, S}) == kP, "same geometry as the launcher's smem formula");
};

// A pack of VEC elements of T as loaded from global memory: one uint4 for a 16-byte pack (four
// 32-bit registers; a Pack<bf16, 8> would be split into eight 16-bit registers), else T.
template <typename T, int VEC>
using DwlnRaw = std::conditional_t<VEC * sizeof(T) == 16, uint4, T>;

// The raw pack -> VEC floats (exact conversions: bf16 by shifts, fp16 by cvt).
template <typename T, int VEC>
__device__ __forceinline__ void dwln_raw_to_f32(const DwlnRaw<T, VEC>& r, float (&f)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if constexpr (std::is_same_v<T, float>) {
        f[k] = __uint_as_float(w[k]);
      } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        f[2 * k] = __uint_as_float(w[k] << 16);          // element 2k: the low half (little-endian)
        f[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
      } else {
        const float2 v = __half22float2(*reinterpret_cast<const __half2*>(&w[k]));
        f[2 * k] = v.x;
        f[2 * k + 1] = v.y;
      }
    }
  } else {
    f[0] = to_f32<T>(r);
  }
}

// The staging of one input row of a chunk: ring[j][cc], j in [0, TW+6) the tile's columns with the
// halo, cc the chunk's channels; kLoads packs per thread. Since kThreads is a multiple of the packs
// per column, thread t always loads pack cp = t % kPacksPerCol, of columns j = t / kPacksPerCol +
// l * kThreads / kPacksPerCol. Offsets are recomputed per row (a few integer ops) rather than
// kept: registers are the kernel's scarce resource.
template <typename Cfg, typename T, int VEC>
struct DwlnStager {
  static_assert(Cfg::kThreads % Cfg::kPacksPerCol == 0, "a thread keeps its pack index");
  static constexpr int kColsPerPass = Cfg::kThreads / Cfg::kPacksPerCol;
  DwlnRaw<T, VEC> raw[Cfg::kLoads];

  __device__ __forceinline__ static int col(int l) {
    return int(threadIdx.x) / Cfg::kPacksPerCol + l * kColsPerPass;
  }
  __device__ __forceinline__ static int cpv() { return int(threadIdx.x) % Cfg::kPacksPerCol * VEC; }
  // Global -> registers: row ih of the chunk starting at channel c0 with ccv valid channels; zeros
  // outside the image and past the valid channels.
  __device__ __forceinline__ void load(const T* __restrict__ x, const DwconvLnParams& p, int64_t b,
                                       int64_t w0, int64_t ih, int64_t c0, int64_t ccv) {
    const bool use = ih >= 0 && ih < p.H && cpv() < ccv;
    const T* row = x + b * p.sx_b + ih * p.sx_h + c0 + cpv();
#pragma unroll
    for (int l = 0; l < Cfg::kLoads; ++l) {
      const int64_t iw = w0 - Cfg::kPad + col(l);
      if (use && col(l) < Cfg::kInW && iw >= 0 && iw < p.W)
        raw[l] = *reinterpret_cast<const DwlnRaw<T, VEC>*>(row + iw * p.sx_w);
      else
        raw[l] = DwlnRaw<T, VEC>{};
    }
  }
  // Registers -> shared buffer `buf` (ring[j][cc]): each element converted to fp32 once.
  __device__ __forceinline__ void store(float* buf) const {
#pragma unroll
    for (int l = 0; l < Cfg::kLoads; ++l) {
      if (col(l) >= Cfg::kInW) break;
      float f[VEC];
      dwln_raw_to_f32<T, VEC>(raw[l], f);
      float* dst = buf + col(l) * Cfg::kCC + cpv();
      if constexpr (VEC % 4 == 0) {
#pragma unroll
        for (int e = 0; e < VEC; e += 4)
          *reinterpret_cast<float4*>(dst + e) = make_float4(f[e], f[e + 1], f[e + 2], f[e + 3]);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) dst[e] = f[e];
      }
    }
  }
};

// The taps of staged input row i for one thread: its 14 staged values of the row, then for each
// of its output rows r with kh = i - r in [0, 7) the 7 x 8 FMAs. i is a compile-time constant
// after unrolling, so every weight index is a register. kEdge: taps whose input column is outside
// the image (bit j of colmask clear) are skipped.
template <typename Cfg, int RH, bool kEdge>
__device__ __forceinline__ void dwln_row_taps(float (&acc)[RH][Cfg::kRw], const float (&wr)[Cfg::kTaps],
                                              const float* src, int i, uint32_t colmask) {
  float xr[Cfg::kInCols];
#pragma unroll
  for (int j = 0; j < Cfg::kInCols; ++j) xr[j] = src[j * Cfg::kCC];
#pragma unroll
  for (int r = 0; r < RH; ++r) {
    const int kh = i - r;
    if (kh < 0 || kh >= Cfg::kK) continue;
#pragma unroll
    for (int kw = 0; kw < Cfg::kK; ++kw) {
      const float w = wr[kh * Cfg::kK + kw];
#pragma unroll
      for (int rw = 0; rw < Cfg::kRw; ++rw) {
        if constexpr (kEdge) {
          if (!((colmask >> (rw + kw)) & 1u)) continue;
        }
        acc[r][rw] = fmaf(w, xr[rw + kw], acc[r][rw]);
      }
    }
  }
}

// LayerNorm of one pixel by one warp: y = its C fp32 conv outputs in shared memory.
template <typename T, int VEC>
__device__ __forceinline__ void dwln_pixel_norm(const float* y, T* __restrict__ o, int64_t C,
                                                const T* __restrict__ lw, const T* __restrict__ lb,
                                                float eps, int lane) {
  const float inv_c = 1.f / float(C);
  // pass 1: lane-strided sums (16-byte LDS when C % 4 == 0), butterfly reduction
  float s = 0.f;
  if constexpr (VEC % 4 == 0) {
    for (int64_t q = lane; q < C / 4; q += 32) {
      const float4 v = reinterpret_cast<const float4*>(y)[q];
      s += v.x; s += v.y; s += v.z; s += v.w;
    }
  } else {
    for (int64_t c = lane; c < C; c += 32) s += y[c];
  }
  const float mean = warp_sum(s) * inv_c;
  // pass 2: squared deviations (explicit fmaf: the CPU twin rounds the same way)
  float ss = 0.f;
  if constexpr (VEC % 4 == 0) {
    for (int64_t q = lane; q < C / 4; q += 32) {
      const float4 v = reinterpret_cast<const float4*>(y)[q];
      float d = v.x - mean; ss = fmaf(d, d, ss);
      d = v.y - mean; ss = fmaf(d, d, ss);
      d = v.z - mean; ss = fmaf(d, d, ss);
      d = v.w - mean; ss = fmaf(d, d, ss);
    }
  } else {
    for (int64_t c = lane; c < C; c += 32) {
      const float d = y[c] - mean;
      ss = fmaf(d, d, ss);
    }
  }
  const float var = warp_sum(ss) * inv_c;  // the same value in every lane: uniform branches
  if (!isfinite(var)) {
    // The fp32 statistic overflowed (huge conv outputs, or a non-finite one): redo the pixel in
    // fp64, which cannot overflow for finite fp32 values (README "Non-finite values"). Rare.
    double sd = 0.0;
    for (int64_t c = lane; c < C; c += 32) sd += y[c];
    const double md = warp_sum(sd) / double(C);
    double ssd = 0.0;
    for (int64_t c = lane; c < C; c += 32) ssd += (y[c] - md) * (y[c] - md);
    const double rd = 1.0 / sqrt(warp_sum(ssd) / double(C) + double(eps));
    for (int64_t c = lane; c < C; c += 32) {
      const float bias = lb != nullptr ? to_f32<T>(lb[c]) : 0.f;
      o[c] = from_f32<T>(float((y[c] - md) * rd) * to_f32<T>(lw[c]) + bias);
    }
    return;
  }
  const float rstd = rsqrtf(var + eps);
  // pass 3: normalize VEC channels per lane step, one 16-byte store each
  using PackT = Pack<T, VEC>;
  for (int64_t cp = lane; cp < C / VEC; cp += 32) {
    const int64_t c = cp * VEC;
    const PackT wv = *reinterpret_cast<const PackT*>(lw + c);
    PackT bv{};
    if (lb != nullptr) bv = *reinterpret_cast<const PackT*>(lb + c);
    float yv[VEC];
    if constexpr (VEC % 4 == 0) {
#pragma unroll
      for (int e = 0; e < VEC; e += 4) {
        const float4 q = *reinterpret_cast<const float4*>(y + c + e);
        yv[e] = q.x; yv[e + 1] = q.y; yv[e + 2] = q.z; yv[e + 3] = q.w;
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) yv[e] = y[c + e];
    }
    float ov[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      ov[e] = fmaf((yv[e] - mean) * rstd, to_f32<T>(wv.v[e]), lb != nullptr ? to_f32<T>(bv.v[e]) : 0.f);
    store_pack<T, VEC>(o + c, ov);
  }
}

// Grid: one block per tile, blockIdx.x = (b * tiles_h + ty) * tiles_w + tx. Dynamic shared
// memory: DwconvLnTiling::smem_bytes({RH, S}, C). Every thread reaches every __syncthreads (no
// early return; inactive channel threads of a chunk's tail still stage and synchronize).
template <typename T, int VEC, int RH, int S>
__global__ void __launch_bounds__(DwconvLnTiling::kThreads, 2)
dwconv_layernorm_kernel(const DwconvLnParams p, const int64_t tiles_h, const int64_t tiles_w) {
  using Cfg = DwconvLnTileCfg<VEC, RH, S>;
  static_assert(VEC * sizeof(T) == 16, "the tiled kernel is the 16-byte path (the launcher sends the rest to the generic kernel)");
  constexpr int kRw = Cfg::kRw, kCC = Cfg::kCC, kPad = Cfg::kPad;
  extern __shared__ float4 dwln_smem4[];  // float4: 16-byte aligned
  float* smem = reinterpret_cast<float*>(dwln_smem4);

  const int64_t C = p.C, H = p.H, W = p.W;
  float* conv = smem;                          // [kP][C] fp32 conv outputs of the tile
  float* ring = smem + int64_t(Cfg::kP) * C;   // [2][kInW][kCC] staged input rows

  const int64_t tile = blockIdx.x;
  const int64_t tx = tile % tiles_w, ty = (tile / tiles_w) % tiles_h, b = tile / tiles_w / tiles_h;
  const int64_t h0 = ty * RH, w0 = tx * Cfg::kTW;
  const int cc = threadIdx.x % kCC;        // channel within the chunk (lanes: consecutive)
  const int strip = threadIdx.x / kCC;     // warp-uniform
  const int64_t ws = w0 + strip * kRw;     // first output column of this thread
  const bool interior = ws >= kPad && ws + kRw + kPad <= W;  // no tap of the strip on padding
  uint32_t colmask = 0;                    // bit j: input column ws - 3 + j inside the image
#pragma unroll
  for (int j = 0; j < Cfg::kInCols; ++j) {
    const int64_t iw = ws - kPad + j;
    if (iw >= 0 && iw < W) colmask |= 1u << j;
  }

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ dwb = static_cast<const T*>(p.dw_bias);
  const int64_t nchunks = (C + kCC - 1) / kCC;

  DwlnStager<Cfg, T, VEC> st;
  // prologue: stage input row 0 of chunk 0
  st.load(x, p, b, w0, h0 - kPad, 0, C < kCC ? C : int64_t(kCC));
  st.store(ring);
  __syncthreads();

  int buf = 0;
  float wr[Cfg::kTaps];
  float acc[RH][kRw];
  for (int64_t k = 0; k < nchunks; ++k) {
    const int64_t c0 = k * kCC;
    const int64_t ccv = C - c0 < kCC ? C - c0 : int64_t(kCC);  // valid channels of the chunk
    const bool active = cc < ccv;
    const int64_t c = c0 + cc;
    // this thread's taps in fp32, each loaded once per chunk from the checkpoint layout (C, 49)
    // (constant offsets from one pointer: no address arithmetic per tap; the chunk's 49 x CC
    // weights are L1-resident after the first row), one kernel row per step: row kh is needed from
    // step kh to kh + RH - 1, so at most RH + 1 rows (21 registers, not 49) are live; row 0 now,
    // row i + 1 during step i
    const T* __restrict__ wc = static_cast<const T*>(p.w_c) + (active ? c : 0) * Cfg::kTaps;
    auto load_wrow = [&](int kh) {
#pragma unroll
      for (int kw = 0; kw < Cfg::kK; ++kw) {
        const int t = kh * Cfg::kK + kw;
        wr[t] = active ? to_f32<T>(wc[t]) : 0.f;
      }
    };
    load_wrow(0);
#pragma unroll
    for (int r = 0; r < RH; ++r)
#pragma unroll
      for (int rw = 0; rw < kRw; ++rw) acc[r][rw] = 0.f;

#pragma unroll
    for (int i = 0; i < Cfg::kInRows; ++i) {
      // 1. issue the global loads of the next staged row (this chunk's row i+1, or the next
      //    chunk's row 0); they are in flight during step 2
      const bool last = i + 1 == Cfg::kInRows;
      const bool has_next = !last || k + 1 < nchunks;
      const int64_t nc0 = last ? c0 + kCC : c0;
      const int64_t nccv = C - nc0 < kCC ? C - nc0 : int64_t(kCC);
      const int64_t nih = h0 - kPad + (last ? 0 : i + 1);
      if (Cfg::kPrefetch && has_next) st.load(x, p, b, w0, nih, nc0, nccv);
      if (i + 1 < Cfg::kK) load_wrow(i + 1);
      // 2. the taps of row i (block-uniform skip of rows outside the image)
      const int64_t ih = h0 - kPad + i;
      if (active && ih >= 0 && ih < H) {
        const float* src = ring + buf * Cfg::kRowFloats + strip * kRw * kCC + cc;
        if (interior) dwln_row_taps<Cfg, RH, false>(acc, wr, src, i, colmask);
        else dwln_row_taps<Cfg, RH, true>(acc, wr, src, i, colmask);
      }
      // 3. convert the next row once and store it into the other buffer; the barrier both
      //    publishes it and retires every read of the buffer step 3 of the next row overwrites
      if (has_next) {
        if (!Cfg::kPrefetch) st.load(x, p, b, w0, nih, nc0, nccv);
        st.store(ring + (buf ^ 1) * Cfg::kRowFloats);
      }
      __syncthreads();
      buf ^= 1;
    }
    if (active) {
      const bool has_bias = dwb != nullptr;
      const float bias = has_bias ? to_f32<T>(dwb[c]) : 0.f;
#pragma unroll
      for (int r = 0; r < RH; ++r)
#pragma unroll
        for (int rw = 0; rw < kRw; ++rw)  // lanes: consecutive channels, conflict-free
          conv[int64_t(r * Cfg::kTW + strip * kRw + rw) * C + c] = has_bias ? acc[r][rw] + bias : acc[r][rw];
    }
  }
  __syncthreads();  // every conv output of the tile is in shared memory

  // LayerNorm over C, one warp per pixel of the tile inside the image
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const T* __restrict__ lw = static_cast<const T*>(p.ln_weight);
  const T* __restrict__ lb = static_cast<const T*>(p.ln_bias);
  T* __restrict__ out = static_cast<T*>(p.out);
  for (int pix = warp; pix < Cfg::kP; pix += Cfg::kWarps) {
    const int64_t h = h0 + pix / Cfg::kTW, w = w0 + pix % Cfg::kTW;
    if (h >= H || w >= W) continue;  // warp-uniform
    dwln_pixel_norm<T, VEC>(conv + int64_t(pix) * C, out + ((b * H + h) * W + w) * C, C, lw, lb, p.eps, lane);
  }
}

// ==== Generic kernel: C wider than the tiled kernel's shared memory allows =====================
// A block owns a segment of P consecutive output pixels of one image row and keeps their conv
// outputs for ALL C channels in shared memory as fp32 (P * C <= kSmemFloats = 12288 floats = 48
// KiB; P = 2 at C = 6144, P = 1 at C = 12288). Step 1 (conv): work item = (run of kRun consecutive
// pixels, pack of VEC channels); per kernel row a thread loads the kRun+6 input packs of its run
// into registers (fp32) and slides the 7 taps over them. Step 2: one warp per pixel, as the tiled
// kernel. This was the only kernel before the tiled one (README "Static SASS report" history).
struct DwconvLnGenericTile {
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
__device__ __forceinline__ void dwconv_row_taps(float (&acc)[DwconvLnGenericTile::kRun][VEC],
                                                const float (&xin)[DwconvLnGenericTile::kWindow][VEC],
                                                const T* __restrict__ wt, int kh, int64_t C,
                                                int64_t c, int64_t wf, int64_t W) {
  using Tile = DwconvLnGenericTile;
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
__global__ void __launch_bounds__(DwconvLnGenericTile::kThreads, 1)
dwconv_layernorm_generic_kernel(const DwconvLnParams p, const int P, const int64_t segs) {
  using Tile = DwconvLnGenericTile;
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
      float ov[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float bias = lb != nullptr ? to_f32<T>(bv.v[e]) : 0.f;
        ov[e] = (yv[e] - mean) * rstd * to_f32<T>(wv.v[e]) + bias;
      }
      store_pack<T, VEC>(o + c, ov);  // one st.global.v4 (a Pack copy splits into 16-bit stores)
    }
  }
}


}  // namespace hires::convnext
