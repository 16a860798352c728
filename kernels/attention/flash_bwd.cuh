// Flash attention backward for sm_80+ (FlashAttention-2's backward, tensor-core mma.sync).
//
// Formula (per query head h, kv head hk = h / g, visible keys as the forward: causal bottom-right,
//   sliding window, varlen per sequence; flash_key_range in flash_params.h):
//   D_i = sum_d dO[i,d] O[i,d];  S = scale * Q K^T (softcap: c = tanh(scale Q K^T / softcap),
//   S = softcap * c);  P = exp(S - lse_i) (visible keys; 0 elsewhere and on rows with lse = -inf,
//   which see no key);  dV = P^T dO;  dP = dO V^T;  dS = P * (dP - D_i) (softcap: * (1 - c^2));
//   dQ = scale dS K;  dK = scale dS^T Q; GQA/MQA: dK, dV summed over the g query heads of hk.
//   fp32 accumulation everywhere; P and dS are rounded to T for the MMAs (the CPU twin does the
//   same: csrc/cpu/attention_bwd.cpp).
// Kernels (one stream, no host sync):
//   1. flash_bwd_dot_do_o_kernel: D_i -> p.dsum (Hq, rows), one warp per (row, head);
//   2. flash_bwd_kernel: one thread block per (K/V block of kBlockN = 64 keys, kv head, batch),
//      grid (ceil(seqlen_k / 64), Hkv, B), 4 warps; warp w owns keys 16w .. 16w+15 of the block.
//      K and V stay in shared memory; dK and dV (16 x D per warp) stay in fp32 registers for the
//      whole block (the block is their only writer: no atomics, deterministic). The block walks
//      every query head of its GQA group and, per head, the Q blocks of kBlockM = 64 rows whose
//      key ranges meet its keys (block skipping for causal/window). Per Q block:
//        load Q, dO (cp.async, swizzled), lse, D and each row's visible key range (smem);
//        S^T = K Q^T and dP^T = V dO^T (16 keys x kSubM rows per warp at a time: 32 at D = 64,
//        16 at D = 128, so that they fit in registers next to dK and dV; the transposed products keep
//        every key of a warp in its own rows, so P^T and dS^T are A fragments of dV += P^T dO and
//        dK += dS^T Q straight from the accumulators, as the forward's P);
//        dS^T is written to shared memory (T) and dQ (64 rows x D) = dS K is computed with
//        warp w owning rows 16w.., d-tiles in an outer loop (8 fp32 accumulators live), and
//        added to the fp32 workspace p.dq_accum with atomicAdd.
//   3. flash_bwd_convert_dq_kernel: dq = dq_accum in T.
// Why atomics for dQ (not a second pass): dQ of a Q block receives one contribution per K/V block;
//   a separate dQ pass would recompute S, P and dP (two more GEMMs per tile) to avoid atomics.
//   FlashAttention-2 makes the same choice; the cost is 64 x D fp32 atomicAdds per (K block, Q
//   block) tile against 4 64x64xD GEMMs, and non-deterministic dQ summation order (dK/dV are
//   deterministic). The workspace is O(S) (rows x Hq x D fp32), zeroed by the binding.
// Registers: dK + dV accumulators (2 x D/2 per thread) + S^T and dP^T of a kSubM-row slice
//   (2 x kSubM / 2) dominate: 144 at D = 128 with kSubM = 16 (64 rows at once: 192, 236 bytes of
//   spills; 32 rows: 36 bytes); `cuda_check.py -v` reports the ptxas count and spills.
// Limits: T in {__half, __nv_bfloat16}; D in {64, 128}; contiguous 16-byte aligned tensors
//   (the binding copies otherwise); Hkv, B <= 65535.
// Status: compiled for sm_80/sm_90a, NEVER RUN ON A GPU (the CPU twin is what the tests prove).
#pragma once
#include <cstdint>
#include <math_constants.h>

#include "kernels/attention/flash_bwd_params.h"
#include "kernels/common/numeric.cuh"
#include "kernels/common/ptx_sm80.cuh"

