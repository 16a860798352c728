// CPU twin of kernels/convnext/fused_mlp.cuh (the fused ConvNeXt MLP): the kernel's tiling in
// plain loops, used under HIRES_LMM_CPU_TWIN=1 to prove the algorithm against the reference.
#pragma once
#include <ATen/ATen.h>

#include "kernels/convnext/fused_mlp.h"

namespace hires::convnext {

// out = round_T(res + gamma * (round_T(GELU_erf(x W1^T + b1)) W2^T + b2)), any C and F (a last
// partial hidden chunk where F % BH != 0, which the CUDA kernel does not take). T = t.
void fused_mlp_cpu(const FusedMlpParams& p, at::ScalarType t);

}  // namespace hires::convnext

namespace hires::convnext {

// Default CPU path of the MLP (not the twin): oneDNN GEMMs in x's dtype through the
// mkldnn::_linear_pointwise operator (AMX / AVX-512 bf16 / fp16 where the CPU has them), on row
// chunks whose hidden is 16 MB (rows are independent).
//   H = round_T(GELU_erf(x W1^T + b1))        fc1 + bias + GELU on the fp32 accumulator, one rounding
//   gamma given:  P = round_T(H W2^T + b2)    fc2 + bias, rounded (the one extra rounding, T != fp32)
//                 out = round_T(res + gamma * P)   (at::addcmul: fp32 arithmetic, one rounding)
//   no gamma:     out = round_T(H W2^T + b2 + res) (oneDNN binary-add post-op on the accumulator)
// x2, res2 (M, C) contiguous of one dtype T. Returns an undefined tensor when it does not take the
// call (the caller then runs the fp32 ATen path): fp32 with M*C*F <= 2^24 (less fixed cost per
// call in ATen's GEMMs), HIRES_LMM_CPU_ONEDNN_MLP=0 (read per call), no
// oneDNN in this torch or torch.backends.mkldnn disabled, the operator missing, oneDNN refusing T
// on this CPU (remembered per dtype), or any non-finite output element (the fp32 path, whose
// arithmetic is the formula's, then decides every output: README "Non-finite values").
at::Tensor mlp_cpu_onednn(const at::Tensor& x2, const at::Tensor& fc1_weight,
                          const c10::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
                          const c10::optional<at::Tensor>& fc2_bias,
                          const c10::optional<at::Tensor>& gamma, const at::Tensor& res2);

}  // namespace hires::convnext
