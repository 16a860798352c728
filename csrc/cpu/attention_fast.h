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
c10::optional<std::tuple<at::Tensor, at::Tensor>> attention_cpu_fast(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, int64_t window_left,
    int64_t window_right, double softcap);

// Whether attention_cpu_fast would accept these shapes/options (no data read): lets a caller that
// runs many sub-problems (varlen, kvcache) decide once.
bool attention_cpu_fast_shape_ok(int64_t Sq, int64_t Sk, int64_t window_left, int64_t window_right,
                                 double softcap);

// True when every element is finite (one pass over the data; vectorized when contiguous).
bool all_finite(const at::Tensor& t);

}  // namespace hires::attention
