// CPU twin of the flash attention backward (kernels/attention/flash_bwd.cuh); see attention_bwd.h.
//
// Given the forward's q, k, v, o, lse (natural log) and dO:
//   0. preprocess: D_i = sum_d dO[i,d] O[i,d] (fp32) for every (row, query head) -> p.dsum;
//   1. work item = (batch b, kv head hk, K/V block nb of kBlockN keys), as one CUDA thread block:
//      load K_j, V_j (fp32 copies of the input-dtype values), zero dK_j, dV_j (fp32);
//   2. for every query head h of the GQA group of hk (h = hk*g .. hk*g+g-1) and every Q block of
//      kBlockM rows whose visible key ranges (flash_key_range: causal bottom-right, window, varlen
//      per sequence) meet the block:
//        S = Q K^T * scale (softcap: c = tanh(Q K^T * scale / softcap), S = softcap * c),
//        P = exp(S - lse) on visible keys, 0 elsewhere and on rows with lse = -inf (they see no
//        key: they contribute nothing),
//        dV += round_T(P)^T dO,   dP = dO V^T,   dS = P * (dP - D)  (softcap: dS *= 1 - c^2),
//        dK += scale * round_T(dS)^T Q,   dQ_tile += scale * round_T(dS) K
//      (round_T: the tensor-core kernel feeds P and dS to its MMAs in the input dtype);
//   3. store dK_j, dV_j (their only writer: the GQA sum happens inside the item, no atomics);
//      dQ_tile is added into the fp32 workspace dq_accum under the tile's mutex (the kernel's
//      fp32 atomicAdd); a final pass converts dq_accum to dq.
// Memory: the workspaces are O(rows * Hq * D) (dq_accum) and O(rows * Hq) (dsum), plus
// O(kBlockM * kBlockN + kBlockN * D) per thread: O(S), never S x S.
#include "csrc/cpu/attention_bwd.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

