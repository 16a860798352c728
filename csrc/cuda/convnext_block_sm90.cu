// Launchers of the Hopper pointwise GEMMs (kernels/convnext/pointwise_gemm_sm90.cuh); compiled
// for sm_90a only (CMake: *_sm90.cu). Same contract as csrc/cuda/convnext_block.cu.
#include "csrc/cuda/convnext_block.h"

#include <climits>

#include "kernels/convnext/pointwise_gemm_sm90.cuh"

namespace hires::convnext {
namespace {

using cute::_0;
using cute::_1;

std::string check(const PointwiseParams& p) {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
    return "cannot query the device";
  if (major != 9) return "the sm_90a GEMMs need a compute capability 9.x device";
  if (p.M > INT_MAX || p.N > INT_MAX || p.K > INT_MAX) return "GEMM size exceeds int32";
  if (p.N % kPointwiseAlign != 0 || p.K % kPointwiseAlign != 0) return "N and K must be multiples of 8";
  return std::string();
}

template <typename Gemm>
std::string run(typename Gemm::Arguments& args, cudaStream_t stream) {
  Gemm gemm;
  cutlass::Status st = gemm.can_implement(args);
  if (st != cutlass::Status::kSuccess)
    return std::string("CUTLASS can_implement: ") + cutlassGetStatusString(st);
  if (Gemm::get_workspace_size(args) != 0) return "unexpected CUTLASS workspace request";
  st = gemm.initialize(args, nullptr, stream);
  if (st != cutlass::Status::kSuccess)
    return std::string("CUTLASS initialize: ") + cutlassGetStatusString(st);
  st = gemm.run(stream);
  if (st != cutlass::Status::kSuccess) return std::string("CUTLASS run: ") + cutlassGetStatusString(st);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

template <typename Gemm>
typename Gemm::Arguments base_args(const PointwiseParams& p, const void* c) {
  using K = typename Gemm::GemmKernel;
  using Element = typename K::ElementA;
  const int M = int(p.M), N = int(p.N), Kd = int(p.K);
  typename Gemm::Arguments args;
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = {M, N, Kd, 1};
  args.mainloop.ptr_A = static_cast<const Element*>(p.a);
  args.mainloop.dA = cutlass::make_cute_packed_stride(typename K::StrideA{}, cute::make_shape(M, Kd, 1));
  args.mainloop.ptr_B = static_cast<const Element*>(p.w);
  args.mainloop.dB = cutlass::make_cute_packed_stride(typename K::StrideB{}, cute::make_shape(N, Kd, 1));
  args.epilogue.ptr_C = static_cast<const typename K::ElementC*>(c);
  args.epilogue.dC = cutlass::make_cute_packed_stride(typename K::StrideC{}, cute::make_shape(M, N, 1));
  args.epilogue.ptr_D = static_cast<Element*>(p.out);
  args.epilogue.dD = cutlass::make_cute_packed_stride(typename K::StrideD{}, cute::make_shape(M, N, 1));
  int dev = 0;
  cudaGetDevice(&dev);
  args.hw_info.device_id = dev;
  args.hw_info.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(dev);
  return args;
}

template <typename Element>
std::string fc1(const PointwiseParams& p, cudaStream_t stream) {
  using Gemm = typename PointwiseGemmSm90<Element>::Fc1;
  auto args = base_args<Gemm>(p, nullptr);
  const int64_t N = p.N;
  args.epilogue.thread = {
      {                                                                             // acc + bias
          {},                                                                       //   acc
          {static_cast<const Element*>(p.bias), Element(0), {_0{}, _1{}, N}},      //   bias[n]
          {}},                                                                      //   plus
      {}};                                                                          // GELU
  return run<Gemm>(args, stream);
}

template <typename Element>
std::string fc2(const PointwiseParams& p, cudaStream_t stream) {
  using Gemm = typename PointwiseGemmSm90<Element>::Fc2;
  auto args = base_args<Gemm>(p, p.residual);
  const int64_t N = p.N;
  args.epilogue.thread = {
      {static_cast<const Element*>(p.gamma), Element(1), {_0{}, _1{}, N}},          // gamma[n]
      {                                                                             // acc + bias
          {},                                                                       //   acc
          {static_cast<const Element*>(p.bias), Element(0), {_0{}, _1{}, N}},      //   bias[n]
          {}},                                                                      //   plus
      {},                                                                           // C = residual
      {}};                                                                          // fma
  return run<Gemm>(args, stream);
}

}  // namespace

std::string launch_fc1_bias_gelu_sm90(const PointwiseParams& p, DType t, cudaStream_t stream) {
  if (p.M == 0) return std::string();
  const std::string bad = check(p);
  if (!bad.empty()) return bad;
  switch (t) {
    case DType::kF16: return fc1<cutlass::half_t>(p, stream);
    case DType::kBF16: return fc1<cutlass::bfloat16_t>(p, stream);
    default: return std::string("fc1 sm90 GEMM: no kernel for dtype ") + dtype_str(t);
  }
}

std::string launch_fc2_bias_scale_residual_sm90(const PointwiseParams& p, DType t, cudaStream_t stream) {
  if (p.M == 0) return std::string();
  const std::string bad = check(p);
  if (!bad.empty()) return bad;
  switch (t) {
    case DType::kF16: return fc2<cutlass::half_t>(p, stream);
    case DType::kBF16: return fc2<cutlass::bfloat16_t>(p, stream);
    default: return std::string("fc2 sm90 GEMM: no kernel for dtype ") + dtype_str(t);
  }
}

}  // namespace hires::convnext
