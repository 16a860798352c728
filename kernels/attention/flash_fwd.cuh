// Flash attention forward for sm_80+ (FlashAttention-2 algorithm, tensor-core mma.sync).
//
// Formula: o[b,i,h,:] = sum_j softmax_j(scale * q[b,i,h,:] . k[b,j,h/g,:]) v[b,j,h/g,:], g = Hq/Hkv,
//   over the keys j < Sk visible to row i: causal j <= i + Sk - Sq (bottom-right aligned), sliding
//   window i + Sk - Sq - left <= j <= i + Sk - Sq + right (flash_key_range, flash_params.h);
//   softcap: scores softcap * tanh(scale q.k / softcap). Online softmax in fp32, in log2 units
//   (scale * log2 e folded into one multiply, ex2.approx); P is rounded to T for the P.V MMA, its
//   row sum l is kept in fp32 from the unrounded P. lse = (m + log2 l) ln 2 when requested.
//   Non-finite rule: a row that sees no key gets o = 0, lse = -inf; a row that sees keys whose
//   scores are all -inf gets o = NaN (0/0) and lse = -inf; a NaN score makes o and lse NaN.
//   Known deviation: the P.V MMA multiplies masked keys' V rows by P = 0, so a NaN/inf in a V row
//   reaches the rows of the tile that mask that key (0 * inf); the CPU twin and the reference
//   read only visible V rows.
// Shapes (flash-attn layout): q (B,Sq,Hq,D), k/v (B,Sk,Hkv,D), o (B,Sq,Hq,D) with the last dim
//   contiguous and int64 strides (FlashParams); varlen: packed tokens, sequence b = tokens
//   cu_seqlens[b] .. cu_seqlens[b+1] (read on the device: no host sync, graph capturable).
//   KV cache (FlashParams::seqused_k, dense): batch b uses Sk = seqused_k[b] keys (read on device).
// Ownership: one thread block = one (Q block of kBlockM rows, q head, batch); grid (m_blocks,
//   Hq, B), for causal the m-blocks are visited last-first so the longest blocks start first.
//   4 warps; warp w owns the kWarpRows = 16 kMTiles contiguous Q rows 16 kMTiles w .. + kWarpRows - 1
//   as kMTiles m16n8k16 row tiles, so the softmax statistics of a row live in the 4 threads of
//   one quad: no inter-warp reduction, no shared-memory round trip. Lane (g = lane/4, t = lane%4)
//   holds rows g and g+8 of each of its warp's m tiles, columns 2t, 2t+1 of every n8 tile (the
//   mma C layout). Every K (Q K^T) and V (P V) B-fragment a warp loads with ldmatrix feeds the
//   MMAs of all its m tiles, so kMTiles = 2 halves the ldmatrix per MMA of the Q K^T / P V loops.
// Tiles (flash_fwd_tile, flash_params.h, picks one per launch; the CPU twin walks the same one):
//     tile             | kMTiles | kBlockM x N | smem (Q + K + V)     | regs sm_80/90a | MMA : ldmatrix.x4
//     D = 64, prefill  |    2    | 128 x 64    | 16 + 8 + 8 = 32 KiB  | 255 / 248      | 128 : 40 = 3.2
//     D = 128, prefill |    2    | 128 x 32    | 32 + 8 + 8 = 48 KiB  | 255 / 255      | 128 : 48 = 2.7
//     D = 64, 64-row   |    1    |  64 x 64    |  8 + 8 + 8 = 24 KiB  | 167 / 168      |  64 : 36 = 1.8
//     D = 128, 64-row  |    1    |  64 x 64    | 16 + 16 + 16 = 48 KiB| 238 / 235      | 128 : 72 = 1.8
//   (per warp and K/V block: (kMTiles + kBlockN/16) D/16 + (kBlockN/16) D/16 ldmatrix.x4 for
//   kMTiles kBlockN D / 64 MMAs; registers from ptxas -v, CUDA 13, no spills, 2 blocks per SM
//   except the D = 64 64-row tile's 3). The 128-row tile (FlashAttention-2's tiling) serves
//   prefill (seqlen_q > 64, no split). Its kBlockN is what the 255 registers allow: at D = 128 a
//   thread holds 128 O + 32 S fp32 accumulators (with kBlockN = 64, 128 + 64, ptxas spilled
//   150+ bytes), so the D = 128 tile re-reads Q once per 32 keys (2.7 MMAs per ldmatrix, not
//   FA2's 3.2) and pays the O rescale per 32 keys. It sits at the register cap: the per-block
//   values are kept 32-bit and materialised once (opaque asm copies), K/V rows are addressed from
//   a 32-bit first-key index, and the Q K^T loop is unrolled fully; variants without those
//   spilled 8-540 bytes (cuda_check.py -v; recheck after any change). The 64-row tile serves
//   split-KV and decode-shaped launches (seqlen_q <= 64: the extra rows would be idle MMAs).
//   Shared memory: Q tile (kBlockM x D, resident; its A-fragments are re-read by ldmatrix per
//   K block to save registers), one K and one V tile (kBlockN x D), filled by 16-byte cp.async
//   (tails zero-filled), read by ldmatrix (.trans for V). Rows of D elements are split in
//   16-byte chunks and chunk c of row r is stored at c ^ (r % 8): the 8 rows an ldmatrix phase
//   reads hit 8 distinct 16-byte bank groups (no bank conflicts).
//   Pipeline per K/V block n (FlashAttention-2's): wait + barrier (K of n landed; every warp is
//   done with V of n-1), issue V of n, S = Q K^T, wait + barrier (V of n landed; every warp is
//   done with K), issue K of n+1, mask, softmax, O += P V. Each copy overlaps one GEMM; two
//   barriers per block (tests/test_flash_attn_fragments.py replays the hazards).
// Split-KV (dense, FlashParams::num_splits > 1, for decode: few Q blocks, long KV): blockIdx.x
//   = m block * num_splits + split; a block walks only its split's piece of the tile's visible K
//   blocks (flash_split_range) and writes fp32
//   partials (o_s = acc / l, lse_s = m + log2 l); flash_combine_kernel merges them.
// Limits: T in {__half, __nv_bfloat16}; D in {64, 128} (template); all strides except the last
//   a multiple of 8 elements and pointers 16-byte aligned (the binding copies otherwise);
//   Hq <= 65535, B <= 65535 (grid y/z); any Sq, Sk (tails masked); cu_seqlens values valid and
//   lengths <= max_seqlen (checked by the binding unless value checks are off); varlen grid x
//   sized by min(max_seqlen_q, total_q) (the binding clamps p.seqlen_q).
#pragma once
#include <cstdint>
#include <math_constants.h>