namespace hires::attention {
namespace {

template <typename T> inline float round_to(float v) { return static_cast<float>(static_cast<T>(v)); }

struct SeqGeom {
  int64_t Sq, Sk, q0, k0;  // lengths; first packed token (varlen) or 0
};

inline SeqGeom geometry(const FlashBwdParams& p, int64_t b) {
  if (p.cu_seqlens_q == nullptr) return {p.seqlen_q, p.seqlen_k, 0, 0};
  const int64_t q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
  return {p.cu_seqlens_q[b + 1] - q0, p.cu_seqlens_k[b + 1] - k0, q0, k0};
}

template <typename T>
void run(const FlashBwdParams& p) {
  constexpr int64_t BM = FlashBwdTileShape::kBlockM;
  constexpr int64_t BN = FlashBwdTileShape::kBlockN;
  const float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t D = p.head_dim, Hq = p.heads_q, group = p.heads_q / p.heads_kv;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const T* Q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  const T* O = static_cast<const T*>(p.o);
  const T* dO = static_cast<const T*>(p.dout);
  // global row index of (b, i): the dq_accum / dsum row
  auto grow = [&](int64_t b, const SeqGeom& g, int64_t i) { return varlen ? g.q0 + i : b * p.seqlen_q + i; };
  auto qrow = [&](const T* base, int64_t b, int64_t h, const SeqGeom& g, int64_t i, int64_t bs, int64_t rs,
                  int64_t hs) { return base + (varlen ? (g.q0 + i) * rs : b * bs + i * rs) + h * hs; };

  // 0. D_i = rowsum(dO * O)
  at::parallel_for(0, p.batch, 1, [&](int64_t bb, int64_t be) {
    for (int64_t b = bb; b < be; ++b) {
      const SeqGeom g = geometry(p, b);
      for (int64_t i = 0; i < g.Sq; ++i)
        for (int64_t h = 0; h < Hq; ++h) {
          const T* o = qrow(O, b, h, g, i, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
          const T* d = qrow(dO, b, h, g, i, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
          float s = 0.f;
          for (int64_t c = 0; c < D; ++c) s += static_cast<float>(o[c]) * static_cast<float>(d[c]);
          p.dsum[h * p.rows + grow(b, g, i)] = s;
        }
    }
  });

  // work items (b, hk, nb): K blocks of each sequence (prefix sums kblk; Q tiles qblk for locks)
  std::vector<int64_t> kblk(p.batch + 1, 0), qblk(p.batch + 1, 0);
  for (int64_t b = 0; b < p.batch; ++b) {
    const SeqGeom g = geometry(p, b);
    kblk[b + 1] = kblk[b] + (g.Sk + BN - 1) / BN;
    qblk[b + 1] = qblk[b] + (g.Sq + BM - 1) / BM;
  }
  const int64_t items = kblk[p.batch] * p.heads_kv;
  std::unique_ptr<std::mutex[]> locks(new std::mutex[std::max<int64_t>(1, qblk[p.batch] * Hq)]);
  const bool capped = p.softcap != 0.f;
  const float cap_in = capped ? p.scale / p.softcap : 0.f;

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    // kf/vf: K and V rows (for dQ); kt/vt: transposed (D x BN), so that the rows of S = Q K^T and
    // dP = dO V^T accumulate over contiguous keys (vectorizable)
    std::vector<float> kf(BN * D), vf(BN * D), kt(D * BN), vt(D * BN), dk(BN * D), dv(BN * D), q(BM * D),
        dout(BM * D), s(BM * BN), ds(BM * BN), xr(BN), dpr(BN), dq(BM * D);
    std::vector<int64_t> lo(BM), hi(BM);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t gk = item / p.heads_kv, hk = item % p.heads_kv;
      const int64_t b = int64_t(std::upper_bound(kblk.begin(), kblk.end(), gk) - kblk.begin()) - 1;
      const int64_t nb = gk - kblk[b];
      const SeqGeom g = geometry(p, b);
      const int64_t n0 = nb * BN, cols = std::min(BN, g.Sk - n0);
      auto krow = [&](const T* base, int64_t bs, int64_t rs, int64_t hs, int64_t j) {
        return base + (varlen ? (g.k0 + n0 + j) * rs : b * bs + (n0 + j) * rs) + hk * hs;
      };
      // 1. K, V tiles; dK, dV accumulators
      for (int64_t j = 0; j < cols; ++j) {
        const T* kr = krow(K, p.k_batch_stride, p.k_row_stride, p.k_head_stride, j);
        const T* vr = krow(V, p.v_batch_stride, p.v_row_stride, p.v_head_stride, j);
        for (int64_t d = 0; d < D; ++d) {
          kf[j * D + d] = kt[d * BN + j] = static_cast<float>(kr[d]);
          vf[j * D + d] = vt[d * BN + j] = static_cast<float>(vr[d]);
        }
      }
      std::fill(dk.begin(), dk.end(), 0.f);
      std::fill(dv.begin(), dv.end(), 0.f);
      const int64_t m_blocks = (g.Sq + BM - 1) / BM;
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t mb = 0; mb < m_blocks; ++mb) {
          const int64_t row0 = mb * BM, rows = std::min(BM, g.Sq - row0);
          // 2. block skipping: ranges are nondecreasing in the row
          const FlashKeyRange first = flash_key_range(p, row0, g.Sq, g.Sk);
          const FlashKeyRange last = flash_key_range(p, row0 + rows - 1, g.Sq, g.Sk);
          if (last.hi < n0 || first.lo > n0 + cols - 1) continue;
          bool any = false;
          for (int64_t i = 0; i < rows; ++i) {
            const FlashKeyRange kr = flash_key_range(p, row0 + i, g.Sq, g.Sk);
            lo[i] = std::max<int64_t>(0, kr.lo - n0);
            hi[i] = std::min<int64_t>(cols - 1, kr.hi - n0);  // visible j in [lo, hi] (may be empty)
            const float l = p.lse[h * p.lse_head_stride + b * p.lse_batch_stride +
                                  (varlen ? g.q0 + row0 + i : row0 + i) * p.lse_row_stride];
            if (l == kNegInf) hi[i] = lo[i] - 1;  // the row sees no key: contributes nothing
            any = any || lo[i] <= hi[i];
          }
          if (!any) continue;
          for (int64_t i = 0; i < rows; ++i) {
            const T* qr = qrow(Q, b, h, g, row0 + i, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
            const T* dr = qrow(dO, b, h, g, row0 + i, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
            for (int64_t d = 0; d < D; ++d) {
              q[i * D + d] = static_cast<float>(qr[d]);
              dout[i * D + d] = static_cast<float>(dr[d]);
            }
          }
          // S, P, dP, dS
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t r = grow(b, g, row0 + i);
            const float lse = p.lse[h * p.lse_head_stride + b * p.lse_batch_stride +
                                    (varlen ? g.q0 + row0 + i : row0 + i) * p.lse_row_stride];
            const float Di = p.dsum[h * p.rows + r];
            float* si = s.data() + i * BN;
            float* dsi = ds.data() + i * BN;
            std::fill(xr.begin(), xr.begin() + cols, 0.f);
            std::fill(dpr.begin(), dpr.begin() + cols, 0.f);
            const float* qi = q.data() + i * D;
            const float* di = dout.data() + i * D;
            for (int64_t d = 0; d < D; ++d) {
              const float qd = qi[d], dd = di[d];
              const float* kd = kt.data() + d * BN;
              const float* vd = vt.data() + d * BN;
              for (int64_t j = 0; j < cols; ++j) {
                xr[j] += qd * kd[j];
                dpr[j] += dd * vd[j];
              }
            }
            for (int64_t j = 0; j < cols; ++j) {
              if (j < lo[i] || j > hi[i]) {
                si[j] = 0.f;
                dsi[j] = 0.f;
                continue;
              }
              float x = xr[j];
              const float dp = dpr[j];
              float c = 0.f;
              if (capped) {
                c = std::tanh(x * cap_in);
                x = c * p.softcap;
              } else {
                x *= p.scale;
              }
              const float pij = std::exp(x - lse);
              float dsij = pij * (dp - Di);
              if (capped) dsij *= 1.f - c * c;
              si[j] = round_to<T>(pij);
              dsi[j] = round_to<T>(dsij);
            }
          }
          // dV += P^T dO, dK += scale dS^T Q, dQ_tile = scale dS K
          std::fill(dq.begin(), dq.begin() + rows * D, 0.f);
          for (int64_t i = 0; i < rows; ++i) {
            const float* si = s.data() + i * BN;
            const float* dsi = ds.data() + i * BN;
            const float* qi = q.data() + i * D;
            const float* di = dout.data() + i * D;
            float* dqi = dq.data() + i * D;
            for (int64_t j = lo[i]; j <= hi[i]; ++j) {
              const float pj = si[j], dsj = dsi[j] * p.scale;
              float* dvj = dv.data() + j * D;
              float* dkj = dk.data() + j * D;
              const float* kj = kf.data() + j * D;
              for (int64_t d = 0; d < D; ++d) {
                dvj[d] += pj * di[d];
                dkj[d] += dsj * qi[d];
                dqi[d] += dsj * kj[d];
              }
            }
          }
          {
            const std::lock_guard<std::mutex> guard(locks[(qblk[b] + mb) * Hq + h]);
            for (int64_t i = 0; i < rows; ++i) {
              float* acc = p.dq_accum + (grow(b, g, row0 + i) * Hq + h) * D;
              for (int64_t d = 0; d < D; ++d) acc[d] += dq[i * D + d];
            }
          }
        }
      }
      // 3. store dK, dV
      for (int64_t j = 0; j < cols; ++j) {
        T* dkr = const_cast<T*>(krow(static_cast<const T*>(p.dk), p.k_batch_stride, p.k_row_stride, p.k_head_stride, j));
        T* dvr = const_cast<T*>(krow(static_cast<const T*>(p.dv), p.v_batch_stride, p.v_row_stride, p.v_head_stride, j));
        for (int64_t d = 0; d < D; ++d) {
          dkr[d] = static_cast<T>(dk[j * D + d]);
          dvr[d] = static_cast<T>(dv[j * D + d]);
        }
      }
    }
  });

  // 4. dq = dq_accum in the input dtype (rows outside every sequence: the zeroed workspace)
  T* dQ = static_cast<T*>(p.dq);
  const int64_t total_rows = p.rows;
  at::parallel_for(0, total_rows, 64, [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const int64_t b = varlen ? 0 : r / p.seqlen_q, i = varlen ? r : r % p.seqlen_q;
      for (int64_t h = 0; h < Hq; ++h) {
        T* out = dQ + b * p.q_batch_stride + i * p.q_row_stride + h * p.q_head_stride;
        const float* acc = p.dq_accum + (r * Hq + h) * D;
        for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(acc[d]);
      }
    }
  });
}

}  // namespace

void flash_bwd_cpu(const FlashBwdParams& p, at::ScalarType t) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "flash_bwd_cpu", [&] { run<scalar_t>(p); });
}

}  // namespace hires::attention
