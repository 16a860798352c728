// Default CPU attention path: ATen's CPU flash-attention kernel
// (at::_scaled_dot_product_flash_attention_for_cpu: blocked GEMMs, vectorized online softmax),
// used where it gives our exact semantics; everything else (softcap, rows that see no key,
// non-finite inputs, ...) runs the twin (csrc/cpu/attention.cpp), which is also what
// HIRES_LMM_CPU_TWIN=1 forces for every call (the tests of the CUDA tiling use it).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

#include "csrc/cpu/cpu_path.h"

namespace hires::attention {

// Dense (q (B,Sq,Hq,D), k/v (B,Sk,Hkv,D)), one call. window_left/right already resolved (-1:
// unbounded; causal is right = 0). Returns nullopt where the ATen kernel cannot give the exact
// semantics; otherwise (o (B,Sq,Hq,D) contiguous of q's dtype, lse (B,Hq,Sq) fp32 contiguous).
// Where prefill_route says so (csrc/cpu/attention_prefill.h), after the same guards, our fused
// prefill kernel computes them instead of ATen's.
c10::optional<std::tuple<at::Tensor, at::Tensor>> attention_cpu_fast(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, int64_t window_left,
    int64_t window_right, double softcap);

// Backward of the same path: ATen's CPU flash backward
// (at::_scaled_dot_product_flash_attention_for_cpu_backward) from the forward's saved q, k, v, out
// (B,S,H,D) and softmax_lse (B,Hq,Sq) fp32 natural log (ATen's logsumexp convention), the same
// additive mask / causal flag as the forward. Returns (dq, dk, dv) contiguous, or nullopt where the
// forward's conditions do not hold on the saved tensors (shape, |scores| bound, an lse not finite or
// exactly 0, a non-finite out or dout, fp64): the twin then runs.
// forward_checked: the caller knows attention_cpu_fast produced out / lse from these q, k, v (the
// autograd function, from cpu_fast_taken()): the score bound, lse and out checks are skipped.
c10::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> attention_cpu_fast_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, double scale, int64_t window_left, int64_t window_right, double softcap,
    bool forward_checked = false);

// Thread-local: set to true by each attention_cpu_fast call that returns a result (the caller
// resets it before the call it wants to observe).
bool& cpu_fast_taken();

// Whether attention_cpu_fast would accept these shapes/options (no data read): lets a caller that
// runs many sub-problems (varlen, kvcache) decide once.
bool attention_cpu_fast_shape_ok(int64_t Sq, int64_t Sk, int64_t window_left, int64_t window_right,
                                 double softcap);

// Small-query attention (decode: a few query rows per kv head), the default CPU path where it
// applies: per (batch, kv head), the Sq * (Hq / Hkv) query rows that share the kv head read each
// visible K and V row once (fp32 accumulation, AVX2); scores, softmax and P V in fp32, the
// natural-log lse. Key j is visible to query i iff lo <= j <= hi with c = i + L_b - Sq,
// lo = max(0, c - left) (left >= 0), hi = min(L_b - 1, c + right) (right >= 0); a row that sees
// no key gets o = 0, lse = -inf. Rows past L_b are never read. Returns false (o / lse partly
// written, to be discarded) when the CPU lacks AVX2 / FMA / F16C, or a visible score or an output
// is not finite: the caller then runs the twin, whose rules those cases follow.
struct SmallQArgs {
  const void* q = nullptr;  // (B, Sq, Hq, D), unit last stride; strides q_s = (batch, token, head)
  const void* k = nullptr;  // (B, >= max L_b, Hkv, D), unit last stride
  const void* v = nullptr;
  void* o = nullptr;        // (B, Sq, Hq, D)
  float* lse = nullptr;     // (B, Hq, Sq) fp32 with strides lse_s = (batch, head, token), or null
  int64_t q_s[3] = {}, k_s[3] = {}, v_s[3] = {}, o_s[3] = {}, lse_s[3] = {};
  const int64_t* lens = nullptr;  // (B,) keys per batch element L_b <= Sk, or null: Sk for all
  int64_t B = 0, Sq = 0, Sk = 0, Hq = 0, Hkv = 0, D = 0;
  double scale = 1.0;
  int64_t window_left = -1, window_right = -1;  // resolved (causal: right = 0)
};
bool attention_cpu_small_q(const SmallQArgs& a, at::ScalarType dtype);

// Whether attention_cpu_small_q is the better CPU path for these sizes (few query rows per kv
// head; the score buffer of a work item bounded).
inline bool small_q_shape_ok(int64_t Sq, int64_t Sk, int64_t Hq, int64_t Hkv, double softcap) {
  const int64_t rows = Sq * (Hq / Hkv);
  return softcap == 0.0 && Sq <= 4 && rows <= 64 && rows * Sk <= (int64_t(1) << 22);
}

// True when every element is finite (one pass over the data; vectorized when contiguous).
bool all_finite(const at::Tensor& t);

}  // namespace hires::attention
