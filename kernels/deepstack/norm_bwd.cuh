// Fused backward of RMSNorm / LayerNorm (rms_norm, layer_norm, deepstack_inject_rms_norm,
// deepstack_inject_layer_norm), with a deterministic two-stage reduction of dweight / dbias.
//
// Formula (per row n of x, seen as (rows, dim), D = dim; statistics recomputed here in fp32,
// two-pass, as the forward; a row whose fp32 statistic is not finite is redone in fp64):
//   LayerNorm: mu = mean(x), rstd = rsqrt(mean((x - mu)^2) + eps), y = (x - mu) * rstd
//   RMSNorm  : mu = 0,       rstd = rsqrt(mean(x^2) + eps),         y = x * rstd
//   g  = dy * w                                       (fp32)
//   dx = rstd * (g - mean(g) * [LayerNorm] - y * mean(g * y)) + dres      (rounded once to T)
//   dweight = sum_n dy * yw, yw = round_T(y) for RMSNorm (HF multiplies w by y cast to T), y for
//   LayerNorm; dbias = sum_n dy                        (fp32 sums, rounded once to T)
// Reduction (kernels/deepstack/norm_bwd.h): block b of stage 1 owns rows
//   [b * rows_per_chunk, (b + 1) * rows_per_chunk) and adds them, in row order, into its
//   workspace row partial[b] (each column owned by one thread: no atomics); stage 2 adds
//   partial[0..chunks) in order per column. Bitwise reproducible run to run.
// Memory: each row is read four times (stats, variance, row dot products, output); rows of up to
//   16384 x 2 B stay in L1/L2 between passes. Not tuned: the partial sums are read-modify-written
//   in global memory (L2) once per row; a register/shared-memory accumulator is the next step.
// Launch: stage 1 grid (chunks), block kThreads; stage 2 grid ceil(dim / kThreads), kThreads.
#pragma once
#include "kernels/common/numeric.cuh"
#include "kernels/deepstack/norm_bwd.h"

namespace hires::deepstack {

struct NormBwdTile {
  static constexpr int kThreads = 256;
  static constexpr int kWarps = kThreads / 32;
};

// Sum of two values over the block; every thread gets the result. `red` holds 2 * kWarps.
template <typename A>
__device__ __forceinline__ void block_sum2(A& a, A& b, A* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // red may still be read by the previous call
  if (lane == 0) {
    red[warp] = a;
    red[NormBwdTile::kWarps + warp] = b;
  }
  __syncthreads();
  a = 0;
  b = 0;
#pragma unroll
  for (int w = 0; w < NormBwdTile::kWarps; ++w) {  // fixed order: deterministic
    a += red[w];
    b += red[NormBwdTile::kWarps + w];
  }
}

// The fp64 statistics of one row (rare path; out of line so that it costs the main loop no
// registers). Every thread of the block calls it; (mu, rstd) are returned to all, by value: output
// references would take the caller's locals' addresses and put them in local memory.
template <typename T>
__device__ __noinline__ float2 row_stats_fp64(const T* x, int64_t D, bool layer, float eps,
                                              double* red) {
  double mud = 0.0, ud = 0.0;
  if (layer) {
    for (int64_t c = threadIdx.x; c < D; c += blockDim.x) mud += double(to_f32<T>(x[c]));
    block_sum2(mud, ud, red);
    mud /= double(D);
  }
  double ssd = 0.0;
  ud = 0.0;
  for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
    const double d = double(to_f32<T>(x[c])) - mud;
    ssd += d * d;
  }
  block_sum2(ssd, ud, red);
  return make_float2(float(mud), float(1.0 / sqrt(ssd / double(D) + double(eps))));
}

template <typename T>
__global__ void __launch_bounds__(NormBwdTile::kThreads)
norm_bwd_rows_kernel(const NormBwdParams p) {
  __shared__ float redf[2 * NormBwdTile::kWarps];
  __shared__ double redd[2 * NormBwdTile::kWarps];
  const int64_t D = p.dim;
  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  const T* __restrict__ xs = static_cast<const T*>(p.x);
  const T* __restrict__ dres = static_cast<const T*>(p.dres);
  const T* __restrict__ w = static_cast<const T*>(p.weight);
  T* __restrict__ dx = static_cast<T*>(p.dx);
  float* __restrict__ pw = p.partial + int64_t(blockIdx.x) * 2 * D;
  float* __restrict__ pb = pw + D;
  const int64_t r0 = int64_t(blockIdx.x) * p.rows_per_chunk;
  const int64_t r1 = min(p.rows, r0 + p.rows_per_chunk);
  const float inv_d = 1.f / float(D);

  for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
    pw[c] = 0.f;
    pb[c] = 0.f;
  }
  for (int64_t n = r0; n < r1; ++n) {
    const T* x = xs + n * D;
    const T* g = dy + n * D;
    // statistics (two-pass for LayerNorm, as the forward)
    float mu = 0.f, unused = 0.f;
    if (p.layer) {
      for (int64_t c = threadIdx.x; c < D; c += blockDim.x) mu += to_f32<T>(x[c]);
      block_sum2(mu, unused, redf);
      mu *= inv_d;
    }
    float ss = 0.f;
    unused = 0.f;
    for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
      const float d = to_f32<T>(x[c]) - mu;
      ss += d * d;
    }
    block_sum2(ss, unused, redf);
    float rstd;
    if (isfinite(ss)) {
      rstd = rsqrtf(ss * inv_d + p.eps);
    } else {  // fp32 overflow (|x| > ~1.8e19) or a non-finite x: redo the statistics in fp64
      const float2 st = row_stats_fp64<T>(x, D, p.layer, p.eps, redd);
      mu = st.x;
      rstd = st.y;
    }
    // row dot products: mean(g), mean(g * y)
    float sg = 0.f, sgy = 0.f;
    for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
      const float gc = to_f32<T>(g[c]) * to_f32<T>(w[c]);
      const float y = (to_f32<T>(x[c]) - mu) * rstd;
      sg += gc;
      sgy += gc * y;
    }
    block_sum2(sg, sgy, redf);
    const float mg = p.layer ? sg * inv_d : 0.f;
    const float mgy = sgy * inv_d;
    // dx and the chunk's partial sums
    for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
      const float dyc = to_f32<T>(g[c]);
      const float y = (to_f32<T>(x[c]) - mu) * rstd;
      float v = rstd * (dyc * to_f32<T>(w[c]) - mg - y * mgy);
      if (dres != nullptr) v += to_f32<T>(dres[n * D + c]);
      dx[n * D + c] = from_f32<T>(v);
      pw[c] += dyc * (p.layer ? y : round_to<T>(y));
      pb[c] += dyc;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(NormBwdTile::kThreads)
norm_bwd_reduce_kernel(const NormBwdParams p) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= p.dim) return;
  float sw = 0.f, sb = 0.f;
  for (int64_t b = 0; b < p.chunks; ++b) {  // chunk order: deterministic
    sw += p.partial[b * 2 * p.dim + c];
    sb += p.partial[b * 2 * p.dim + p.dim + c];
  }
  static_cast<T*>(p.dweight)[c] = from_f32<T>(sw);
  if (p.dbias != nullptr) static_cast<T*>(p.dbias)[c] = from_f32<T>(sb);
}

}  // namespace hires::deepstack
