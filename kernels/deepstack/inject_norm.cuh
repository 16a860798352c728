// DeepStack residual injection fused with the normalization that opens the next layer.
//
// Formula (per row n of hidden, seen as (rows, dim)):
//   inj[n]    = round_T(hidden[n] + round_T(embeds[r]))   if index[r] == n  (one rounding: HF's
//             = hidden[n]                                  otherwise         `h[m] + e.to(T)`)
//   Norm::kRms   : normed[n] = round_T(w * round_T(inj[n] * rsqrt(mean(inj[n]^2) + eps)))
//                  (HF LlamaRMSNorm: fp32 statistics, cast to T, then times weight)
//   Norm::kLayer : normed[n] = round_T((inj[n] - mean) * rsqrt(var + eps) * w + b)
//                  (nn.LayerNorm: fp32 statistics, two-pass variance, one rounding)
//   A row whose fp32 statistic is not finite (|x| > ~1.8e19) is redone on x scaled by a power of
//   two (exact; never `bias`).
// Shapes: hidden (rows, dim) T with a row stride; embeds (num_visual, dim) E; index (num_visual,)
//   int64 strictly increasing; weight, bias (dim,) T; outputs contiguous (rows, dim) T.
// Ownership: a block is (threads_per_row x rows_per_block); threads_per_row threads own one row.
//   VEC > 1 (16-byte packs): each thread holds up to MAXV packs of VEC elements in registers, so
//   the row is read once from device memory and written once per output (one pass).
//   VEC == 1 (the scalar fallback: unaligned pointers or strides, hidden sizes not a multiple of
//   the pack): the same threads and the same columns per thread (c = threadIdx.x + i * blockDim.x,
//   i < MAXV), but streamed: each pass over the row (statistics, then normalize) re-reads hidden
//   and embeds (L1/L2 hits after the first pass) and recomputes the injected value, so no row is
//   held in registers and nothing spills to local memory (32 scalars per thread plus their
//   addresses did not fit the 128 registers of the 512-thread launch bound). Per thread the sums
//   run over the same columns in the same order as the register path: the same results.
//   The row -> embeds-row lookup is a binary search in `index`, issued after the row's loads so
//   its latency hides behind them; no inverse map, no nonzero, no host sync: CUDA-graph capturable.
// Limits: dim <= kMaxThreadsPerRow * kElemsPerThread = 16384 (MAXV * VEC == kElemsPerThread); VEC > 1 needs dim % VEC == 0 and every
//   pointer and row stride aligned to its pack (the launcher checks and falls back to VEC = 1).
#pragma once
#include "kernels/common/numeric.cuh"
#include "kernels/deepstack/inject_norm.h"

namespace hires::deepstack {

struct InjectNormTile {
  static constexpr int kWarp = 32;
  static constexpr int kMaxThreadsPerRow = 512;   // launch bound 512 leaves 128 registers: no spills
                                                  // (the scalar fallback streams, see above)
  static constexpr int kElemsPerThread = 32;      // row elements one thread holds in registers
  static constexpr int kMinThreadsPerBlock = 128;  // small rows: pack several per block
  static constexpr int kMaxWarpsPerRow = kMaxThreadsPerRow / kWarp;
  static constexpr int kMaxRowsPerBlock = kMinThreadsPerBlock / kWarp;
  static_assert(kMinThreadsPerBlock % kWarp == 0, "rows are made of whole warps");
};

// Barrier of the threads that own one row: named barrier 1 + threadIdx.y over blockDim.x threads
// (whole warps), so that the rows of a block never wait for each other and a row may take a
// branch of its own (the fp64 path below) with barriers inside.
__device__ __forceinline__ void row_sync() {
  if (blockDim.y == 1) {
    __syncthreads();
  } else {
    asm volatile("bar.sync %0, %1;" ::"r"(int(threadIdx.y) + 1), "r"(int(blockDim.x)) : "memory");
  }
}

// Sum over the threads that own one row (threadIdx.x in [0, blockDim.x), blockDim.x a multiple
// of 32). `scratch` holds one value per warp of each row; the trailing barrier lets the caller
// reuse it for the next reduction.
template <typename V>
__device__ __forceinline__ V row_sum(V v, V (*scratch)[InjectNormTile::kMaxWarpsPerRow]) {
  v = warp_sum(v);
  const int warps = blockDim.x / InjectNormTile::kWarp;
  if (warps == 1) return v;
  const int lane = threadIdx.x % InjectNormTile::kWarp, warp = threadIdx.x / InjectNormTile::kWarp;
  if (lane == 0) scratch[threadIdx.y][warp] = v;
  row_sync();
  V s = V(0);
#pragma unroll  // straight-line code: no loop for register spills of the scalar path to sit in
  for (int w = 0; w < InjectNormTile::kMaxWarpsPerRow; ++w)
    if (w < warps) s += scratch[threadIdx.y][w];
  row_sync();
  return s;
}

// Max over the threads that own one row (as row_sum).
__device__ __forceinline__ float row_max(float v, float (*scratch)[InjectNormTile::kMaxWarpsPerRow]) {
#pragma unroll
  for (int o = InjectNormTile::kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warps = blockDim.x / InjectNormTile::kWarp;
  if (warps == 1) return v;
  const int lane = threadIdx.x % InjectNormTile::kWarp, warp = threadIdx.x / InjectNormTile::kWarp;
  if (lane == 0) scratch[threadIdx.y][warp] = v;
  row_sync();
  float m = 0.f;
#pragma unroll
  for (int w = 0; w < InjectNormTile::kMaxWarpsPerRow; ++w)
    if (w < warps) m = fmaxf(m, scratch[threadIdx.y][w]);
  row_sync();
  return m;
}

// First r with index[r] >= row (index strictly increasing), or -1 when row is not visual.
__device__ __forceinline__ int64_t find_visual(const int64_t* __restrict__ index, int64_t n, int64_t row) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (__ldg(index + mid) < row) lo = mid + 1; else hi = mid;
  }
  return (lo < n && __ldg(index + lo) == row) ? lo : -1;
}

