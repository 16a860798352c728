// Binding-layer helper shared by the attention forward (csrc/attention.cpp) and backward
// (csrc/attention_bwd.cpp): tensor pointers, strides and head counts into FlashParams.
#pragma once
#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>

#include "kernels/attention/flash_params.h"

namespace hires::attention {

// HIRES_LMM_ATTN_MATH=1 forces the ATen math path of the forward and backward on any device (read
// per call, so tests can cover it on the CPU).
inline bool attn_math_forced() {
  const char* math = std::getenv("HIRES_LMM_ATTN_MATH");
  return math != nullptr && std::strcmp(math, "1") == 0;
}

// q/k/v/o: (B, S, H, D) dense or (total, H, D) varlen, last dim contiguous.
inline void fill_strides(FlashParams& prm, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& o) {
  const int64_t r = q.dim() - 3;  // token dim
  prm.q = q.data_ptr(); prm.k = k.data_ptr(); prm.v = v.data_ptr(); prm.o = o.data_ptr();
  prm.q_row_stride = q.stride(r); prm.q_head_stride = q.stride(r + 1);
  prm.k_row_stride = k.stride(r); prm.k_head_stride = k.stride(r + 1);
  prm.v_row_stride = v.stride(r); prm.v_head_stride = v.stride(r + 1);
  prm.o_row_stride = o.stride(r); prm.o_head_stride = o.stride(r + 1);
  if (r == 1) {
    prm.q_batch_stride = q.stride(0); prm.k_batch_stride = k.stride(0);
    prm.v_batch_stride = v.stride(0); prm.o_batch_stride = o.stride(0);
  }
  prm.heads_q = q.size(-2);
  prm.heads_kv = k.size(-2);
  prm.head_dim = q.size(-1);
}

}  // namespace hires::attention
