// Binding-layer helper shared by the attention forward (csrc/attention.cpp) and backward
// (csrc/attention_bwd.cpp): tensor pointers, strides and head counts into FlashParams.
#pragma once
#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>

#include "kernels/attention/flash_params.h"

#ifdef HIRES_LMM_WITH_CUDA
#include "csrc/cuda/flash_attn.h"
#include "csrc/cuda/flash_attn_bwd.h"
#endif

namespace hires::attention {

// HIRES_LMM_ATTN_MATH=1 forces the ATen math path of the forward and backward on any device (read
// per call, so tests can cover it on the CPU).
inline bool attn_math_forced() {
  const char* math = std::getenv("HIRES_LMM_ATTN_MATH");
  return math != nullptr && std::strcmp(math, "1") == 0;
}

// Which pass asks use_kernel (the forward and backward CUDA kernels cover different head dims).
enum class AttnPass { kForward, kBackward };

// Whether a call runs the kernels (CUDA: the tensor-core kernel; CPU: the default CPU path or the
// twin) rather than the ATen math path: never under HIRES_LMM_ATTN_MATH=1; always on the CPU; on
// CUDA fp16/bf16 with a head dim the pass's kernel supports.
inline bool use_kernel(const at::Tensor& q, AttnPass pass) {
  if (attn_math_forced()) return false;
  if (q.is_cpu()) return true;
#ifdef HIRES_LMM_WITH_CUDA
  if (q.scalar_type() != at::kHalf && q.scalar_type() != at::kBFloat16) return false;
  return pass == AttnPass::kForward ? flash_fwd_supported_head_dim(q.size(-1))
                                    : flash_bwd_supported_head_dim(q.size(-1));
#else
  (void)pass;
  return false;
#endif
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
