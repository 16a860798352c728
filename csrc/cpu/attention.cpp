// CPU twin of the flash attention forward (kernels/attention/flash_fwd.cuh); see attention.h.
//
// Work item = (batch b, query head h, Q block mb), as one CUDA thread block, with the kernel's
// tile of this launch (flash_fwd_tile, flash_params.h: kBlockM = 64 for split-KV and
// seqlen_q <= 64, else 128; kBlockN per head dim), so the tests prove the same block ranges,
// block skipping and tail tiles. Varlen items follow the real sequence lengths (cu_seqlens),
// never max_seqlen_q: a bound of 2^40 costs nothing.
// Per item:
//   1. load the Q tile (kBlockM x D) as fp32;
//   2. K blocks [lo(row0) / kBlockN, hi(last row)] from flash_key_range (block skipping: causal,
//      sliding window; K blocks no row of the tile can see are never loaded);
//   3. for each K/V block of kBlockN keys: S = Q K^T, scaled (softcap: softcap * tanh(S * scale /
//      softcap)); keys outside a row's [lo, hi] are -inf; in log2 units (log2 e folded in) take the
//      running max m, rescale l and acc by exp2(m_old - m_new), P = exp2(S - m_new) (m_new == -inf
//      -> use 0 so rows with no finite score yet stay 0 instead of NaN), l += rowsum(P),
//      acc += round_T(P) V over the visible keys only (a NaN in a masked v row is never read);
//   4. o = acc / l and lse = (m + log2 l) ln 2. l == 0: a row that sees no key gets o = 0 and
//      lse = -inf; a row that sees keys whose scores are all -inf gets o = NaN (0/0, what the
//      formula gives) and lse = -inf. NaN scores make l NaN: o and lse NaN.
// KV cache (p.seqused_k, dense): batch b uses Sk = seqused_k[b] keys of its cache.
// Split-KV (p.num_splits > 1, dense): item = (b, h, mb, split) walks only its range of K blocks,
// stores acc / l and lse2 = m + log2(l) in fp32 workspaces; `combine` merges the splits.
#include "csrc/cpu/attention.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace hires::attention {
namespace {

template <typename T> inline float round_to(float v) { return static_cast<float>(static_cast<T>(v)); }

constexpr float kLn2 = 0.6931471805599453f;

// Final 1/l and natural-log lse of a row from its fp32 statistics (log2 units), the rule of
// step 4 above. `has_keys`: the row's visible key range is not empty.
struct RowFinish {
  float inv, lse;
};
inline RowFinish finish_row(float m, float l, bool has_keys) {
  const float kNaN = std::numeric_limits<float>::quiet_NaN();
  const float kNegInf = -std::numeric_limits<float>::infinity();
  if (l > 0.f) return {1.f / l, (m + std::log2(l)) * kLn2};
  if (l == 0.f) return {has_keys ? kNaN : 0.f, kNegInf};
  return {kNaN, kNaN};  // l is NaN
}

inline float* lse_ptr(const FlashParams& p, int64_t b, int64_t h, int64_t r) {
  return p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + r * p.lse_row_stride;
}

// Split-KV combine (twin of flash_combine_kernel): per (row, head), weights 2^(lse_s - max).
template <typename T>
void combine(const FlashParams& p) {
  const int64_t rows = p.batch * p.seqlen_q, H = p.heads_q, D = p.head_dim, S = p.num_splits;
  const float kNegInf = -std::numeric_limits<float>::infinity();
  T* O = static_cast<T*>(p.o);
  at::parallel_for(0, rows * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> w(S);
    for (int64_t rh = begin; rh < end; ++rh) {
      const int64_t rt = rh / H, h = rh % H, b = rt / p.seqlen_q, row = rt % p.seqlen_q;
      float mx = kNegInf;
      for (int64_t s = 0; s < S; ++s) mx = std::max(mx, p.lse_accum[s * rows * H + rh]);
      float wsum = 0.f;
      for (int64_t s = 0; s < S; ++s) {
        w[s] = mx == kNegInf ? 0.f : std::exp2(p.lse_accum[s * rows * H + rh] - mx);
        wsum += w[s];
      }
      const FlashKeyRange kr = flash_key_range(p, row, p.seqlen_q, p.seqlen_k);
      // the merged statistics: max mx, sum wsum (a NaN split makes wsum NaN)
      const RowFinish f = finish_row(mx == kNegInf ? 0.f : mx, wsum, kr.lo <= kr.hi);
      if (p.lse != nullptr) *lse_ptr(p, b, h, row) = f.lse;
      T* orow = O + b * p.o_batch_stride + row * p.o_row_stride + h * p.o_head_stride;
      for (int64_t d = 0; d < D; ++d) {
        float v = 0.f;
        for (int64_t s = 0; s < S; ++s) v += w[s] * p.o_accum[(s * rows * H + rh) * D + d];
        orow[d] = static_cast<T>(wsum > 0.f ? v * f.inv : f.inv);
      }
    }
  });
}

