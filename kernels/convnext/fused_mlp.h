// Parameters and tile configuration of the fused ConvNeXt MLP (torch-free; shared by the CUDA
// kernel kernels/convnext/fused_mlp.cuh, its launcher csrc/cuda/fused_mlp.cu, the CPU twin
// csrc/cpu/fused_mlp.cpp and the binding csrc/convnext.cpp). The design (ownership, shared-memory
// budget, registers, traffic) is written out at the top of fused_mlp.cuh.
//
//   out[m, :] = round_T(res[m, :] + gamma * (H[m, :] W2^T + b2)),
//   H[m, :]   = round_T(GELU_erf(x[m, :] W1^T + b1))        (the one rounding of the hidden)
//
// x, res, out (M, C) row-major T; W1 (F, C), W2 (C, F) nn.Linear weights; b1 (F,), b2, gamma (C,)
// or null (0 / 1). T fp16 or bf16 on CUDA; fp32 accumulation everywhere.
#pragma once
#include <cstdint>

namespace hires::convnext {

struct FusedMlpParams {
  const void* x = nullptr;         // (M, C) contiguous T: the MLP input (LayerNorm output)
  const void* w1 = nullptr;        // (F, C) contiguous T: fc1 weight (out, in)
  const void* b1 = nullptr;        // (F,) T or null
  const void* w2 = nullptr;        // (C, F) contiguous T: fc2 weight (out, in)
  const void* b2 = nullptr;        // (C,) T or null
  const void* gamma = nullptr;     // (C,) T or null (layer scale 1)
  const void* residual = nullptr;  // (M, C) contiguous T
  void* out = nullptr;             // (M, C) contiguous T
  int64_t M = 0, C = 0, F = 0;
};

// The tiling as functions of C, the one rule for the kernel (through FusedMlpTile<C>) and the CPU
// twin (any C). Why these numbers: fused_mlp.cuh, "Sizing".
constexpr int fused_mlp_bm(int64_t C) { return C <= 192 ? 128 : 64; }  // pixel rows per block
constexpr int fused_mlp_bh(int64_t C) { return C <= 256 ? 64 : 32; }   // hidden columns per chunk

// The widths the CUDA kernel is instantiated for: stages 1-2 of the released ConvNeXt models
// (T/S: 96, 192; B: 128, 256; L: 192, 384; XL: 256). Anything else takes the two-GEMM path.
constexpr int kFusedMlpWidths[] = {96, 128, 192, 256, 384};

inline bool fused_mlp_width_ok(int64_t C) {
  for (int c : kFusedMlpWidths)
    if (C == c) return true;
  return false;
}

// Shapes the CUDA kernel takes (dtype and 16-byte alignment are checked by the caller).
inline bool fused_mlp_shape_ok(int64_t C, int64_t F) {
  return fused_mlp_width_ok(C) && F > 0 && F % fused_mlp_bh(C) == 0 && F <= (int64_t(1) << 30);
}

}  // namespace hires::convnext
