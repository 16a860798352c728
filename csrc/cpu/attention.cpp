// CPU twin of the flash attention forward (kernels/attention/flash_fwd.cuh); see attention.h.
//
// Work item = (batch b, query head h, Q block mb), as one CUDA thread block. Per item:
//   1. load the Q tile (kBlockM x D) as fp32;
//   2. n_end = Sk, or for causal min(Sk, row0 + kBlockM + Sk - Sq) (block skipping: K blocks
//      past the last key any row of the tile can see are never loaded);
//   3. for each K/V block of kBlockN keys: S = Q K^T; mask keys >= Sk and (causal) keys
//      j > i + Sk - Sq with -inf; in log2 units (scale * log2 e folded in) take the running max m,
//      rescale l and acc by exp2(m_old - m_new), P = exp2(S - m_new) (m_new == -inf -> use 0 so
//      fully masked rows stay 0 instead of NaN), l += rowsum(P), acc += round_T(P) V;
//   4. o = acc / l, or 0 where l == 0 (a row that sees no key).
// KV cache (p.seqused_k, dense): batch b uses Sk = seqused_k[b] keys of its cache.
// Split-KV (p.num_splits > 1, dense): item = (b, h, mb, split) walks only its range of K blocks,
// stores acc / l and lse = m + log2(l) in fp32 workspaces; `combine` merges the splits.
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
      const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
      T* orow = O + b * p.o_batch_stride + row * p.o_row_stride + h * p.o_head_stride;
      for (int64_t d = 0; d < D; ++d) {
        float v = 0.f;
        for (int64_t s = 0; s < S; ++s) v += w[s] * p.o_accum[(s * rows * H + rh) * D + d];
        orow[d] = static_cast<T>(v * inv);
      }
    }
  });
}

template <typename T>
void run(const FlashParams& p) {
  constexpr int64_t BM = FlashTileShape::kBlockM;
  constexpr int64_t BN = FlashTileShape::kBlockN;
  constexpr float kLog2e = 1.4426950408889634f;
  const float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t D = p.head_dim;
  const int64_t m_blocks = (p.seqlen_q + BM - 1) / BM;
  const int64_t splits = p.num_splits > 1 ? p.num_splits : 1;
  const int64_t items = p.batch * p.heads_q * m_blocks * splits;
  const int64_t group = p.heads_q / p.heads_kv;
  const float scale_log2 = p.scale * kLog2e;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const T* Q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  T* O = static_cast<T*>(p.o);

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(BM * D), kt(D * BN), v(BN * D), s(BM * BN), acc(BM * D), m(BM), l(BM);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t split = item % splits;
      const int64_t mb = (item / splits) % m_blocks;
      const int64_t h = (item / (splits * m_blocks)) % p.heads_q;
      const int64_t b = item / (splits * m_blocks * p.heads_q);
      const int64_t hk = h / group;
      // sequence geometry (varlen: from cu_seqlens, as the kernel reads them on device)
      int64_t Sq = p.seqlen_q, Sk = p.seqlen_k;
      const T* qb = Q + h * p.q_head_stride;
      const T* kb = K + hk * p.k_head_stride;
      const T* vb = V + hk * p.v_head_stride;
      T* ob = O + h * p.o_head_stride;
      if (varlen) {
        const int64_t q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
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
      const int64_t split_blocks = ((Sk + BN - 1) / BN + splits - 1) / splits;  // K blocks per split
      const int64_t row0 = mb * BM;
      if (row0 >= Sq) continue;  // varlen: this sequence is shorter than max_seqlen_q
      const int64_t rows = std::min(BM, Sq - row0);
      const int64_t diag = Sk - Sq;  // bottom-right alignment: row i sees keys j <= i + diag
      const int64_t n_end =
          p.causal ? std::max<int64_t>(0, std::min(Sk, row0 + BM + diag)) : Sk;

      // 1. Q tile
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t d = 0; d < D; ++d) q[i * D + d] = static_cast<float>(qb[(row0 + i) * p.q_row_stride + d]);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);

      // this split's K blocks (all of them without split-KV)
      const int64_t nb_begin = splits > 1 ? split * split_blocks : 0;
      const int64_t nb_end = splits > 1 ? std::min((n_end + BN - 1) / BN, nb_begin + split_blocks)
                                        : (n_end + BN - 1) / BN;
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
        // 3b. S = Q K^T, masked, in log2 units
        for (int64_t i = 0; i < rows; ++i) {
          float* si = s.data() + i * BN;
          std::fill(si, si + cols, 0.f);
          for (int64_t d = 0; d < D; ++d) {
            const float qd = q[i * D + d];
            const float* kd = kt.data() + d * BN;
            for (int64_t j = 0; j < cols; ++j) si[j] += qd * kd[j];
          }
          const int64_t last_key = p.causal ? row0 + i + diag : Sk - 1;  // inclusive
          for (int64_t j = 0; j < cols; ++j) si[j] = (n0 + j <= last_key) ? si[j] * scale_log2 : kNegInf;
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
          // 3d. acc += P V
          for (int64_t j = 0; j < cols; ++j) {
            const float pj = si[j];
            if (pj == 0.f) continue;
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
          p.lse_accum[r] = l[i] > 0.f ? m[i] + std::log2(l[i]) : kNegInf;
          for (int64_t d = 0; d < D; ++d) p.o_accum[r * D + d] = acc[i * D + d] * inv;
        }
        continue;
      }
      for (int64_t i = 0; i < rows; ++i) {
        const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
        T* orow = ob + (row0 + i) * p.o_row_stride;
        for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<T>(acc[i * D + d] * inv);
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