template <typename T>
void run(const FlashParams& p) {
  const FlashFwdTileChoice tile = flash_fwd_tile(p);  // the CUDA launcher's choice
  const int64_t BM = tile.block_m;
  const int64_t BN = tile.block_n;
  constexpr float kLog2e = 1.4426950408889634f;
  const float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t D = p.head_dim;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t splits = p.num_splits > 1 && !varlen ? p.num_splits : 1;
  // Q blocks: dense, m_blocks per (b, h); varlen, the real blocks of each sequence (prefix sums
  // blk_start, so the work follows cu_seqlens and not max_seqlen_q).
  const int64_t m_blocks = (p.seqlen_q + BM - 1) / BM;
  std::vector<int64_t> blk_start;
  int64_t items = p.batch * p.heads_q * m_blocks * splits;
  if (varlen) {
    blk_start.assign(p.batch + 1, 0);
    for (int64_t b = 0; b < p.batch; ++b) {
      const int64_t len = int64_t(p.cu_seqlens_q[b + 1]) - p.cu_seqlens_q[b];
      blk_start[b + 1] = blk_start[b] + (len + BM - 1) / BM;
    }
    items = blk_start[p.batch] * p.heads_q;
  }
  const int64_t group = p.heads_q / p.heads_kv;
  const bool capped = p.softcap != 0.f;
  // log2-domain score (as the kernel): x * scale_log2, or tanh(x * cap_in) * scale_log2 with
  // scale_log2 = softcap * log2 e under softcap
  const float cap_in = capped ? p.scale / p.softcap : 0.f;
  const float scale_log2 = capped ? p.softcap * kLog2e : p.scale * kLog2e;
  const T* Q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  T* O = static_cast<T*>(p.o);

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(BM * D), kt(D * BN), v(BN * D), s(BM * BN), acc(BM * D), m(BM), l(BM);
    std::vector<int64_t> lo(BM), hi(BM);
    for (int64_t item = begin; item < end; ++item) {
      int64_t split = 0, mb, h, b;
      if (varlen) {
        const int64_t gb = item / p.heads_q;  // global Q block
        h = item % p.heads_q;
        b = int64_t(std::upper_bound(blk_start.begin(), blk_start.end(), gb) - blk_start.begin()) - 1;
        mb = gb - blk_start[b];
      } else {
        split = item % splits;
        mb = (item / splits) % m_blocks;
        h = (item / (splits * m_blocks)) % p.heads_q;
        b = item / (splits * m_blocks * p.heads_q);
      }
      const int64_t hk = h / group;
      // sequence geometry (varlen: from cu_seqlens, as the kernel reads them on device)
      int64_t Sq = p.seqlen_q, Sk = p.seqlen_k, q0 = 0;
      const T* qb = Q + h * p.q_head_stride;
      const T* kb = K + hk * p.k_head_stride;
      const T* vb = V + hk * p.v_head_stride;
      T* ob = O + h * p.o_head_stride;
      if (varlen) {
        const int64_t k0 = p.cu_seqlens_k[b];
        q0 = p.cu_seqlens_q[b];
        Sq = p.cu_seqlens_q[b + 1] - q0;
        Sk = p.cu_seqlens_k[b + 1] - k0;
        qb += q0 * p.q_row_stride;
        kb += k0 * p.k_row_stride;
        vb += k0 * p.v_row_stride;
        ob += q0 * p.o_row_stride;
      } else {
        qb += b * p.q_batch_stride;
        kb += b * p.k_batch_stride;
        vb += b * p.v_batch_stride;
        ob += b * p.o_batch_stride;
      }
      if (p.seqused_k != nullptr) Sk = p.seqused_k[b];  // KV cache: this batch's valid keys
      const int64_t row0 = mb * BM;
      if (row0 >= Sq) continue;
      const int64_t rows = std::min(BM, Sq - row0);
      for (int64_t i = 0; i < rows; ++i) {
        const FlashKeyRange kr = flash_key_range(p, row0 + i, Sq, Sk);
        lo[i] = kr.lo;
        hi[i] = kr.hi;
      }
      // 2. block skipping: lo and hi are nondecreasing in the row
      const int64_t n_lo = lo[0], n_hi = hi[rows - 1];  // inclusive key range of the tile

      // 1. Q tile
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t d = 0; d < D; ++d) q[i * D + d] = static_cast<float>(qb[(row0 + i) * p.q_row_stride + d]);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);

      // this split's K blocks (all visible ones without split-KV)
      int64_t nb_begin = n_lo / BN, nb_end = n_hi >= n_lo ? n_hi / BN + 1 : nb_begin;
      if (splits > 1) {  // this split's piece of the tile's visible blocks (the kernel's rule)
        const FlashSplitRange<int64_t> sr = flash_split_range<int64_t>(nb_begin, nb_end, split, splits);
        nb_begin = sr.begin;
        nb_end = sr.end;
      }
      for (int64_t n0 = nb_begin * BN; n0 < nb_end * BN; n0 += BN) {
        const int64_t cols = std::min(BN, Sk - n0);
        // 3a. K (transposed, so the S loop runs over contiguous keys) and V tiles
        for (int64_t j = 0; j < cols; ++j) {
          const T* kr = kb + (n0 + j) * p.k_row_stride;
          const T* vr = vb + (n0 + j) * p.v_row_stride;
          for (int64_t d = 0; d < D; ++d) {
            kt[d * BN + j] = static_cast<float>(kr[d]);
            v[j * D + d] = static_cast<float>(vr[d]);
          }
        }
        // 3b. S = Q K^T, (softcapped), masked, in log2 units
        for (int64_t i = 0; i < rows; ++i) {
          float* si = s.data() + i * BN;
          std::fill(si, si + cols, 0.f);
          for (int64_t d = 0; d < D; ++d) {
            const float qd = q[i * D + d];
            const float* kd = kt.data() + d * BN;
            for (int64_t j = 0; j < cols; ++j) si[j] += qd * kd[j];
          }
          // visible keys of this row inside the block: [j_lo, j_hi) (empty when j_lo >= j_hi)
          const int64_t j_lo = std::min(cols, std::max<int64_t>(0, lo[i] - n0));
          const int64_t j_hi = std::max(j_lo, std::min(cols, hi[i] - n0 + 1));
          for (int64_t j = 0; j < cols; ++j) {
            if (j < j_lo || j >= j_hi) {
              si[j] = kNegInf;
            } else {
              si[j] = (capped ? std::tanh(si[j] * cap_in) : si[j]) * scale_log2;
            }
          }
          // 3c. online softmax
          float mx = m[i];
          for (int64_t j = 0; j < cols; ++j) mx = std::max(mx, si[j]);
          const float m_use = mx == kNegInf ? 0.f : mx;
          const float alpha = std::exp2(m[i] - m_use);  // m[i] == -inf -> 0
          m[i] = mx;
          float rs = 0.f;
          for (int64_t j = 0; j < cols; ++j) {
            const float pj = std::exp2(si[j] - m_use);  // -inf -> 0
            rs += pj;
            si[j] = round_to<T>(pj);  // the MMA consumes P in the input dtype
          }
          l[i] = l[i] * alpha + rs;
          float* ai = acc.data() + i * D;
          for (int64_t d = 0; d < D; ++d) ai[d] *= alpha;
          // 3d. acc += P V over the visible keys (0 * NaN of a masked v row is never formed)
          for (int64_t j = j_lo; j < j_hi; ++j) {
            const float pj = si[j];
            const float* vj = v.data() + j * D;
            for (int64_t d = 0; d < D; ++d) ai[d] += pj * vj[d];
          }
        }
      }
      // 4. normalize and store (split-KV: the partial output and its log2-sum-exp, fp32)
      if (splits > 1) {
        const int64_t rbase = split * p.batch * p.seqlen_q + b * p.seqlen_q + row0;
        for (int64_t i = 0; i < rows; ++i) {
          const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
          const int64_t r = (rbase + i) * p.heads_q + h;
          p.lse_accum[r] = l[i] > 0.f ? m[i] + std::log2(l[i])
                           : l[i] == 0.f ? kNegInf : std::numeric_limits<float>::quiet_NaN();
          for (int64_t d = 0; d < D; ++d) p.o_accum[r * D + d] = acc[i * D + d] * inv;
        }
        continue;
      }
      for (int64_t i = 0; i < rows; ++i) {
        const RowFinish f = finish_row(m[i], l[i], lo[i] <= hi[i]);
        if (p.lse != nullptr) *lse_ptr(p, b, h, q0 + row0 + i) = f.lse;
        T* orow = ob + (row0 + i) * p.o_row_stride;
        for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<T>(l[i] > 0.f ? acc[i * D + d] * f.inv : f.inv);
      }
    }
  });
  if (splits > 1) combine<T>(p);
}

}  // namespace

void flash_fwd_cpu(const FlashParams& p, at::ScalarType t) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "flash_fwd_cpu", [&] { run<scalar_t>(p); });
}

}  // namespace hires::attention