namespace hires::attention {
namespace bwd {

template <int kHeadDim_>
struct FlashBwdTile {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = FlashBwdTileShape::kBlockM;  // Q rows per step
  static constexpr int kBlockN = FlashBwdTileShape::kBlockN;  // keys per thread block
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpKeys = kBlockN / kWarps;  // 16: one m16 row tile of S^T per warp
  static constexpr int kChunk = 8;                    // elements per 16-byte chunk
  // Q rows of S^T / dP^T held in registers at once: 32, or 16 at D = 128 (where dK + dV take 128)
  static constexpr int kSubM = kHeadDim >= 128 ? 16 : 32;
  static constexpr int kSubTiles = kSubM / 8;         // their n8 tiles
  static constexpr int kDTiles = kHeadDim / 8;        // n8 tiles of dK/dV/dQ
  static constexpr int kTileElems = 64 * kHeadDim;
  // smem: K, V, Q, dO (64 x D each, swizzled), dS^T (kBlockN x kBlockM), then fp32 row data
  static constexpr int kSmemElems = 4 * kTileElems + kBlockN * kBlockM;
  static constexpr int kSmemBytes = kSmemElems * 2 + 4 * kBlockM * 4;
  static_assert(kBlockM == 64 && kBlockN == 64, "the swizzles and fragment loops assume 64x64 tiles");
  static_assert(kWarpKeys == 16, "one m16 tile of keys per warp");
  static_assert(kHeadDim % 64 == 0, "rows of whole 128-byte segments");
};

using namespace hires::ptx;  // kernels/common/ptx_sm80.cuh
__device__ __forceinline__ void cp_async_commit_wait_all() {
  cp_async_commit();
  cp_async_wait<0>();
}

// chunk c of row r sits at c ^ (r % 8), so the 8 rows of an ldmatrix phase hit distinct banks.
template <int kRow>
__device__ __forceinline__ int bswz(int row, int col) {
  return row * kRow + (((col >> 3) ^ (row & 7)) << 3);
}

// rows [0, valid) of a 64 x kRow tile from global (row stride in elements); the rest zero-filled.
template <int kRow, int kThreads, typename T>
__device__ __forceinline__ void load64(T* smem, const T* gmem, int64_t row_stride, int valid, int tid) {
  constexpr int kChunks = kRow / 8;
#pragma unroll
  for (int i = 0; i < 64 * kChunks / kThreads; ++i) {
    const int c = tid + i * kThreads;
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool ok = r < valid;
    cp_async16(smem + bswz<kRow>(r, col), ok ? gmem + int64_t(r) * row_stride + col : gmem, ok ? 16 : 0);
  }
}

// 1. D_i = rowsum(dO * O), one warp per (row, head); rows = p.rows (dense: b * Sq + i).
template <typename T>
__global__ void __launch_bounds__(128) flash_bwd_dot_do_o_kernel(const FlashBwdParams p) {
  const int64_t w = int64_t(blockIdx.x) * 4 + threadIdx.x / 32;
  if (w >= p.rows * p.heads_q) return;
  const int lane = threadIdx.x % 32;
  const int64_t r = w / p.heads_q, h = w % p.heads_q;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t b = varlen ? 0 : r / p.seqlen_q, i = varlen ? r : r % p.seqlen_q;
  const int64_t off = b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
  const T* o = static_cast<const T*>(p.o) + off;
  const T* d = static_cast<const T*>(p.dout) + off;
  float s = 0.f;
  for (int64_t c = lane; c < p.head_dim; c += 32) s += to_f32<T>(o[c]) * to_f32<T>(d[c]);
  s = warp_sum(s);
  if (lane == 0) p.dsum[h * p.rows + r] = s;
}

// 3. dq = dq_accum (rows, Hq, D) fp32 -> T with q's strides.
template <typename T>
__global__ void __launch_bounds__(256) flash_bwd_convert_dq_kernel(const FlashBwdParams p) {
  const int64_t e = int64_t(blockIdx.x) * 256 + threadIdx.x;
  const int64_t D = p.head_dim;
  if (e >= p.rows * p.heads_q * D) return;
  const int64_t c = e % D, h = (e / D) % p.heads_q, r = e / (D * p.heads_q);
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t b = varlen ? 0 : r / p.seqlen_q, i = varlen ? r : r % p.seqlen_q;
  static_cast<T*>(p.dq)[b * p.q_batch_stride + i * p.q_row_stride + h * p.q_head_stride + c] =
      from_f32<T>(p.dq_accum[e]);
}

// 2. The main kernel (see the header comment).
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(FlashBwdTile<kHeadDim>::kThreads) flash_bwd_kernel(const FlashBwdParams p) {
  using Tile = FlashBwdTile<kHeadDim>;
  constexpr int BM = Tile::kBlockM, BN = Tile::kBlockN, D = kHeadDim;
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + Tile::kTileElems;
  T* sQ = sV + Tile::kTileElems;
  T* sdO = sQ + Tile::kTileElems;
  T* sdS = sdO + Tile::kTileElems;  // [key][q row], rows of BM elements
  float* sLse = reinterpret_cast<float*>(sdS + BN * BM);  // lse * log2 e (-inf: row inactive)
  float* sDsum = sLse + BM;
  int* sLo = reinterpret_cast<int*>(sDsum + BM);  // visible keys of each row relative to n0
  int* sHi = sLo + BM;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t b = blockIdx.z, hk = blockIdx.y;
  const int64_t n0 = int64_t(blockIdx.x) * BN;
  const bool varlen = p.cu_seqlens_q != nullptr;
  int64_t Sq = p.seqlen_q, Sk = p.seqlen_k, q0 = 0, k0 = 0;
  if (varlen) {
    q0 = p.cu_seqlens_q[b];
    k0 = p.cu_seqlens_k[b];
    Sq = p.cu_seqlens_q[b + 1] - q0;
    Sk = p.cu_seqlens_k[b + 1] - k0;
  }
  if (n0 >= Sk || Sq <= 0) return;  // whole block, before any barrier
  const int keys = int(min(int64_t(BN), Sk - n0));
  const int64_t kbase = varlen ? (k0 + n0) * p.k_row_stride : b * p.k_batch_stride + n0 * p.k_row_stride;
  const int64_t vbase = varlen ? (k0 + n0) * p.v_row_stride : b * p.v_batch_stride + n0 * p.v_row_stride;
  const T* gK = static_cast<const T*>(p.k) + kbase + hk * p.k_head_stride;
  const T* gV = static_cast<const T*>(p.v) + vbase + hk * p.v_head_stride;
  load64<D, Tile::kThreads>(sK, gK, p.k_row_stride, keys, tid);
  load64<D, Tile::kThreads>(sV, gV, p.v_row_stride, keys, tid);

  float dk[Tile::kDTiles][4], dv[Tile::kDTiles][4];
#pragma unroll
  for (int i = 0; i < Tile::kDTiles; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  const bool capped = p.softcap != 0.f;
  const float cap_in = capped ? p.scale / p.softcap : 0.f;
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t m_blocks = (Sq + BM - 1) / BM;
  const int kw = warp * Tile::kWarpKeys;  // this warp's first key in the block

  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    for (int64_t mb = 0; mb < m_blocks; ++mb) {
      const int64_t m0 = mb * BM;
      const int rows = int(min(int64_t(BM), Sq - m0));
      // block skipping (uniform over the block): key ranges are nondecreasing in the row
      const FlashKeyRange first = flash_key_range(p, m0, Sq, Sk);
      const FlashKeyRange last = flash_key_range(p, m0 + rows - 1, Sq, Sk);
      if (last.hi < n0 || first.lo > n0 + keys - 1) continue;
      const int64_t qoff = varlen ? (q0 + m0) * p.q_row_stride : b * p.q_batch_stride + m0 * p.q_row_stride;
      const int64_t ooff = varlen ? (q0 + m0) * p.o_row_stride : b * p.o_batch_stride + m0 * p.o_row_stride;
      load64<D, Tile::kThreads>(sQ, static_cast<const T*>(p.q) + qoff + h * p.q_head_stride, p.q_row_stride, rows, tid);
      load64<D, Tile::kThreads>(sdO, static_cast<const T*>(p.dout) + ooff + h * p.o_head_stride, p.o_row_stride,
                                rows, tid);
      if (tid < BM) {
        float lse = -CUDART_INF_F, ds = 0.f;
        int lo = 1, hi = 0;  // empty
        if (tid < rows) {
          const int64_t r = varlen ? q0 + m0 + tid : b * Sq + m0 + tid;
          lse = p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + (varlen ? r : m0 + tid) * p.lse_row_stride];
          ds = p.dsum[h * p.rows + r];
          const FlashKeyRange kr = flash_key_range(p, m0 + tid, Sq, Sk);
          lo = int(max(int64_t(0), min(int64_t(BN), kr.lo - n0)));
          hi = int(max(int64_t(-1), min(int64_t(keys - 1), kr.hi - n0)));
          if (lse == -CUDART_INF_F) hi = lo - 1;  // sees no key: contributes nothing
        }
        sLse[tid] = lse == -CUDART_INF_F ? 0.f : lse * kLog2e;
        sDsum[tid] = ds;
        sLo[tid] = lo;
        sHi[tid] = hi;
      }
      cp_async_commit_wait_all();
      __syncthreads();

      // The Q block in slices of kSubM rows (registers: S^T and dP^T of 16 keys x kSubM rows next
      // to the 2 x D/2 fp32 of dK and dV; 64 or 32 rows at once spill at D = 128).
#pragma unroll 1
      for (int mo = 0; mo < BM; mo += Tile::kSubM) {
        // S^T = K_w Q^T and dP^T = V_w dO^T: 16 keys x kSubM rows per warp
        float st[Tile::kSubTiles][4], dpt[Tile::kSubTiles][4];
#pragma unroll
        for (int i = 0; i < Tile::kSubTiles; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e) st[i][e] = dpt[i][e] = 0.f;
#pragma unroll 1  // st/dpt are indexed by nn only; one k16 slice of fragments live at a time
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t ka[4], va[4];
          ldsm_x4(ka, sK + bswz<D>(kw + lane % 16, kk * 16 + (lane / 16) * 8));
          ldsm_x4(va, sV + bswz<D>(kw + lane % 16, kk * 16 + (lane / 16) * 8));
          const int mi = lane / 8;
#pragma unroll
          for (int nn = 0; nn < Tile::kSubM / 16; ++nn) {
            uint32_t r[4];
            ldsm_x4(r, sQ + bswz<D>(mo + nn * 16 + lane % 8 + (mi >> 1) * 8, kk * 16 + (mi & 1) * 8));
            mma16816<T>(st[2 * nn], ka, r[0], r[1]);
            mma16816<T>(st[2 * nn + 1], ka, r[2], r[3]);
            ldsm_x4(r, sdO + bswz<D>(mo + nn * 16 + lane % 8 + (mi >> 1) * 8, kk * 16 + (mi & 1) * 8));
            mma16816<T>(dpt[2 * nn], va, r[0], r[1]);
            mma16816<T>(dpt[2 * nn + 1], va, r[2], r[3]);
          }
        }
        // P^T and scale * dS^T, element (key kw + g + 8 (e >> 1), row mo + nt * 8 + 2t + (e & 1))
#pragma unroll
        for (int nt = 0; nt < Tile::kSubTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = kw + g + 8 * (e >> 1), row = mo + nt * 8 + 2 * t + (e & 1);
            float x = st[nt][e], c = 0.f;
            if (capped) {
              c = tanhf(x * cap_in);
              x = c * p.softcap;
            } else {
              x *= p.scale;
            }
            const bool vis = key >= sLo[row] && key <= sHi[row];
            const float pr = vis ? exp2f(x * kLog2e - sLse[row]) : 0.f;
            float ds = pr * (dpt[nt][e] - sDsum[row]);
            if (capped) ds *= 1.f - c * c;
            st[nt][e] = pr;
            dpt[nt][e] = vis ? ds * p.scale : 0.f;
          }
        }
        // dV_w += P^T dO and dK_w += (scale dS^T) Q: A fragments from the accumulators
#pragma unroll
        for (int kk = 0; kk < Tile::kSubM / 16; ++kk) {
          uint32_t pa[4], sa[4];
          pa[0] = pack2<T>(st[2 * kk][0], st[2 * kk][1]);
          pa[1] = pack2<T>(st[2 * kk][2], st[2 * kk][3]);
          pa[2] = pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]);
          pa[3] = pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3]);
          sa[0] = pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]);
          sa[1] = pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]);
          sa[2] = pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
          sa[3] = pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
          // dS^T (T) to shared memory for dQ: rows = keys, 2 consecutive q rows per store
          const int c0 = mo + kk * 16;
          *reinterpret_cast<uint32_t*>(sdS + bswz<BM>(kw + g, c0) + 2 * t) = sa[0];
          *reinterpret_cast<uint32_t*>(sdS + bswz<BM>(kw + g + 8, c0) + 2 * t) = sa[1];
          *reinterpret_cast<uint32_t*>(sdS + bswz<BM>(kw + g, c0 + 8) + 2 * t) = sa[2];
          *reinterpret_cast<uint32_t*>(sdS + bswz<BM>(kw + g + 8, c0 + 8) + 2 * t) = sa[3];
          const int mi = lane / 8;
