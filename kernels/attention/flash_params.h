// Parameters of the flash attention forward, shared by the CUDA kernel
// (kernels/attention/flash_fwd.cuh) and its CPU twin (csrc/cpu/attention.cpp). Torch-free.
//
// Layout (flash-attn): q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), o (B, Sq, Hq, D), last dim
// contiguous, every other stride explicit (int64, in elements). Varlen: B sequences packed along
// the token axis, q (total_q, Hq, D) with cu_seqlens_q (B+1,) int32 prefix sums (same for k);
// then batch strides are unused and sequence b starts at token cu_seqlens[b].
#pragma once
#include <cstdint>

namespace hires::attention {

struct FlashParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  // strides in elements; batch strides ignored in varlen mode
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  const int* cu_seqlens_q = nullptr;  // varlen when non-null (both are then non-null)
  const int* cu_seqlens_k = nullptr;
  // Dense KV cache (flash_attn_with_kvcache; nullptr = unused): batch b attends to its first
  // seqused_k[b] keys (0 <= seqused_k[b] <= seqlen_k, device memory on CUDA); seqlen_k is then
  // the cache capacity and bounds every length. Keys still start at b * k_batch_stride.
  const int* seqused_k = nullptr;
  int64_t batch = 0;
  int64_t seqlen_q = 0;  // dense: Sq; varlen: min(max_seqlen_q, total_q) (sizes the CUDA grid)
  int64_t seqlen_k = 0;  // dense: Sk; varlen: min(max_seqlen_k, total_k) (unused)
  int64_t heads_q = 0, heads_kv = 0;  // heads_q % heads_kv == 0; q head h reads kv head h / (Hq/Hkv)
  int64_t head_dim = 0;
  float scale = 1.f;  // softmax scale applied to q.k
  bool causal = false;  // bottom-right aligned: query i sees keys j <= i + Sk - Sq
  // Split-KV (dense only, num_splits > 1): the K blocks a Q block sees (its visible range
  // [nb_lo, nb_hi), from causal / window and this batch element's key count, seqused_k[b] when
  // given) are cut into num_splits contiguous ranges (flash_split_range; trailing ones may be
  // empty), so no split is spent on blocks the tile skips; split s writes
  // its normalized partial output and log2-sum-exp to fp32 workspaces
  //   o_accum   (num_splits, B*Sq, Hq, D) contiguous,  lse_accum (num_splits, B*Sq, Hq),
  // and a combine pass merges them: o = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M).
  int num_splits = 1;
  float* o_accum = nullptr;
  float* lse_accum = nullptr;

  // ---- flash-attn 2 extras (window_size, softcap, softmax_lse) -------------------------------
  // Sliding window (flash-attn semantics, bottom-right aligned like causal): key j is visible to
  // query i iff i + Sk - Sq - window_left <= j <= i + Sk - Sq + window_right; a negative bound is
  // unbounded. `causal` forces window_right = 0 (flash-attn's causal == window (left, 0)). The
  // binding clamps both bounds below max(Sq, Sk) so that index arithmetic never overflows.
  int64_t window_left = -1, window_right = -1;
  // Softcap (flash-attn): s = softcap * tanh(scale * q.k / softcap) before the softmax; 0 = off.
  float softcap = 0.f;
  // Log-sum-exp of every query row, natural log, fp32 (nullptr: not written). Element of
  // (batch b, head h, row i) at lse + b * lse_batch_stride + h * lse_head_stride + r * lse_row_stride
  // where r = i (dense) or the packed token index cu_seqlens_q[b] + i (varlen, batch stride 0).
  // A row that sees no key (or whose visible scores are all -inf) gets -inf.
  float* lse = nullptr;
  int64_t lse_batch_stride = 0, lse_head_stride = 0, lse_row_stride = 1;
};

// Visible key range [lo, hi] (inclusive, clipped to [0, Sk - 1]; lo > hi: none) of query row
// `row` in a sequence of Sq queries and Sk keys, under causal / window (see FlashParams).
// Every term stays within +-(Sq + Sk + window): the binding bounds the windows, so no overflow.
struct FlashKeyRange {
  int64_t lo, hi;
};
#if defined(__CUDACC__)
__host__ __device__
#endif
inline FlashKeyRange flash_key_range(const FlashParams& p, int64_t row, int64_t Sq, int64_t Sk) {
  const int64_t diag = Sk - Sq;
  const int64_t right = p.causal ? 0 : p.window_right;
  int64_t lo = p.window_left >= 0 ? row + diag - p.window_left : 0;
  int64_t hi = right >= 0 ? row + diag + right : Sk - 1;
  lo = lo > 0 ? lo : 0;
  hi = hi < Sk - 1 ? hi : Sk - 1;
  return {lo, hi};
}