#include "kernels/attention/flash_params.h"
#include "kernels/attention/flash_row.cuh"
#include "kernels/common/numeric.cuh"
#include "kernels/common/ptx_sm80.cuh"

namespace hires::attention {

template <int kHeadDim_, int kMTiles_>
struct FlashFwdTile {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kMTiles = kMTiles_;  // m16 row tiles per warp (1: 64-row tile, 2: 128-row)
  static constexpr int kWarps = 4;
  static constexpr int kWarpRows = 16 * kMTiles;           // Q rows a warp owns (contiguous)
  static constexpr int kBlockM = kWarps * kWarpRows;       // Q rows per block (the CPU twin's too)
  static constexpr int kBlockN =                            // keys per K/V block
      kMTiles == 1 ? FlashTileShape::kBlockN : flash_fwd_large_block_n(kHeadDim);
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kChunk = 8;              // elements of one 16-byte cp.async / ldmatrix row
  static constexpr int kChunksPerRow = kHeadDim / kChunk;
  static constexpr int kSwizzleRows = 8;        // 8 chunks x 16 B = 128 B = all 32 banks
  static constexpr int kNTiles = kBlockN / 8;   // n8 tiles of S per m16 tile
  static constexpr int kDTiles = kHeadDim / 8;  // n8 tiles of O per m16 tile
  static constexpr int kKSlicesD = kHeadDim / 16;  // k16 steps of Q K^T
  static constexpr int kKSlicesN = kBlockN / 16;   // k16 steps of P V
  static constexpr int kQElems = kBlockM * kHeadDim;
  static constexpr int kKVElems = kBlockN * kHeadDim;
  static constexpr int kSmemElems = kQElems + 2 * kKVElems;  // Q, one K buffer, one V buffer
  // Blocks per SM the register cap aims at (__launch_bounds__): the 64-row tile at D = 64 fits 3
  // (<= 170 registers); every other configuration 2 (<= 255: D = 128 holds 128 O + 64 S fp32
  // accumulators per thread in the 128-row tile).
  static constexpr int kMinBlocks = (kHeadDim <= 64 && kMTiles == 1) ? 3 : 2;
  static_assert(kMTiles == 1 || (kMTiles == 2 && flash_fwd_large_tile(kHeadDim)),
                "one m16 tile per warp, two where the 128-row tile fits the registers");
  static_assert(kBlockM == (kMTiles == 1 ? FlashTileShape::kBlockM : kFlashLargeBlockM),
                "the tile flash_fwd_tile (flash_params.h) tells the host and the CPU twin");
  static_assert(kHeadDim % (kChunk * kSwizzleRows) == 0,
                "the XOR swizzle permutes 8 chunks inside each 128-byte segment of a row");
  static_assert(kBlockN % 16 == 0 && kHeadDim % 16 == 0, "ldmatrix.x4 loads 16x16 sub-tiles");
  static_assert((kBlockN * kChunksPerRow) % kThreads == 0 && (kBlockM * kChunksPerRow) % kThreads == 0,
                "every thread copies the same number of chunks");
  static_assert((kWarpRows * kChunksPerRow) % 32 == 0, "the epilogue's 16-byte stores split evenly");
};

// ---- PTX wrappers (kernels/common/ptx_sm80.cuh) ----------------------------------------------
using namespace hires::ptx;

// A 32-bit global load the compiler cannot merge with an earlier load of the same address: the
// epilogue re-reads cu_seqlens_q[b] instead of keeping it live across the main loop.
__device__ __forceinline__ int ld_global_opaque(const int* ptr) {
  int v;
  asm volatile("ld.global.b32 %0, [%1];\n" : "=r"(v) : "l"(ptr));
  return v;
}

// 2^x with the SFU instruction (what exp2f becomes under --use_fast_math); ex2(-inf) = +0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Element offset of (row, col) in a swizzled tile with rows of Tile::kHeadDim elements; col is a
// multiple of kChunk.
template <typename Tile>
__device__ __forceinline__ int swz(int row, int col) {
  return row * Tile::kHeadDim + (((col / Tile::kChunk) ^ (row % Tile::kSwizzleRows)) * Tile::kChunk);
}

// Copies rows [0, rows) of a kRows x D tile (row stride in elements) into swizzled shared
// memory; rows >= valid are zero-filled (no global read), so tails never feed garbage (or NaN)
// into the MMAs. Thread tid copies chunk tid % kChunksPerRow of rows r0 + i kRowsPerPass
// (r0 = tid / kChunksPerRow): kRowsPerPass is a multiple of 8, so every row it copies has the
// swizzle phase r0 % 8 and the destinations are one base plus compile-time offsets, the sources
// one pointer plus multiples of one 64-bit step (few live registers across the main loop).
template <typename Tile, int kRows, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t row_stride, int valid, int tid) {
  constexpr int kRowsPerPass = Tile::kThreads / Tile::kChunksPerRow;
  static_assert(Tile::kThreads % Tile::kChunksPerRow == 0 && kRowsPerPass % Tile::kSwizzleRows == 0,
                "a pass copies whole rows, a multiple of the swizzle period");
  // The thread's row, column and 64-bit source offset are re-derived per call from an opaque
  // copy of tid (a shift, a mask, two IMADs): otherwise ptxas keeps 64-bit per-thread offsets
  // live across the main loop, which the 128-row tile at the 255-register cap then spills.
  int tid_o = tid;
  asm volatile("" : "+r"(tid_o));
  const int r0 = tid_o / Tile::kChunksPerRow;
  const int col = (tid_o % Tile::kChunksPerRow) * Tile::kChunk;
  T* dst = smem + swz<Tile>(r0, col);
  const T* src = gmem + (int64_t(r0) * row_stride + col);
  const int64_t step = int64_t(kRowsPerPass) * row_stride;
  const int rem = valid - r0;  // row r0 + i kRowsPerPass exists iff i kRowsPerPass < rem (immediates)
#pragma unroll
  for (int i = 0; i < kRows / kRowsPerPass; ++i) {
    const bool ok = i * kRowsPerPass < rem;
    cp_async16(dst + i * kRowsPerPass * Tile::kHeadDim, ok ? src + i * step : gmem, ok ? 16 : 0);
  }
}

