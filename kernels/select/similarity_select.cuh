// SliME's text-guided token selection (TextGuidedRouterCosine + TextGuidedSampler,
// specs/slime.md 3.3-3.4) without the N x T cosine matrix and without a host sync.
//
// Formula, per batch row b:
//   w[t]      = mask[b,t] / max(|text[b,t]|, eps)                      (eps = 1e-8, fp32)
//   dir       = sum_t w[t] * text[b,t]                                 (fp32, t in order)
//   scores[i] = (local[b,i] . dir) / max(|local[b,i]|, eps)            (= sum_t cos(l_i, x_t);
//               0 when every text token of row b is masked; fp64 when fp32 overflows)
//   top-k : the k best scores (key rule of similarity_select.h: ties to the lower index),
//           written in ascending index order
//   top-p : s = softmax(scores / t0) (optional), q = softmax(s / t1), both in fp64 from the fp32
//           scores (TopPProbs; a NaN score has q = 0); rank by score (same key rule: NaN last);
//           prefix sums of q in fp64 rounded to fp32; c = #{j : cum_j <= float(p)};
//           K = min(c + 1, N); the K first sorted indices, ascending, then -1; lengths[b] = K
// Shapes: local (B,N,D) TL and text (B,T,D) TT with unit column stride and int64 row strides;
//   mask (B,T) bool contiguous or null; scores (B,N) fp32; indices (B,out_cols) int64.
// Kernels (three launches on one stream, CUDA-graph capturable):
//   1. text_weight_kernel: one warp per text row (B*T rows): w; block 0 also zeroes the counters.
//   2. text_dir_kernel: 32 packs of columns x 8 warps per block; warp w sums the rows t = w (mod 8),
//      then the 8 partials are added in warp order (deterministic; no atomics). The CPU twin sums
//      in the same order.
//   3. score_select_kernel: grid (ceil(N / kScoreWarps), B); one warp per local token (16-byte
//      loads, dir in shared memory), a matrix-vector product. The last block of a row to finish
//      (threadfence + atomic counter, the "last block" pattern) reads the row's N scores back
//      from L2 and runs the selection in shared memory: a bitonic sort of P = pow2 >= max(N, 64)
//      64-bit score keys (strides >= 32 in shared memory, strides < 32 with warp shuffles), the
//      fp64 softmax sums (top-p), fp64 block scan, ascending compaction of the kept flags.
// Limits: N <= SelectTile::kMaxSortKeys (8192: the keys live in shared memory), D <= 32768 (dir
//   in shared memory), B <= 65535 (gridDim.y). VEC > 1 needs D % VEC == 0, strides % VEC == 0
//   and 16-byte aligned bases (the launcher checks and falls back to VEC = 1).
#pragma once
#include "kernels/common/numeric.cuh"
#include "kernels/select/similarity_select.h"

