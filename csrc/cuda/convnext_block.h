// Torch-free launchers of the two pointwise layers of the ConvNeXt block as CUTLASS GEMMs with
// fused epilogues (csrc/cuda/convnext_block.cu; sm_90a variant in convnext_block_sm90.cu).
//   fc1: hidden = GELU_erf(a @ w^T + bias)                       a (M,K), w (N,K), hidden (M,N)
//   fc2: out    = residual + gamma * (a @ w^T + bias)            a (M,K), w (N,K), out (M,N)
// All matrices row-major, contiguous, of one dtype T (fp16 or bf16); fp32 accumulation; one
// rounding of the result. bias and gamma are (N,) or null (the epilogue then broadcasts 0 / 1).
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>
#include <string>

#include "kernels/common/dtype.h"

namespace hires::convnext {

struct PointwiseParams {
  const void* a = nullptr;         // (M, K) row-major T
  const void* w = nullptr;         // (N, K) row-major T (nn.Linear weight)
  const void* bias = nullptr;      // (N,) T or null (= zeros)
  const void* gamma = nullptr;     // (N,) T or null (= ones), fc2 only
  const void* residual = nullptr;  // (M, N) row-major T, fc2 only
  void* out = nullptr;             // (M, N) row-major T
  int64_t M = 0, N = 0, K = 0;
};

// The GEMMs need N % 8 == 0, K % 8 == 0 (16-byte accesses of fp16/bf16) and 16-byte aligned
// pointers; the binding checks this with pointwise_supported() and otherwise falls back.
constexpr int kPointwiseAlign = 8;
bool pointwise_supported(DType t, int64_t N, int64_t K);

std::string launch_fc1_bias_gelu(const PointwiseParams& p, DType t, cudaStream_t stream);
std::string launch_fc2_bias_scale_residual(const PointwiseParams& p, DType t, cudaStream_t stream);

#ifdef HIRES_LMM_WITH_SM90
// Hopper (warpgroup MMA + TMA) variants; same contract.
std::string launch_fc1_bias_gelu_sm90(const PointwiseParams& p, DType t, cudaStream_t stream);
std::string launch_fc2_bias_scale_residual_sm90(const PointwiseParams& p, DType t, cudaStream_t stream);
#endif

}  // namespace hires::convnext
