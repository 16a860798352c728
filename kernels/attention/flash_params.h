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
  int64_t batch = 0;
  int64_t seqlen_q = 0;  // dense: Sq; varlen: max_seqlen_q (sizes the grid)
  int64_t seqlen_k = 0;  // dense: Sk; varlen: max_seqlen_k
  int64_t heads_q = 0, heads_kv = 0;  // heads_q % heads_kv == 0; q head h reads kv head h / (Hq/Hkv)
  int64_t head_dim = 0;
  float scale = 1.f;  // softmax scale applied to q.k
  bool causal = false;  // bottom-right aligned: query i sees keys j <= i + Sk - Sq
};

// The tile both implementations walk: Q blocks of kBlockM rows (one CUDA thread block, 16 rows
// per warp), K/V blocks of kBlockN keys.
struct FlashTileShape {
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = 64;
};

}  // namespace hires::attention
