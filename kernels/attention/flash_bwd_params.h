// Parameters of the flash attention backward, shared by the CUDA kernel
// (kernels/attention/flash_bwd.cuh) and its CPU twin (csrc/cpu/attention_bwd.cpp). Torch-free.
//
// The forward's FlashParams (q, k, v, o = the forward's output, strides, varlen, window, softcap,
// lse = the forward's softmax_lse, natural log) plus the incoming gradient dO, the outputs dQ, dK,
// dV (same strides as q, k, v: the binding makes all of them contiguous) and two fp32 workspaces.
#pragma once
#include <cstdint>

#include "kernels/attention/flash_params.h"

namespace hires::attention {

struct FlashBwdParams : FlashParams {
  const void* dout = nullptr;  // dO, strides of o (o_*_stride)
  void* dq = nullptr;          // strides of q
  void* dk = nullptr;          // strides of k
  void* dv = nullptr;          // strides of v
  // fp32 workspaces, both zeroed by the binding:
  //   dq_accum (rows, Hq, D) contiguous, rows = B*Sq (dense, row b*Sq + i) or total_q (varlen);
  //   dsum     (Hq, rows): D_i = sum_d dO[i,d] * O[i,d] (the preprocess pass writes it).
  float* dq_accum = nullptr;
  float* dsum = nullptr;
  int64_t rows = 0;  // B*Sq dense, total_q varlen
  // K/V tile of one backward work item (a CUDA thread block, a CPU parallel_for item): kBlockN
  // keys of one (batch, kv head); Q rows are visited kBlockM at a time.
};

struct FlashBwdTileShape {
  static constexpr int kBlockM = 64;  // Q rows per inner step
  static constexpr int kBlockN = 64;  // keys per work item
};

}  // namespace hires::attention
