// Hopper (sm_90a) variant of kernels/convnext/pointwise_gemm.cuh: the same two GEMMs and the same
// fused epilogues, written with CUTLASS 3.x collectives:
//
//   fc1: hidden[m, n] = round_T(GELU_erf(sum_k a[m, k] * w1[n, k] + b1[n]))
//   fc2: out[m, n]    = round_T(res[m, n] + gamma[n] * (sum_k a[m, k] * w2[n, k] + b2[n]))
//
// Shapes and numerics: as the sm_80 header (a (M,K) row-major, w (N,K) row-major = B column-major,
//   fp32 accumulation and epilogue, one rounding; bias / gamma null -> 0 / 1).
// Ownership: 128 x 128 x 64 CTA tiles, a TMA producer warp feeding a shared-memory ring (stage
//   count: whatever the epilogue's shared memory leaves), two consumer warpgroups issuing
//   warpgroup MMA (wgmma) on 64 x 128 halves of the tile (the "cooperative" schedule), persistent
//   CTAs; the epilogue is an epilogue visitor tree (Sm90EVT) run by the consumer warpgroups on the
//   accumulators, with the residual read by TMA as the GEMM's C operand (Sm90SrcFetch) and the
//   output written by TMA. Cluster 1x1x1 (no multicast): correct for every M.
// Limits: K % 8 == 0, N % 8 == 0, 16-byte aligned pointers (TMA); can_implement() checks.
// Status: compiled for sm_90a; opt-in (HIRES_LMM_CONVNEXT_SM90=1) until a GPU run validates it.
#pragma once
#include "cutlass/cutlass.h"
#include "cutlass/functional.h"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace hires::convnext {

template <typename Element>
struct PointwiseGemmSm90 {
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;  // CTA tile (M, N, K)
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;    // no multicast: any M
  static constexpr int kAlign = 16 / int(sizeof(Element));          // TMA needs 16-byte rows
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  using ElementAcc = float;
  using ElementCompute = float;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;  // w (N, K) row-major
  using LayoutC = cutlass::layout::RowMajor;
  using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;

  template <template <class> class Fn, typename Out>
  using Compute = cutlass::epilogue::fusion::Sm90Compute<Fn, Out, ElementCompute, kRound>;
  using RowVec = cutlass::epilogue::fusion::Sm90RowBroadcast<
      0, TileShape, Element, ElementCompute, cute::Stride<cute::_0, cute::_1, int64_t>, kAlign>;
  using Acc = cutlass::epilogue::fusion::Sm90AccFetch;
  using AddBias = cutlass::epilogue::fusion::Sm90EVT<Compute<cutlass::plus, ElementCompute>, Acc, RowVec>;

  // fc1: GELU(acc + bias)
  using Fc1Tree = cutlass::epilogue::fusion::Sm90EVT<Compute<cutlass::epilogue::thread::GELU, Element>, AddBias>;
  // fc2: gamma * (acc + bias) + C, C = the residual
  using Fc2Tree = cutlass::epilogue::fusion::Sm90EVT<Compute<cutlass::homogeneous_multiply_add, Element>,
                                                     RowVec, AddBias,
                                                     cutlass::epilogue::fusion::Sm90SrcFetch<Element>>;

  template <typename ElementC, typename Tree>
  struct Build {
    using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
        cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementCompute,
        ElementC, LayoutC, kAlign, Element, LayoutC, kAlign, EpilogueSchedule, Tree>::CollectiveOp;
    using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element,
        LayoutB, kAlign, ElementAcc, TileShape, ClusterShape,
        cutlass::gemm::collective::StageCountAutoCarveout<
            static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
        MainloopSchedule>::CollectiveOp;
    using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue>;
    using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  };

  using Fc1 = typename Build<void, Fc1Tree>::Gemm;     // no C operand
  using Fc2 = typename Build<Element, Fc2Tree>::Gemm;  // C = residual
};

}  // namespace hires::convnext