// The tiles both implementations walk (the CUDA kernel and the CPU twin pick the same one per
// launch with flash_fwd_tile below; kernels/attention/flash_fwd.cuh's header has the per-D budget):
//  - FlashTileShape, 64 x 64 (4 warps x one 16-row MMA tile): the split-KV / decode tile. It is
//    also the unit the host's split-KV choice counts in (m_blocks, k_blocks,
//    flash_max_tile_k_blocks, csrc/attention.cpp), which is exact because every split launch
//    uses this tile.
//  - the prefill tile, kFlashLargeBlockM = 128 rows (4 warps x 32 rows: two 16-row MMA tiles per
//    warp share every K/V fragment, FlashAttention-2's tiling) x flash_fwd_large_block_n(D) keys.
struct FlashTileShape {
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = 64;
};
constexpr int kFlashLargeBlockM = 128;
// Head dims that have the 128-row tile: every D of the CUDA kernel (the twin uses the same rule
// for its CPU-only head dims).
#if defined(__CUDACC__)
__host__ __device__
#endif
constexpr bool flash_fwd_large_tile(int64_t head_dim) { return head_dim <= 128; }
// Keys per K/V block of the 128-row tile: 64 at D <= 64 (64 O + 64 S fp32 accumulators per
// thread), 32 above (D = 128: 128 O + 32 S; with 64 keys, 128 + 64, ptxas spills 150+ bytes at
// the 255-register cap).
#if defined(__CUDACC__)
__host__ __device__
#endif
constexpr int flash_fwd_large_block_n(int64_t head_dim) { return head_dim <= 64 ? 64 : 32; }

// Tile of one forward launch: the 128-row tile for head dims that have it (flash_fwd_large_tile)
// unless the launch is split-KV or decode-shaped (seqlen_q <= 64: one 64-row block already
// holds every query row, a 128-row block would only add idle MMA rows); the 64-row tile
// otherwise. seqlen_q is the launch's (varlen: the clamped max_seqlen_q), so the host, the
// kernel's launcher and the CPU twin agree.
struct FlashFwdTileChoice {
  int64_t block_m, block_n;
  bool large;
};
inline FlashFwdTileChoice flash_fwd_tile(const FlashParams& p) {
  if (p.num_splits > 1 || p.seqlen_q <= FlashTileShape::kBlockM || !flash_fwd_large_tile(p.head_dim))
    return {FlashTileShape::kBlockM, FlashTileShape::kBlockN, false};
  return {kFlashLargeBlockM, flash_fwd_large_block_n(p.head_dim), true};
}

// K blocks [begin, end) of split `split` (of `splits`) of a tile whose visible K blocks are
// [nb_lo, nb_hi): contiguous pieces of ceil((nb_hi - nb_lo) / splits) blocks; begin >= end: empty.
// Depends on the tile's own range only (never on the batch), shared by the kernel (I = int: a
// 64-bit division there costs registers in the D = 128 kernel) and the twin (I = int64_t).
template <typename I>
struct FlashSplitRange {
  I begin, end;
};
template <typename I>
#if defined(__CUDACC__)
__host__ __device__
#endif
inline FlashSplitRange<I> flash_split_range(I nb_lo, I nb_hi, I split, I splits) {
  const I n = nb_hi > nb_lo ? nb_hi - nb_lo : 0;
  const I per = (n + splits - 1) / splits;
  const I begin = nb_lo + split * per;
  const I end = begin + per < nb_hi ? begin + per : nb_hi;
  return {begin, end};
}

// Most K blocks any of the m_blocks Q blocks of a (Sq, Sk) sequence visits under causal / window
// (what a split cuts; only called when splitting is possible, so m_blocks is small).
inline int64_t flash_max_tile_k_blocks(const FlashParams& p, int64_t Sq, int64_t Sk, int64_t m_blocks) {
  constexpr int64_t BM = FlashTileShape::kBlockM, BN = FlashTileShape::kBlockN;
  int64_t most = 0;
  for (int64_t mb = 0; mb < m_blocks; ++mb) {
    const int64_t r0 = mb * BM, r1 = (r0 + BM < Sq ? r0 + BM : Sq) - 1;
    const FlashKeyRange first = flash_key_range(p, r0, Sq, Sk), last = flash_key_range(p, r1, Sq, Sk);
    const int64_t n = last.hi >= first.lo ? last.hi / BN + 1 - first.lo / BN : 0;
    most = n > most ? n : most;
  }
  return most;
}

// Number of K splits for a dense launch: split only decode-shaped work, i.e. when the (Q block,
// head, batch) work items fill less than the machine (`units`: SMs on CUDA, threads on the CPU)
// AND the work is KV-dominated: the widest tile visits k_blocks >= 4 x m_blocks K blocks (one
// token against a long KV cache; not a short square prefill such as B=1, H=8, S=512, which then
// keeps the sm_90a path). k_blocks: flash_max_tile_k_blocks (causal / window already applied).
// Aim at ~2 items per unit, keep >= 2 K blocks per split, at most 64.
inline int choose_num_splits(int64_t work_items, int64_t m_blocks, int64_t k_blocks, int64_t units) {
  if (work_items <= 0 || k_blocks < 4 || k_blocks < 4 * m_blocks || work_items * 2 > units) return 1;
  int64_t splits = (2 * units + work_items - 1) / work_items;
  splits = splits < k_blocks / 2 ? splits : k_blocks / 2;
  splits = splits < 64 ? splits : 64;
  return splits > 1 ? int(splits) : 1;
}

}  // namespace hires::attention