template <typename T, int kHeadDim, int kMTiles>
__global__ void __launch_bounds__(FlashFwdTile<kHeadDim, kMTiles>::kThreads,
                                  FlashFwdTile<kHeadDim, kMTiles>::kMinBlocks)
flash_fwd_kernel(const FlashParams p) {
  using Tile = FlashFwdTile<kHeadDim, kMTiles>;
  constexpr int BM = Tile::kBlockM, BN = Tile::kBlockN, MT = kMTiles;
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + Tile::kQElems;   // kBlockN x D
  T* sV = sK + Tile::kKVElems;  // kBlockN x D

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;  // mma fragment coordinates
  const int wrow = warp * Tile::kWarpRows;  // first Q row of this warp in the block
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int splits = p.num_splits;  // 1 without split-KV; blockIdx.x = (m block) * splits + split
  const int split = int(blockIdx.x) % splits;
  const int m_grid = int(gridDim.x) / splits;
  const int mb = p.causal ? m_grid - 1 - int(blockIdx.x) / splits : int(blockIdx.x) / splits;

  // 1. Sequence geometry and base pointers (64-bit offsets).
  int64_t Sq = p.seqlen_q, Sk = p.seqlen_k;
  int64_t q_off = b * p.q_batch_stride;
  // K/V rows are addressed as (block-uniform base) + (kv0 + key) * row stride with kv0 the
  // sequence's first key token (varlen; 0 dense) in 32 bits (cu_seqlens are int32): one register
  // across the main loop instead of two 64-bit per-thread pointers
  const int64_t kv_b = p.cu_seqlens_q != nullptr ? 0 : b;
  int kv0 = 0;
  if (p.cu_seqlens_q != nullptr) {
    const int64_t q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
    Sq = p.cu_seqlens_q[b + 1] - q0;
    Sk = p.cu_seqlens_k[b + 1] - k0;
    q_off = q0 * p.q_row_stride;
    kv0 = int(k0);
  }
  if (p.seqused_k != nullptr) Sk = p.seqused_k[b];  // KV cache: this batch's valid keys (dense)
  const int64_t m0 = int64_t(mb) * BM;
  if (m0 >= Sq) return;  // whole block leaves before any barrier (varlen: a shorter sequence)
  const int64_t hk = int(h) / (int(p.heads_q) / int(p.heads_kv));  // GQA/MQA: kv head (Hq <= 65535)
  const T* gQ = static_cast<const T*>(p.q) + q_off + h * p.q_head_stride + m0 * p.q_row_stride;
  const T* gK = static_cast<const T*>(p.k) + kv_b * p.k_batch_stride + hk * p.k_head_stride;
  const T* gV = static_cast<const T*>(p.v) + kv_b * p.v_batch_stride + hk * p.v_head_stride;

  const int rows_q = int(min(int64_t(BM), Sq - m0));
  // Block skipping (causal, window): a row's visible range [lo, hi] is nondecreasing in the row,
  // so the tile needs keys [lo(first row), hi(last row)] only.
  const FlashKeyRange kr_first = flash_key_range(p, m0, Sq, Sk);
  const FlashKeyRange kr_last = flash_key_range(p, m0 + rows_q - 1, Sq, Sk);
  const int64_t nb_lo = kr_first.lo / BN;
  const int64_t nb_hi = kr_last.hi >= kr_first.lo ? kr_last.hi / BN + 1 : nb_lo;
  // This split's K blocks [nb_begin, nb_end) (all visible blocks when splits == 1): a piece of
  // this tile's own visible range, from this batch element's keys (seqused_k), so a sequence's
  // result never depends on its batch and no split walks only skipped blocks.
  const FlashSplitRange<int> sr = flash_split_range<int>(int(nb_lo), int(nb_hi), split, splits);
  const int nb_begin = splits > 1 ? sr.begin : int(nb_lo);
  const int nb_end = splits > 1 ? sr.end : int(nb_hi);
  // Columns of some block need the mask when a row's range starts after n0 or ends before n0+BN-1
  // (32-bit: lo <= Sk + BM, hi clamped below at -1 changes no comparison with n0 + BN - 1 >= 63).
  int lo_max = int(kr_last.lo), hi_min = int(max(kr_first.hi, int64_t(-1)));
  asm volatile("" : "+r"(lo_max), "+r"(hi_min));  // 32-bit from here on (see rows_qo below)

  // 2. Prologue: Q and the first K block in one cp.async group (V of a block is issued at the
  //    top of its iteration, K of the next block after its S = Q K^T).
  load_tile<Tile, BM>(sQ, gQ, p.q_row_stride, rows_q, tid);
  if (nb_begin < nb_end) {
    const int64_t n0 = int64_t(nb_begin) * BN;
    load_tile<Tile, BN>(sK, gK + (kv0 + n0) * p.k_row_stride, p.k_row_stride, int(min(int64_t(BN), Sk - n0)), tid);
  }
  cp_async_commit();

  float acc[MT][Tile::kDTiles][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < Tile::kDTiles; ++i) acc[mt][i][0] = acc[mt][i][1] = acc[mt][i][2] = acc[mt][i][3] = 0.f;
  // running max (log2 units) and this thread's partial running sum of rows g, g+8 of each m tile
  float m_run[MT][2], l_run[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    m_run[mt][0] = m_run[mt][1] = -CUDART_INF_F;
    l_run[mt][0] = l_run[mt][1] = 0.f;
  }
  // score in log2 units: s * scale_log2, or with softcap tanh(s * cap_in) * (softcap log2 e)
  const bool capped = p.softcap != 0.f;
  const float cap_in = capped ? p.scale / p.softcap : 0.f;
  const float scale_log2 = capped ? p.softcap * kLog2e : p.scale * kLog2e;
  // Visible keys of this thread's rows r = rbase + off, rbase = m0 + wrow + g, off = 16 mt + 8 half
  // in [0, kOffMax]: lo(r) = max(0, lo_u + off), hi(r) = min(Sk - 1, hi_u + off) with the
  // unclipped window bounds lo_u = rbase + Sk - Sq - left, hi_u = rbase + Sk - Sq + right
  // (flash_key_range). Kept as two 32-bit values clamped to [-kOffMax - 8, ...]: below that a row's
  // bound stays below 0 for every off, which is all the mask reads; hi_u above Sk - 1 changes
  // nothing either. The per-block mask only subtracts n0 (registers: 2 instead of 4 MT).
  constexpr int kOffMax = 16 * (MT - 1) + 8;
  int lo_c, hi_c;
  {
    const int64_t rbase = m0 + wrow + g, diag = Sk - Sq;
    const int64_t right = p.causal ? 0 : p.window_right;
    const int64_t lo_u = p.window_left >= 0 ? rbase + diag - p.window_left : int64_t(-kOffMax - 8);
    const int64_t hi_u = right >= 0 ? rbase + diag + right : Sk - 1;
    lo_c = int(max(lo_u, int64_t(-kOffMax - 8)));                       // <= Sk + BM: fits
    hi_c = int(max(min(hi_u, Sk - 1), int64_t(-kOffMax - 8)));
  }
  int sk1 = int(Sk - 1);  // the launcher bounds Sk below 2^31 - 2 kBlockN
  // Rows of this thread that see at least one key (bit 2 mt + half), for the epilogue's
  // non-finite rule: nothing 64-bit (Sq, Sk, window) stays live across the main loop for it.
  unsigned has_keys = 0;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const FlashKeyRange kr = flash_key_range(p, m0 + wrow + mt * 16 + g + half * 8, Sq, Sk);
      if (kr.lo <= kr.hi) has_keys |= 1u << (2 * mt + half);
    }
  // Materialise the 32-bit per-block values here: left to itself the compiler keeps their 64-bit
  // sources live across the main loop and re-derives them per block (registers the 128-row tile
  // at D = 128 does not have).
  int rows_qo = rows_q;
  asm volatile("" : "+r"(lo_c), "+r"(hi_c), "+r"(sk1), "+r"(has_keys), "+r"(rows_qo), "+r"(kv0));

  // ldmatrix lane offsets (elements) at k16 slice 0 of m tile 0 / n16 group 0 / key slice 0:
  //   Q  (A, x4): row wrow + lane % 16, column (lane / 16) * 8; matrices = a0 a1 a2 a3;
  //   K  (B, x4): key lane % 8 + (mi >> 1) * 8, column (mi & 1) * 8, mi = lane / 8; matrices =
  //      (keys +0..7, d +0..7) (keys +0..7, d +8..15) (keys +8..15, d +0..7) (+8, +8) = b0, b1 of
  //      n-tile 2nn and b0, b1 of n-tile 2nn+1;
  //   V  (B, x4.trans): key lane % 8 + (mi & 1) * 8, column (mi >> 1) * 8; matrices = (keys
  //      +0..7, d +0..7) (keys +8..15, d +0..7) (keys +0..7, d +8..15) (+8, +8) = b0, b1 of
  //      d-tile 2dd and b0, b1 of d-tile 2dd+1.
  // The k16 slice kk (Q, K) or d16 slice dd (V) at column 16 kk is swz(row, 16 kk + c) = offset
  // ^ 16 kk: chunk (2 kk + c / 8) ^ (row % 8) = 2 kk ^ (c / 8 ^ row % 8) and row * D has no bit
  // below D; +16 rows (m tile, n16 group, key slice) keep row % 8 and add 16 D. So one register
  // per operand and an XOR / add of immediates per ldmatrix (tests/test_flash_attn_fragments.py
  // checks the identity lane by lane).
  const int mi = lane / 8;
  const int q_lane = swz<Tile>(wrow + lane % 16, (lane / 16) * 8);
  const int k_lane = swz<Tile>(lane % 8 + (mi >> 1) * 8, (mi & 1) * 8);
  const int v_lane = swz<Tile>(lane % 8 + (mi & 1) * 8, (mi >> 1) * 8);

  for (int nb = nb_begin; nb < nb_end; ++nb) {
    const int64_t n0 = int64_t(nb) * BN;
    const int n0i = nb * BN;  // 32-bit copy for the mask (launcher: Sk < 2^31 - 2 kBlockN)
    const int valid = min(BN, sk1 + 1 - n0i);
    // 3. K of block nb (and Q) has landed for every thread; every warp is done with sV (its P V
    //    of block nb-1 precedes this barrier): issue V of block nb, it lands during S = Q K^T.
    cp_async_wait<0>();
    __syncthreads();
    load_tile<Tile, BN>(sV, gV + int64_t(kv0 + n0i) * p.v_row_stride, p.v_row_stride, valid, tid);
    cp_async_commit();

    // 4. S = Q K^T (kWarpRows x kBlockN per warp, fp32). Each K B-fragment (one ldmatrix.x4 =
    //    two n8 tiles x k16) feeds the MMAs of all MT m tiles.
    float s[MT][Tile::kNTiles][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < Tile::kNTiles; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
#pragma unroll  // full: with unroll 2 (fewer fragments in flight) ptxas spilled the D = 128 tile
    for (int kk = 0; kk < Tile::kKSlicesD; ++kk) {
      // Q A-fragments of this k16 slice, re-read from shared memory each block (Q stays resident
      // there; holding all of Q in registers spills at D = 128).
      uint32_t qf[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldsm_x4(qf[mt], sQ + ((q_lane ^ (kk * 16)) + mt * 16 * kHeadDim));
#pragma unroll
      for (int nn = 0; nn < BN / 16; ++nn) {
        uint32_t r[4];
        ldsm_x4(r, sK + ((k_lane ^ (kk * 16)) + nn * 16 * kHeadDim));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<T>(s[mt][2 * nn], qf[mt], r[0], r[1]);
          mma16816<T>(s[mt][2 * nn + 1], qf[mt], r[2], r[3]);
        }
      }
    }

    // 5. V of block nb has landed for every thread; every warp is done with sK: issue K of block
    //    nb+1, it lands during the softmax and O += P V.
    cp_async_wait<0>();
    __syncthreads();
    if (nb + 1 < nb_end) {
      load_tile<Tile, BN>(sK, gK + int64_t(kv0 + n0i + BN) * p.k_row_stride, p.k_row_stride,
                          min(BN, sk1 + 1 - n0i - BN), tid);
      cp_async_commit();
    }

    // 6. Softcap (a warp-uniform branch around the whole tile, so the plain path never pays for
    //    tanh), mask (tail keys; keys outside the row's causal/window range), scale to log2 units,
    //    online softmax.
    if (capped) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < Tile::kNTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][nt][e] = tanhf(s[mt][nt][e] * cap_in);
        }
    }
    const bool need_mask = lo_max > n0i || hi_min < n0i + BN - 1;
    const int tail = min(BN, sk1 - n0i);  // last key of the block that exists (< Sk)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        // visible keys [first_key, last_key] of row rbase + 16 mt + 8 half inside the block
        const int off = 16 * mt + 8 * half;
        const int first_key = max(0, min(BN, lo_c + off - n0i));
        const int last_key = max(-1, min(tail, hi_c + off - n0i));
        float mx = m_run[mt][half];