// The scalar fallback (VEC == 1): the row streamed in passes, nothing held in registers (see the
// header). inj(c) is the injected value of column c, recomputed from hidden and embeds by each pass
// exactly as the register path computes it once; the sums visit a thread's columns in the register
// path's order, so statistics and outputs are the same.
template <typename T, typename E, Norm kNorm>
__device__ __forceinline__ void inject_norm_row_stream(const InjectNormParams& p, int64_t row, bool active,
                                                       float (*scratch)[InjectNormTile::kMaxWarpsPerRow]) {
  const int64_t dim = p.dim;
  const int64_t c0 = threadIdx.x, step = blockDim.x;
  const int64_t end = active ? dim : 0;  // inactive threads visit no column but join the barriers
  const T* hrow = static_cast<const T*>(p.hidden) + (active ? row * p.hidden_stride : 0);
  const int64_t r = (active && p.num_visual > 0) ? find_visual(p.index, p.num_visual, row) : -1;
  const E* erow = r >= 0 ? static_cast<const E*>(p.embeds) + r * p.embeds_stride : nullptr;
  auto inj = [&](int64_t c) {
    float v = to_f32<T>(hrow[c]);
    if (erow != nullptr) v = round_to<T>(v + round_to<T>(to_f32<E>(erow[c])));
    return v;
  };
  // Pass 1: inject (write `injected`) and the first statistic (LayerNorm: the sum; RMS: sum x^2).
  T* irow = (p.injected != nullptr && active) ? static_cast<T*>(p.injected) + row * dim : nullptr;
  float s = 0.f;
  for (int64_t c = c0; c < end; c += step) {
    const float v = inj(c);
    if (irow != nullptr) irow[c] = from_f32<T>(v);
    if constexpr (kNorm == Norm::kLayer) s += v;
    else if constexpr (kNorm == Norm::kRms) s += v * v;
  }
  if constexpr (kNorm == Norm::kNone) {
    return;
  } else {
    const float inv_dim = 1.f / float(dim);
    float shift = 0.f, var;
    if constexpr (kNorm == Norm::kLayer) {
      shift = row_sum(s, scratch) * inv_dim;  // the mean; pass 2: the two-pass variance
      float ss = 0.f;
      for (int64_t c = c0; c < end; c += step) {
        const float d = inj(c) - shift;
        ss += d * d;
      }
      var = row_sum(ss, scratch) * inv_dim;
    } else {
      var = row_sum(s, scratch) * inv_dim;
    }
    const T* w = static_cast<const T*>(p.weight);
    const T* b = static_cast<const T*>(p.bias);
    T* orow = static_cast<T*>(p.normed) + (active ? row * dim : 0);
    // Last pass: normalize, scale (and shift), store; value(x) is the normalized fp32 value.
    auto store = [&](auto value) {
      for (int64_t c = c0; c < end; c += step) {
        const float v = value(inj(c));
        float o;
        if constexpr (kNorm == Norm::kRms) {
          o = to_f32<T>(w[c]) * round_to<T>(v);
        } else {
          o = v * to_f32<T>(w[c]) + (b != nullptr ? to_f32<T>(b[c]) : 0.f);
        }
        orow[c] = from_f32<T>(o);
      }
    };
    if (!isfinite(var)) {
      // As the register path: statistics redone on x * 2^-e (exact scaling), 2^e > max |x|.
      float amax = 0.f;
      for (int64_t c = c0; c < end; c += step) amax = fmaxf(amax, fabsf(inj(c)));
      amax = row_max(amax, scratch);
      int e = 0;
      if (isfinite(amax) && amax > 0.f) frexpf(amax, &e);
      const float s1 = ldexpf(1.f, -(e / 2)), s2 = ldexpf(1.f, -(e - e / 2));
      float sm = 0.f;
      if constexpr (kNorm == Norm::kLayer) {
        for (int64_t c = c0; c < end; c += step) sm += inj(c) * s1 * s2;
        sm = row_sum(sm, scratch) * inv_dim;
      }
      float ssd = 0.f;
      for (int64_t c = c0; c < end; c += step) {
        const float d = inj(c) * s1 * s2 - sm;
        ssd += d * d;
      }
      const float rstd_s = rsqrtf(row_sum(ssd, scratch) * inv_dim + p.eps * s1 * s1 * s2 * s2);
      store([&](float v) { return (v * s1 * s2 - sm) * rstd_s; });
      return;
    }
    const float rstd = rsqrtf(var + p.eps);
    store([&](float v) { return (v - shift) * rstd; });
  }
}