#pragma unroll
          for (int dd = 0; dd < D / 16; ++dd) {
            uint32_t r[4];
            ldsm_x4_t(r, sdO + bswz<D>(c0 + lane % 8 + (mi & 1) * 8, dd * 16 + (mi >> 1) * 8));
            mma16816<T>(dv[2 * dd], pa, r[0], r[1]);
            mma16816<T>(dv[2 * dd + 1], pa, r[2], r[3]);
            ldsm_x4_t(r, sQ + bswz<D>(c0 + lane % 8 + (mi & 1) * 8, dd * 16 + (mi >> 1) * 8));
            mma16816<T>(dk[2 * dd], sa, r[0], r[1]);
            mma16816<T>(dk[2 * dd + 1], sa, r[2], r[3]);
          }
        }
      }
      __syncthreads();  // dS^T complete

      // dQ rows 16 warp .. of this Q block += dS K (scale folded into dS), atomics into dq_accum
      {
        const int mi = lane / 8;
        const int qr = warp * 16;
#pragma unroll 1
        for (int dd = 0; dd < D / 16; ++dd) {
          float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
          for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t a[4], r[4];
            // A = dS (rows x keys) from dS^T storage: transposed 8x8 loads, matrices a0..a3
            ldsm_x4_t(a, sdS + bswz<BM>(kk * 16 + lane % 8 + (mi >> 1) * 8, qr + (mi & 1) * 8));
            ldsm_x4_t(r, sK + bswz<D>(kk * 16 + lane % 8 + (mi & 1) * 8, dd * 16 + (mi >> 1) * 8));
            mma16816<T>(acc[0], a, r[0], r[1]);
            mma16816<T>(acc[1], a, r[2], r[3]);
          }
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int row = qr + g + 8 * half;
            if (row >= rows) continue;
            const int64_t r = varlen ? q0 + m0 + row : b * Sq + m0 + row;
            float* dst = p.dq_accum + (r * p.heads_q + h) * D + dd * 16 + 2 * t;
            atomicAdd(dst, acc[0][2 * half]);
            atomicAdd(dst + 1, acc[0][2 * half + 1]);
            atomicAdd(dst + 8, acc[1][2 * half]);
            atomicAdd(dst + 9, acc[1][2 * half + 1]);
          }
        }
      }
      __syncthreads();  // every warp is done with sQ, sdO, sdS before the next Q block
    }
  }
  cp_async_commit_wait_all();  // K/V copies when no Q block was visited

  // Epilogue: dK, dV (fp32 registers) -> T, element (key kw + g + 8 (e >> 1), d dt * 8 + 2t + (e & 1))
  T* gdK = static_cast<T*>(p.dk) + kbase + hk * p.k_head_stride;
  T* gdV = static_cast<T*>(p.dv) + vbase + hk * p.v_head_stride;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int key = kw + g + 8 * half;
    if (key >= keys) continue;
#pragma unroll
    for (int dt = 0; dt < Tile::kDTiles; ++dt) {
      *reinterpret_cast<uint32_t*>(gdK + int64_t(key) * p.k_row_stride + dt * 8 + 2 * t) =
          pack2<T>(dk[dt][2 * half], dk[dt][2 * half + 1]);
      *reinterpret_cast<uint32_t*>(gdV + int64_t(key) * p.v_row_stride + dt * 8 + 2 * t) =
          pack2<T>(dv[dt][2 * half], dv[dt][2 * half + 1]);
    }
  }
}

}  // namespace bwd
}  // namespace hires::attention