#pragma unroll
        for (int nt = 0; nt < Tile::kNTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = nt * 8 + 2 * t + e;  // key index inside the block
            float x = s[mt][nt][half * 2 + e] * scale_log2;
            if (need_mask && (col < first_key || col > last_key)) x = -CUDART_INF_F;
            s[mt][nt][half * 2 + e] = x;
            mx = fmaxf(mx, x);
          }
        }
        // the 4 lanes of a quad hold one row
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // a row with no visible key so far keeps max -inf: subtract 0 instead (exp2(-inf) = 0, no NaN)
        const float m_use = mx == -CUDART_INF_F ? 0.f : mx;
        const float alpha = fast_exp2(m_run[mt][half] - m_use);  // rescale of the old statistics
        m_run[mt][half] = mx;
        float rs = 0.f;
#pragma unroll
        for (int nt = 0; nt < Tile::kNTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pe = fast_exp2(s[mt][nt][half * 2 + e] - m_use);
            s[mt][nt][half * 2 + e] = pe;
            rs += pe;
          }
        }
        l_run[mt][half] = l_run[mt][half] * alpha + rs;
#pragma unroll
        for (int dt = 0; dt < Tile::kDTiles; ++dt) {
          acc[mt][dt][half * 2] *= alpha;
          acc[mt][dt][half * 2 + 1] *= alpha;
        }
      }
    }

    // 7. O += P V: the S accumulators of n-tiles 2kk, 2kk+1 of m tile mt are its A fragment of
    //    key slice kk; each V B-fragment (one ldmatrix.x4.trans = two n8 d-tiles x k16) feeds the
    //    MMAs of all MT m tiles.