template <typename T, typename E, Norm kNorm, int VEC, int MAXV>
__global__ void __launch_bounds__(InjectNormTile::kMaxThreadsPerRow)
inject_norm_kernel(const InjectNormParams p) {
  using PackT = Pack<T, VEC>;
  using PackE = Pack<E, VEC>;
  __shared__ float scratch[InjectNormTile::kMaxRowsPerBlock][InjectNormTile::kMaxWarpsPerRow];

  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < p.rows;  // inactive threads still join the barriers in row_sum
  if constexpr (VEC == 1) {  // the scalar fallback streams the row (no register-resident row)
    inject_norm_row_stream<T, E, kNorm>(p, row, active, scratch);
    return;
  }
  const int64_t nvec = p.dim / VEC;

  // 1. Load the row into registers (the only read of hidden).
  float x[MAXV][VEC];
  const T* hrow = static_cast<const T*>(p.hidden) + row * p.hidden_stride;
#pragma unroll
  for (int i = 0; i < MAXV; ++i) {
    const int64_t c = int64_t(i) * blockDim.x + threadIdx.x;
    if (active && c < nvec) {
      const PackT v = *reinterpret_cast<const PackT*>(hrow + c * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) x[i][j] = to_f32<T>(v.v[j]);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) x[i][j] = 0.f;
    }
  }

  // 2. Inject: fp32 add of the embedding rounded to T, rounded once to T.
  const int64_t r = (active && p.num_visual > 0) ? find_visual(p.index, p.num_visual, row) : -1;
  if (r >= 0) {
    const E* erow = static_cast<const E*>(p.embeds) + r * p.embeds_stride;
#pragma unroll
    for (int i = 0; i < MAXV; ++i) {
      const int64_t c = int64_t(i) * blockDim.x + threadIdx.x;
      if (c < nvec) {
        const PackE e = *reinterpret_cast<const PackE*>(erow + c * VEC);
#pragma unroll
        for (int j = 0; j < VEC; ++j) x[i][j] = round_to<T>(x[i][j] + round_to<T>(to_f32<E>(e.v[j])));
      }
    }
  }
  if (p.injected != nullptr && active) {
    T* orow = static_cast<T*>(p.injected) + row * p.dim;
#pragma unroll
    for (int i = 0; i < MAXV; ++i) {
      const int64_t c = int64_t(i) * blockDim.x + threadIdx.x;
      if (c < nvec) store_pack<T, VEC>(orow + c * VEC, x[i]);  // one 16-byte STG per pack
    }
  }
  if constexpr (kNorm == Norm::kNone) {
    return;
  } else {
    // 3. Statistics in fp32 (padding lanes hold 0 and add nothing; LayerNorm masks them below).
    const float inv_dim = 1.f / float(p.dim);
    float shift = 0.f;
    if constexpr (kNorm == Norm::kLayer) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < MAXV; ++i)
