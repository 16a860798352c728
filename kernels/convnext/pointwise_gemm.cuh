// The two pointwise layers of a ConvNeXt block as CUTLASS 2.x tensor-op GEMMs (sm_80 path, also
// runs on sm_90) with fused epilogue visitor trees (Sm80EVT):
//
//   fc1: hidden[m, n] = round_T(GELU_erf(sum_k a[m, k] * w1[n, k] + b1[n]))
//   fc2: out[m, n]    = round_T(res[m, n] + gamma[n] * (sum_k a[m, k] * w2[n, k] + b2[n]))
//
// Shapes: a (M, K) row-major T (fc1: the dwconv_layernorm output, K = C; fc2: hidden, K = 4C);
//   w (N, K) row-major T = nn.Linear's (out, in) weight, i.e. the GEMM's B operand (K, N) in
//   column-major with ldb = K; bias, gamma (N,) T; res, out (M, N) row-major T. T is fp16 or bf16.
// Numerics: fp32 accumulation (mma.sync m16n8k16), the whole epilogue in fp32, one rounding to T
//   at the store. GELU is the exact erf form (cutlass::epilogue::thread::GELU, not GELU_taylor).
// Ownership: a 128 x 128 output tile per threadblock (4 warps of 64 x 64), K in steps of 32
//   through a 4-stage cp.async pipeline; the epilogue visits the accumulator fragments in
//   registers and loads bias / gamma (row broadcast) and the residual (aux load) itself, so
//   neither the fc1 pre-activation nor the fc2 product ever reaches device memory.
// Limits: K % 8 == 0 and N % 8 == 0 (16-byte accesses of A, B, the residual and the output),
//   16-byte aligned pointers; any M (tiles are predicated). Checked by the launcher with
//   can_implement() before run().
#pragma once
// Include order matters: the visitor headers name cutlass::gemm types, which the GEMM headers
// must declare first (as CUTLASS example 47 does).
#include "cutlass/cutlass.h"
#include "cutlass/functional.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/gemm/device/gemm_universal.h"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/epilogue/threadblock/fusion/visitors.hpp"
#include "cutlass/gemm/kernel/default_gemm_universal_with_visitor.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"

namespace hires::convnext {

struct PointwiseGemmTile {
  using ThreadblockShape = cutlass::gemm::GemmShape<128, 128, 32>;  // CTA tile (M, N, K)
  using WarpShape = cutlass::gemm::GemmShape<64, 64, 32>;           // 2 x 2 warps
  using InstructionShape = cutlass::gemm::GemmShape<16, 8, 16>;     // mma.sync bf16/fp16
  static constexpr int kStages = 4;          // 4 x (128x32 + 128x32) x 2 B = 64 KiB of smem
  static constexpr int kEpilogueStages = 1;  // EVT epilogue: one pass over the accumulators
  static constexpr int kAlign = 8;           // elements per 16-byte access of fp16/bf16
  static constexpr int kSwizzle = 8;         // rasterize 8 CTA columns together (L2 reuse of A)
};

template <typename Element>
struct PointwiseGemm {
  using Tile = PointwiseGemmTile;
  using ElementAcc = float;
  using ElementCompute = float;
  using LayoutA = cutlass::layout::RowMajor;     // a (M, K)
  using LayoutB = cutlass::layout::ColumnMajor;  // w (N, K) row-major == B (K, N) column-major
  using LayoutC = cutlass::layout::RowMajor;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  using OutputTileThreadMap = cutlass::epilogue::threadblock::OutputTileThreadLayout<
      typename Tile::ThreadblockShape, typename Tile::WarpShape, Element, Tile::kAlign,
      Tile::kEpilogueStages>;

  // Leaves of the trees.
  using Accum = cutlass::epilogue::threadblock::VisitorAccFetch;
  using RowVec = cutlass::epilogue::threadblock::VisitorRowBroadcast<   // bias[n], gamma[n]
      OutputTileThreadMap, Element, cute::Stride<cute::_0, cute::_1, int32_t>>;
  using AuxLoad = cutlass::epilogue::threadblock::VisitorAuxLoad<       // residual[m, n]
      OutputTileThreadMap, Element, cute::Stride<int64_t, cute::_1, int64_t>>;
  using Store = cutlass::epilogue::threadblock::VisitorAuxStore<        // out[m, n]
      OutputTileThreadMap, Element, kRound, cute::Stride<int64_t, cute::_1, int64_t>>;

  template <template <class> class Fn, typename Out>
  using Compute = cutlass::epilogue::threadblock::VisitorCompute<Fn, Out, ElementCompute, kRound>;

  // acc + bias[n] (fp32)
  using AddBias = cutlass::epilogue::threadblock::Sm80EVT<Compute<cutlass::plus, float>, Accum, RowVec>;

  // fc1: store(GELU(acc + bias))
  using Fc1Tree = cutlass::epilogue::threadblock::Sm80EVT<
      Store, cutlass::epilogue::threadblock::Sm80EVT<
                 Compute<cutlass::epilogue::thread::GELU, Element>, AddBias>>;

  // fc2: store(residual + gamma * (acc + bias))
  using ScaleTerm = cutlass::epilogue::threadblock::Sm80EVT<Compute<cutlass::multiplies, float>,
                                                           RowVec, AddBias>;
  using Fc2Tree = cutlass::epilogue::threadblock::Sm80EVT<
      Store, cutlass::epilogue::threadblock::Sm80EVT<Compute<cutlass::plus, Element>, ScaleTerm,
                                                     AuxLoad>>;

  template <typename Tree>
  using Kernel = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
      Element, LayoutA, cutlass::ComplexTransform::kNone, Tile::kAlign,
      Element, LayoutB, cutlass::ComplexTransform::kNone, Tile::kAlign,
      Element, LayoutC, Tile::kAlign,
      ElementAcc, ElementCompute, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      typename Tile::ThreadblockShape, typename Tile::WarpShape, typename Tile::InstructionShape,
      Tree, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<Tile::kSwizzle>,
      Tile::kStages, cutlass::arch::OpMultiplyAdd, Tile::kEpilogueStages>::GemmKernel;

  using Fc1 = cutlass::gemm::device::GemmUniversalAdapter<Kernel<Fc1Tree>>;
  using Fc2 = cutlass::gemm::device::GemmUniversalAdapter<Kernel<Fc2Tree>>;
};

}  // namespace hires::convnext