#pragma unroll
    for (int kk = 0; kk < Tile::kKSlicesN; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);          // row g,   keys 2t..   of slice
        a[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);          // row g+8, keys 2t..
        a[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);  // row g,   keys 8+2t..
        a[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);  // row g+8, keys 8+2t..
      }
#pragma unroll
      for (int dd = 0; dd < Tile::kHeadDim / 16; ++dd) {
        uint32_t r[4];
        ldsm_x4_t(r, sV + ((v_lane ^ (dd * 16)) + kk * 16 * kHeadDim));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<T>(acc[mt][2 * dd], a[mt], r[0], r[1]);
          mma16816<T>(acc[mt][2 * dd + 1], a[mt], r[2], r[3]);
        }
      }
    }
    // (no barrier here: the next iteration's first barrier orders this P V before V is reloaded)
  }
  cp_async_wait<0>();  // no K block: the Q copy is still in flight; drain before exit
  __syncthreads();     // every thread's Q copy has landed: warps may overwrite their Q rows

  // 8. Epilogue: complete the row sums across the quad, o = acc / l; l == 0: 0 for rows with no
  //    key, NaN for rows whose visible scores were all -inf (flash_finish_row). o is staged in
  //    the warp's own kWarpRows rows of sQ (only this warp ever reads them; same swizzle: the
  //    quad-scattered 4-byte writes hit 32 distinct banks) and leaves as 16-byte stores of whole
  //    row chunks (STG.E.128).
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float l = l_run[mt][half];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int64_t rloc = wrow + mt * 16 + g + half * 8;
      if (rloc >= rows_qo) continue;
      if (splits > 1) {
        // split-KV: fp32 partial o = acc / l and lse = m + log2(l) (-inf: this split saw no finite
        // score; NaN: a NaN score)
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const int64_t r = ((int64_t(split) * p.batch + b) * p.seqlen_q + m0 + rloc) * p.heads_q + h;
        if (t == 0)
          p.lse_accum[r] = l > 0.f ? m_run[mt][half] + __log2f(l) : l == 0.f ? -CUDART_INF_F : CUDART_NAN_F;
        float* oa = p.o_accum + r * kHeadDim;
#pragma unroll
        for (int dt = 0; dt < Tile::kDTiles; ++dt)
          *reinterpret_cast<float2*>(oa + dt * 8 + 2 * t) =
              make_float2(acc[mt][dt][half * 2] * inv, acc[mt][dt][half * 2 + 1] * inv);
        continue;
      }
      const FlashRowFinish f = flash_finish_row(m_run[mt][half], l, (has_keys >> (2 * mt + half)) & 1u);
      if (p.lse != nullptr && t == 0) {
        const int64_t r = (p.cu_seqlens_q != nullptr ? int64_t(ld_global_opaque(p.cu_seqlens_q + b)) : 0) + m0 + rloc;
        p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + r * p.lse_row_stride] = f.lse;
      }