#pragma unroll
        for (int j = 0; j < VEC; ++j) s += x[i][j];
      shift = row_sum(s, scratch) * inv_dim;  // the mean
    }
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < MAXV; ++i) {
      const bool in_row = int64_t(i) * blockDim.x + threadIdx.x < nvec;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = in_row ? x[i][j] - shift : 0.f;
        ss += d * d;
      }
    }
    const float var = row_sum(ss, scratch) * inv_dim;  // the same value in all the row's threads

    // 4. Normalize, scale (and shift), store: value(x) is the normalized fp32 value.
    const T* w = static_cast<const T*>(p.weight);
    const T* b = static_cast<const T*>(p.bias);
    T* orow = static_cast<T*>(p.normed) + row * p.dim;
    auto store = [&](auto value) {
#pragma unroll
      for (int i = 0; i < MAXV; ++i) {
        const int64_t c = int64_t(i) * blockDim.x + threadIdx.x;
        if (c < nvec) {
          const PackT wv = *reinterpret_cast<const PackT*>(w + c * VEC);
          float o[VEC];  // fp32 results, rounded to T by store_pack (one 16-byte STG per pack)
          if constexpr (kNorm == Norm::kRms) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) o[j] = to_f32<T>(wv.v[j]) * round_to<T>(value(x[i][j]));
          } else {
            PackT bv;
            if (b != nullptr) bv = *reinterpret_cast<const PackT*>(b + c * VEC);
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
              const float bj = b != nullptr ? to_f32<T>(bv.v[j]) : 0.f;
              o[j] = value(x[i][j]) * to_f32<T>(wv.v[j]) + bj;
            }
          }
          store_pack<T, VEC>(orow + c * VEC, o);
        }
      }
    };
    if (!isfinite(var)) {
      // The fp32 statistic overflowed (|x| > ~1.8e19, or a non-finite x): redo the row's
      // statistics on x * 2^-e, where 2^e bounds max |x| (README "Non-finite values"). Scaling by
      // a power of two is exact, so the scaled statistics cannot overflow and are as accurate as
      // the plain fp32 path; eps scales with the variance (eps * 2^-2e, 0 once that underflows,
      // where it is negligible anyway). No fp64 registers: the common path keeps its register
      // budget. Rare and row-uniform; the row's own barriers (row_sync) make the divergence from
      // the other rows of the block safe. A non-finite x keeps max |x| infinite: no scaling, and
      // the row is NaN as the formula gives.
      float amax = 0.f;
#pragma unroll
      for (int i = 0; i < MAXV; ++i)
#pragma unroll
        for (int j = 0; j < VEC; ++j) amax = fmaxf(amax, fabsf(x[i][j]));
      amax = row_max(amax, scratch);
      int e = 0;
      if (isfinite(amax) && amax > 0.f) frexpf(amax, &e);   // amax < 2^e
      // 2^-e as two normal factors (2^-e alone is subnormal for e > 126)
      const float s1 = ldexpf(1.f, -(e / 2)), s2 = ldexpf(1.f, -(e - e / 2));
      float sm = 0.f;
      if constexpr (kNorm == Norm::kLayer) {
#pragma unroll
        for (int i = 0; i < MAXV; ++i)
#pragma unroll
          for (int j = 0; j < VEC; ++j) sm += x[i][j] * s1 * s2;
        sm = row_sum(sm, scratch) * inv_dim;
      }
      float ssd = 0.f;
#pragma unroll
      for (int i = 0; i < MAXV; ++i) {
        const bool in_row = int64_t(i) * blockDim.x + threadIdx.x < nvec;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = in_row ? x[i][j] * s1 * s2 - sm : 0.f;
          ssd += d * d;
        }
      }
      const float rstd_s = rsqrtf(row_sum(ssd, scratch) * inv_dim + p.eps * s1 * s1 * s2 * s2);
      if (!active) return;
      store([&](float v) { return (v * s1 * s2 - sm) * rstd_s; });
      return;
    }
    const float rstd = rsqrtf(var + p.eps);
    if (!active) return;
    store([&](float v) { return (v - shift) * rstd; });
  }
}

}  // namespace hires::deepstack