namespace hires::select {

struct SelectTile {
  static constexpr int kWarp = 32;
  static constexpr int kNormWarps = 8;                        // kernel 1: text rows per block
  static constexpr int kNormThreads = kNormWarps * kWarp;
  static constexpr int kDirWarps = 8;                         // kernel 2: text-row groups per block
  static constexpr int kScoreWarps = 16;                      // kernel 3: local tokens per block
  static constexpr int kScoreThreads = kScoreWarps * kWarp;   // also the selection block size
  static constexpr int kGatherWarps = 8;                      // gather: output rows per block
  static constexpr int kMaxSortKeys = 8192;                   // P * 8 B = 64 KiB of shared memory
  static_assert(kScoreThreads <= 1024, "one block");
  static_assert(kScoreThreads / kWarp <= kWarp, "block reductions keep one value per warp in one warp");
};

// Shared-memory layout of kernel 3 (bytes): region 0 holds dir (D floats) during the scores and
// the P sort keys during the selection (the same bytes, one after the other); region 1 holds the
// N int flags of the kept tokens.
// Sort size: the power of two >= n, at least 64 (whole warps in the register stages of the sort;
// positions >= n hold the padding key 0, which sorts last).
__host__ __device__ inline int64_t select_pow2(int64_t n) {
  int64_t p = 64;
  while (p < n) p <<= 1;
  return p;
}
__host__ __device__ inline int64_t select_region0_bytes(int64_t dim, int64_t n) {
  const int64_t a = dim * 4, b = select_pow2(n) * 8;
  return ((a > b ? a : b) + 15) / 16 * 16;
}
__host__ __device__ inline int64_t select_smem_bytes(int64_t dim, int64_t n) {
  return select_region0_bytes(dim, n) + select_pow2(n) * 4;
}

// ---- block-wide helpers (every thread of the block must call them) --------------------------
struct SelectScratch {
  float f[SelectTile::kWarp];
  int i[SelectTile::kWarp];
  double d[SelectTile::kWarp];
  int is_last;
};

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ double block_sum_f64(double v, SelectScratch& s) {
  const int lane = threadIdx.x % SelectTile::kWarp, warp = threadIdx.x / SelectTile::kWarp;
  v = warp_sum(v);
  if (lane == 0) s.d[warp] = v;
  __syncthreads();
  double r = 0.0;
  for (int w = 0; w < int(blockDim.x) / SelectTile::kWarp; ++w) r += s.d[w];  // same order everywhere
  __syncthreads();  // s.d is reused by the next call
  return r;
}

__device__ __forceinline__ int block_sum_int(int v, SelectScratch& s) {
  const int lane = threadIdx.x % SelectTile::kWarp, warp = threadIdx.x / SelectTile::kWarp;
  v = warp_sum_int(v);
  if (lane == 0) s.i[warp] = v;
  __syncthreads();
  int r = 0;
  for (int w = 0; w < int(blockDim.x) / SelectTile::kWarp; ++w) r += s.i[w];
  __syncthreads();
  return r;
}

// Exclusive prefix over the threads in threadIdx order (int or double).
template <typename V>
__device__ __forceinline__ V block_exclusive_scan(V v, V* scratch) {
  const int lane = threadIdx.x % SelectTile::kWarp, warp = threadIdx.x / SelectTile::kWarp;
  V incl = v;
#pragma unroll
  for (int o = 1; o < SelectTile::kWarp; o <<= 1) {
    const V y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  V excl = __shfl_up_sync(0xffffffffu, incl, 1);  // exact: no subtraction
  if (lane == 0) excl = V(0);
  if (lane == SelectTile::kWarp - 1) scratch[warp] = incl;
  __syncthreads();
  V off = V(0);
  for (int w = 0; w < warp; ++w) off += scratch[w];
  __syncthreads();
  return off + excl;
}

// Sort P (a power of two, >= 64) keys descending in place: a bitonic network. Stages with a
// stride >= 32 compare pairs in shared memory (one barrier each); the stages with strides 16..1 of
// each size run in registers, the partner being lane ^ stride of the same warp (positions
// i = threadIdx.x + m * blockDim.x: 32 consecutive positions per warp, so a warp is either wholly
// inside [0, P) or wholly outside), one barrier per size.
__device__ __forceinline__ void bitonic_sort_desc(uint64_t* keys, int P) {
  for (int size = 2; size <= P; size <<= 1) {
    int stride = size >> 1;
    for (; stride >= SelectTile::kWarp; stride >>= 1) {
      for (int t = threadIdx.x; t < P / 2; t += blockDim.x) {
        const int i = 2 * t - (t & (stride - 1));  // lower element of pair t
        const int j = i + stride;
        const bool desc = (i & size) == 0;          // the last size (size == P) is all descending
        const uint64_t a = keys[i], c = keys[j];
        if ((a < c) == desc) {
          keys[i] = c;
          keys[j] = a;
        }
      }
      __syncthreads();
    }
    for (int i = threadIdx.x; i < P; i += blockDim.x) {  // warp-uniform trip count (see above)
      uint64_t v = keys[i];
      const bool desc = (i & size) == 0;
      for (int st = stride; st > 0; st >>= 1) {
        const uint64_t other = __shfl_xor_sync(0xffffffffu, v, st);
        const bool lower = (i & st) == 0;
        v = (lower == desc) ? (v > other ? v : other) : (v < other ? v : other);
      }
      keys[i] = v;
    }
    __syncthreads();
  }
}

// The selection of row b by one whole block (see the formula at the top).
__device__ void select_row(const SimilaritySelectParams& p, int64_t b, unsigned char* smem,
                           SelectScratch& s) {
  const int N = int(p.n);
  const int P = int(select_pow2(p.n));
  uint64_t* keys = reinterpret_cast<uint64_t*>(smem);
  const float* scores = p.scores + b * p.n;

  // Rank by score for both modes (softmax is monotone; NaN last: the key rule).
  // __ldcg: the other blocks' scores are in L2 (after their fence), not in this SM's L1
  for (int i = threadIdx.x; i < P; i += blockDim.x) keys[i] = i < N ? rank_key(__ldcg(scores + i), i) : 0ull;
  __syncthreads();
  bitonic_sort_desc(keys, P);

  const int chunk = (N + int(blockDim.x) - 1) / int(blockDim.x);  // contiguous positions per thread
  const int lo = min(N, int(threadIdx.x) * chunk), hi = min(N, lo + chunk);
  int64_t keep = p.k;
  if (p.mode == SelectMode::kTopP) {
    // probabilities in fp64 from the sorted scores (TopPProbs in similarity_select.h)
    TopPProbs q;
    q.presoftmax = p.presoftmax;
    q.t0 = p.presoftmax_temperature;
    q.t1 = p.temperature;
    const float m = key_value(keys[0]);  // the largest score; NaN only when every score is NaN
    q.none = m != m;                     // uniform over the block
    if (!q.none) {
      if (q.presoftmax) {
        q.m0 = double(m) / q.t0;
        double part = 0.0;
        for (int j = lo; j < hi; ++j) {
          const float v = key_value(keys[j]);
          if (v == v) part += topp_exp0(q, v);
        }
        q.s0 = block_sum_f64(part, s);
        q.a_max1 = (1.0 / q.s0) / q.t1;
      } else {
        q.a_max1 = double(m) / q.t1;
      }
      double part = 0.0;
      for (int j = lo; j < hi; ++j) {
        const float v = key_value(keys[j]);
        if (v == v) part += topp_exp1(q, v);
      }
      q.s1 = block_sum_f64(part, s);
    }
    // cumulative sums over the ranked probabilities: fp64, each rounded to fp32 before the test
    const float pf = float(p.p);
    double part = 0.0;
    for (int j = lo; j < hi; ++j) part += topp_prob(q, key_value(keys[j]));
    double run = block_exclusive_scan<double>(part, s.d);
    int cnt = 0;
    for (int j = lo; j < hi; ++j) {
      run += topp_prob(q, key_value(keys[j]));
      cnt += float(run) <= pf ? 1 : 0;
    }
    const int c = block_sum_int(cnt, s);
    keep = int64_t(c) + 1 < p.n ? int64_t(c) + 1 : p.n;
    if (threadIdx.x == 0) p.lengths[b] = keep;
  }

  // kept flags in index order, then an ascending compaction (no second sort)
  int* flag = reinterpret_cast<int*>(smem + select_region0_bytes(p.dim, p.n));
  for (int i = threadIdx.x; i < N; i += blockDim.x) flag[i] = 0;
  __syncthreads();
  for (int j = threadIdx.x; j < keep; j += blockDim.x) flag[key_index(keys[j])] = 1;
  __syncthreads();
  int cnt = 0;
  for (int i = lo; i < hi; ++i) cnt += flag[i];
  int pos = block_exclusive_scan<int>(cnt, s.i);
  int64_t* out = p.indices + b * p.out_cols;
  for (int i = lo; i < hi; ++i)
    if (flag[i]) out[pos++] = i;
  for (int64_t j = keep + threadIdx.x; j < p.out_cols; j += blockDim.x) out[j] = -1;
}

// ---- kernel 1: text weights ----------------------------------------------------------------
template <typename TT, int VEC>
__global__ void __launch_bounds__(SelectTile::kNormThreads)
text_weight_kernel(const SimilaritySelectParams p) {
  using PackT = Pack<TT, VEC>;
  const int lane = threadIdx.x % SelectTile::kWarp, warp = threadIdx.x / SelectTile::kWarp;
  if (blockIdx.x == 0) {
    // counters of kernel 3; this kernel runs before it on the same stream
    for (int64_t i = threadIdx.x; i < p.batch; i += blockDim.x) p.counters[i] = 0u;
  }
  const int64_t row = int64_t(blockIdx.x) * SelectTile::kNormWarps + warp;  // b * T + t
  if (row >= p.batch * p.t) return;
  const int64_t b = row / p.t, t = row % p.t;
  float w = 0.f;
  if (p.mask == nullptr || p.mask[row]) {  // masked rows are not read
    const TT* x = static_cast<const TT*>(p.text) + b * p.text_stride_b + t * p.text_stride_t;
    const int64_t nvec = p.dim / VEC;
    float ss = 0.f;
#pragma unroll 4
    for (int64_t c = lane; c < nvec; c += SelectTile::kWarp) {
      const PackT v = *reinterpret_cast<const PackT*>(x + c * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float f = to_f32<TT>(v.v[j]);
        ss = fmaf(f, f, ss);
      }
    }
    ss = warp_sum(ss);  // the same value in every lane: uniform branch
    if (isfinite(ss)) {
      w = 1.f / fmaxf(sqrtf(ss), kCosEps);
    } else {
      // |x|^2 overflowed fp32 (|x| > ~1.8e19) or x holds inf/NaN: the norm in fp64 (rare path).
      // A non-finite x gives w = NaN (x/|x| is NaN), never 0: it must not vanish like a mask.
      double ssd = 0.0;
      for (int64_t c = lane; c < p.dim; c += SelectTile::kWarp) {
        const double f = double(to_f32<TT>(x[c]));
        ssd += f * f;
      }
      w = text_weight_f64(warp_sum(ssd));
    }
  }
  if (lane == 0) p.text_weight[row] = w;
}

// ---- kernel 2: text direction --------------------------------------------------------------
// Block: kDirWarps warps over one batch row and 32 packs of columns; lane -> one pack, warp w ->
// text rows t = w, w + kDirWarps, ... (loads of several rows in flight per thread); the warps'
// partial sums are added in warp order through shared memory (deterministic, no atomics).
template <typename TT, int VEC>
__global__ void __launch_bounds__(SelectTile::kDirWarps * SelectTile::kWarp)
text_dir_kernel(const SimilaritySelectParams p) {
  using PackT = Pack<TT, VEC>;
  constexpr int kCols = SelectTile::kWarp * VEC;  // columns per block
  __shared__ float part[SelectTile::kDirWarps][kCols];
  const int lane = threadIdx.x % SelectTile::kWarp, warp = threadIdx.x / SelectTile::kWarp;
  const int64_t b = blockIdx.y;
  const int64_t c = int64_t(blockIdx.x) * SelectTile::kWarp + lane;  // pack index in the row
  float acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
  if (c < p.dim / VEC) {
    const TT* x = static_cast<const TT*>(p.text) + b * p.text_stride_b + c * VEC;
    const float* w = p.text_weight + b * p.t;
#pragma unroll 4
    for (int64_t t = warp; t < p.t; t += SelectTile::kDirWarps) {
      const float wt = w[t];
      const PackT v = *reinterpret_cast<const PackT*>(x + t * p.text_stride_t);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        // masked rows (wt == 0) add nothing, even if they hold inf/nan; a select, not a branch
        const float f = wt != 0.f ? to_f32<TT>(v.v[j]) : 0.f;
        acc[j] = fmaf(wt, f, acc[j]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) part[warp][j * SelectTile::kWarp + lane] = acc[j];  // conflict-free
  __syncthreads();
  for (int e = threadIdx.x; e < kCols; e += blockDim.x) {
    const int64_t col = int64_t(blockIdx.x) * kCols + e;
    if (col >= p.dim) break;
    float sum = 0.f;
    const int slot = (e % VEC) * SelectTile::kWarp + e / VEC;  // column e = lane * VEC + j
#pragma unroll
    for (int w = 0; w < SelectTile::kDirWarps; ++w) sum += part[w][slot];
    p.text_dir[b * p.dim + col] = sum;
  }
}

// ---- kernel 3: scores + selection ----------------------------------------------------------
template <typename TL, int VEC>
__global__ void __launch_bounds__(SelectTile::kScoreThreads, 2)  // 2 blocks: 64 registers (without the minimum ptxas aimed at 40 and spilled)
score_select_kernel(const SimilaritySelectParams p) {
  using PackL = Pack<TL, VEC>;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ SelectScratch scratch;
  float* dir = reinterpret_cast<float*>(smem);
  const int lane = threadIdx.x % SelectTile::kWarp, warp = threadIdx.x / SelectTile::kWarp;
  const int64_t b = blockIdx.y;

  // 1. the text direction of row b -> shared memory, and whether row b has an unmasked text
  //    token at all (none: every score is the empty sum 0, whatever l holds, NaN included)
  int any_text = p.mask == nullptr ? 1 : 0;
  if (p.mask != nullptr)
    for (int64_t t = threadIdx.x; t < p.t; t += blockDim.x) any_text |= p.mask[b * p.t + t] ? 1 : 0;
  for (int64_t d = threadIdx.x; d < p.dim; d += blockDim.x) dir[d] = p.text_dir[b * p.dim + d];
  any_text = __syncthreads_or(any_text);  // the barrier that publishes dir

  // 2. one warp per local token: l . dir and |l|^2 in fp32
  const int64_t i = int64_t(blockIdx.x) * SelectTile::kScoreWarps + warp;
  if (i < p.n && !any_text) {
    if (lane == 0) p.scores[b * p.n + i] = 0.f;
  } else if (i < p.n) {
    const TL* l = static_cast<const TL*>(p.local) + b * p.local_stride_b + i * p.local_stride_n;
    const int64_t nvec = p.dim / VEC;
    float dot = 0.f, ll = 0.f;
#pragma unroll 4
    for (int64_t c = lane; c < nvec; c += SelectTile::kWarp) {
      const PackL v = *reinterpret_cast<const PackL*>(l + c * VEC);
      const float* dv = dir + c * VEC;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float f = to_f32<TL>(v.v[j]);
        dot = fmaf(f, dv[j], dot);
        ll = fmaf(f, f, ll);
      }
    }
    dot = warp_sum(dot);
    ll = warp_sum(ll);  // the same value in every lane: uniform branch
    if (!isfinite(ll) || !isfinite(dot)) {
      // fp32 overflow of |l|^2 or of l . dir (huge l), or a non-finite l or dir: redo in fp64
      // (rare path; a non-finite input gives NaN, never a finite wrong score)
      double dd = 0.0, lld = 0.0;
      for (int64_t c = lane; c < p.dim; c += SelectTile::kWarp) {
        const double f = double(to_f32<TL>(l[c]));
        dd += f * double(dir[c]);
        lld += f * f;
      }
      dot = float(local_score_f64(warp_sum(dd), warp_sum(lld)));
      ll = 1.f;
    }
    if (lane == 0) p.scores[b * p.n + i] = dot / fmaxf(sqrtf(ll), kCosEps);
  }

  // 3. count this block done; the last block of row b runs the selection
  __threadfence();  // release: this block's scores are visible device-wide before it is counted
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int prev = atomicAdd(p.counters + b, 1u);
    scratch.is_last = prev == gridDim.x - 1;
  }
  __syncthreads();
  if (!scratch.is_last) return;  // uniform over the block
  __threadfence();  // acquire: order the reads of the other blocks' scores after the counter
  if (threadIdx.x == 0) p.counters[b] = 0u;
  select_row(p, b, smem, scratch);
}

// ---- gather_tokens: one warp per output row -------------------------------------------------
template <typename T, int VEC>
__global__ void __launch_bounds__(SelectTile::kGatherWarps * SelectTile::kWarp)
gather_tokens_kernel(const GatherParams p) {
  using PackT = Pack<T, VEC>;
  const int lane = threadIdx.x % SelectTile::kWarp, warp = threadIdx.x / SelectTile::kWarp;
  const int64_t row = int64_t(blockIdx.x) * SelectTile::kGatherWarps + warp;  // b * k + j
  if (row >= p.batch * p.k) return;
  const int64_t b = row / p.k;
  const int64_t src = p.indices[row];
  const int64_t nvec = p.dim / VEC;
  PackT* o = reinterpret_cast<PackT*>(static_cast<T*>(p.out) + row * p.dim);
  if (src < 0 || src >= p.n) {  // padding (-1): a zero row
    PackT z;
#pragma unroll
    for (int j = 0; j < VEC; ++j) z.v[j] = from_f32<T>(0.f);
    for (int64_t c = lane; c < nvec; c += SelectTile::kWarp) o[c] = z;
    return;
  }
  const PackT* x = reinterpret_cast<const PackT*>(static_cast<const T*>(p.tokens) + b * p.tokens_stride_b +
                                                  src * p.tokens_stride_n);
  for (int64_t c = lane; c < nvec; c += SelectTile::kWarp) o[c] = x[c];
}

}  // namespace hires::select