#pragma unroll
      for (int dt = 0; dt < Tile::kDTiles; ++dt) {
        // columns 2t, 2t+1 of chunk dt of row rloc (only this warp reads or writes its Q rows)
        const float o0 = l > 0.f ? acc[mt][dt][half * 2] * f.inv : f.inv;
        const float o1 = l > 0.f ? acc[mt][dt][half * 2 + 1] * f.inv : f.inv;
        *reinterpret_cast<uint32_t*>(sQ + swz<Tile>(int(rloc), dt * 8) + 2 * t) = pack2<T>(o0, o1);
      }
    }
  }
  if (splits > 1) return;  // block-uniform
  __syncwarp();
  // o of this block, re-derived here (varlen: cu_seqlens_q[b] re-read) rather than kept live
  // across the main loop
  const int64_t o_off = p.cu_seqlens_q != nullptr ? int64_t(ld_global_opaque(p.cu_seqlens_q + b)) * p.o_row_stride
                                                  : b * p.o_batch_stride;
  T* gO = static_cast<T*>(p.o) + o_off + h * p.o_head_stride + m0 * p.o_row_stride;
  // kWarpRows rows x kChunksPerRow chunks of 16 B per warp; o strides are multiples of 8 elements
  // and o is 16-byte aligned (the binding copies otherwise), so every chunk is an aligned 16-byte
  // store
