// Launchers of the ConvNeXt block's pointwise GEMMs (kernels/convnext/pointwise_gemm.cuh):
// builds the CUTLASS arguments (operand strides, the epilogue trees' pointers), checks
// can_implement() and launches on the caller's stream. Explicit instantiations: fp16 and bf16
// (2 dtypes x 2 epilogues = 4 GEMM kernels); fp32 takes the binding's documented fallback.
// Compile cost (nvcc 13.2, sm_80 + sm_90a, one core): ~49 s CPU; the sm_90a file another ~50 s;
// dwconv_layernorm.cu ~4 s.
#include "csrc/cuda/convnext_block.h"

#include <climits>

#include "kernels/convnext/pointwise_gemm.cuh"

namespace hires::convnext {
namespace {

using cute::_0;
using cute::_1;

template <typename Gemm>
std::string run(const typename Gemm::Arguments& args, cudaStream_t stream) {
  Gemm gemm;
  cutlass::Status st = gemm.can_implement(args);
  if (st != cutlass::Status::kSuccess)
    return std::string("CUTLASS can_implement: ") + cutlassGetStatusString(st);
  if (Gemm::get_workspace_size(args) != 0) return "unexpected CUTLASS workspace request";
  st = gemm.initialize(args, nullptr, stream);  // sets the >48 KiB smem attribute (host only)
  if (st != cutlass::Status::kSuccess)
    return std::string("CUTLASS initialize: ") + cutlassGetStatusString(st);
  st = gemm.run(stream);
  if (st != cutlass::Status::kSuccess) return std::string("CUTLASS run: ") + cutlassGetStatusString(st);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

std::string check_sizes(const PointwiseParams& p) {
  if (p.M > INT_MAX || p.N > INT_MAX || p.K > INT_MAX) return "GEMM size exceeds int32 (GemmCoord)";
  if (p.N % kPointwiseAlign != 0 || p.K % kPointwiseAlign != 0) return "N and K must be multiples of 8";
  return std::string();
}

template <typename Gemm, typename Element>
typename Gemm::Arguments make_args(const PointwiseParams& p, const typename Gemm::EpilogueOutputOp::Params& epi) {
  const cutlass::gemm::GemmCoord size(int(p.M), int(p.N), int(p.K));
  return typename Gemm::Arguments(cutlass::gemm::GemmUniversalMode::kGemm, size, /*batch_count=*/1, epi,
                                  p.a, p.w, /*ptr_C (unused by EVT)=*/nullptr, /*ptr_D (EVT store)=*/nullptr,
                                  /*batch strides=*/p.M * p.K, p.N * p.K, 0, 0,
                                  /*lda=*/p.K, /*ldb=*/p.K, /*ldc=*/0, /*ldd=*/0);
}

template <typename Element>
std::string fc1(const PointwiseParams& p, cudaStream_t stream) {
  using G = PointwiseGemm<Element>;
  using Gemm = typename G::Fc1;
  const int64_t N = p.N, MN = p.M * p.N;
  typename G::Fc1Tree::Arguments tree{
      {                                                                       // GELU node
          {                                                                   // AddBias
              {},                                                             //   acc
              {static_cast<const Element*>(p.bias), Element(0), {_0{}, _1{}, int32_t(N)}},  // bias[n]
              {}},                                                            //   plus
          {}},                                                                //   GELU
      {static_cast<Element*>(p.out), {N, _1{}, MN}}};                         // store out
  return run<Gemm>(make_args<Gemm, Element>(p, tree), stream);
}

template <typename Element>
std::string fc2(const PointwiseParams& p, cudaStream_t stream) {
  using G = PointwiseGemm<Element>;
  using Gemm = typename G::Fc2;
  const int64_t N = p.N, MN = p.M * p.N;
  typename G::Fc2Tree::Arguments tree{
      {                                                                       // residual + (.)
          {                                                                   // ScaleTerm
              {static_cast<const Element*>(p.gamma), Element(1), {_0{}, _1{}, int32_t(N)}},  // gamma[n]
              {                                                               //   AddBias
                  {},                                                         //     acc
                  {static_cast<const Element*>(p.bias), Element(0), {_0{}, _1{}, int32_t(N)}},  // bias[n]
                  {}},                                                        //     plus
              {}},                                                            //   multiplies
          {const_cast<Element*>(static_cast<const Element*>(p.residual)), Element(0), {N, _1{}, MN}},  // res
          {}},                                                                //   plus
      {static_cast<Element*>(p.out), {N, _1{}, MN}}};                         // store out
  return run<Gemm>(make_args<Gemm, Element>(p, tree), stream);
}

}  // namespace

bool pointwise_supported(DType t, int64_t N, int64_t K) {
  return (t == DType::kF16 || t == DType::kBF16) && N % kPointwiseAlign == 0 &&
         K % kPointwiseAlign == 0 && N <= INT_MAX && K <= INT_MAX;
}

std::string launch_fc1_bias_gelu(const PointwiseParams& p, DType t, cudaStream_t stream) {
  if (p.M == 0) return std::string();
  const std::string bad = check_sizes(p);
  if (!bad.empty()) return bad;
  switch (t) {
    case DType::kF16: return fc1<cutlass::half_t>(p, stream);
    case DType::kBF16: return fc1<cutlass::bfloat16_t>(p, stream);
    default: return std::string("fc1 GEMM: no kernel for dtype ") + dtype_str(t);
  }
}

std::string launch_fc2_bias_scale_residual(const PointwiseParams& p, DType t, cudaStream_t stream) {
  if (p.M == 0) return std::string();
  const std::string bad = check_sizes(p);
  if (!bad.empty()) return bad;
  switch (t) {
    case DType::kF16: return fc2<cutlass::half_t>(p, stream);
    case DType::kBF16: return fc2<cutlass::bfloat16_t>(p, stream);
    default: return std::string("fc2 GEMM: no kernel for dtype ") + dtype_str(t);
  }
}

}  // namespace hires::convnext