#pragma unroll
  for (int i = 0; i < Tile::kWarpRows * Tile::kChunksPerRow / 32; ++i) {
    const int c = lane + i * 32;
    const int rloc = wrow + c / Tile::kChunksPerRow;
    const int col = (c % Tile::kChunksPerRow) * Tile::kChunk;
    if (rloc < rows_qo)
      *reinterpret_cast<uint4*>(gO + rloc * p.o_row_stride + col) =
          *reinterpret_cast<const uint4*>(sQ + swz<Tile>(rloc, col));
  }
}

// Split-KV combine: one warp per (row, head) of o. Weights w_s = 2^(lse_s - max_s lse_s) (all
// zero when every split saw no key: o = 0); o = sum_s w_s o_s / sum_s w_s, lanes stride over D.
// Grid: ceil(B*Sq*Hq / kCombineWarps) blocks of kCombineWarps warps.
constexpr int kCombineWarps = 4;

template <typename T>
__global__ void __launch_bounds__(kCombineWarps * 32) flash_combine_kernel(const FlashParams p) {
  const int64_t rows = p.batch * p.seqlen_q;
  const int64_t rh = int64_t(blockIdx.x) * kCombineWarps + threadIdx.x / 32;
  if (rh >= rows * p.heads_q) return;  // no barrier in this kernel
  const int lane = threadIdx.x % 32;
  const int64_t split_stride = rows * p.heads_q;
  float mx = -CUDART_INF_F;
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, p.lse_accum[s * split_stride + rh]);
  float wsum = 0.f;
  for (int s = 0; s < p.num_splits; ++s)
    wsum += mx == -CUDART_INF_F ? 0.f : fast_exp2(p.lse_accum[s * split_stride + rh] - mx);
  const int64_t rt = rh / p.heads_q, h = rh % p.heads_q;
  const int64_t b = rt / p.seqlen_q, row = rt % p.seqlen_q;
  // merged statistics: max mx, sum wsum (NaN when a split saw a NaN score)
  const FlashKeyRange kr = flash_key_range(p, row, p.seqlen_q, p.seqlen_k);
  const FlashRowFinish f = flash_finish_row(mx == -CUDART_INF_F ? 0.f : mx, wsum, kr.lo <= kr.hi);
  if (p.lse != nullptr && lane == 0)
    p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + row * p.lse_row_stride] = f.lse;
  T* orow = static_cast<T*>(p.o) + b * p.o_batch_stride + row * p.o_row_stride + h * p.o_head_stride;
  for (int64_t d = lane; d < p.head_dim; d += 32) {
    float v = 0.f;
    for (int s = 0; s < p.num_splits; ++s) {
      const float w = mx == -CUDART_INF_F ? 0.f : fast_exp2(p.lse_accum[s * split_stride + rh] - mx);
      v += w * p.o_accum[(s * split_stride + rh) * p.head_dim + d];
    }
    orow[d] = from_f32<T>(wsum > 0.f ? v * f.inv : f.inv);
  }
}

}  // namespace hires::attention
