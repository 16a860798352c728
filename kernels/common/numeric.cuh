// Device helpers shared by all kernels: fp32 conversion with round-to-nearest-even (the rounding
// PyTorch uses), aligned vector packs for 16-byte accesses, and warp/row reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

#include "kernels/common/dtype.h"

namespace hires {

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Round through T: the value a float has once stored as T.
template <typename T> __device__ __forceinline__ float round_to(float v) {
  return to_f32<T>(from_f32<T>(v));
}

// N elements of T, aligned to their size so that one access is one LDG/STG of up to 16 bytes
// (a 32-byte pack of fp32 is two 16-byte accesses).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <DType> struct DTypeOf;
template <> struct DTypeOf<DType::kF32> { using type = float; };
template <> struct DTypeOf<DType::kF16> { using type = __half; };
template <> struct DTypeOf<DType::kBF16> { using type = __nv_bfloat16; };

// Two floats -> one 32-bit register of two 16-bit T, rounded to nearest even (lo = first, the
// lower column / k index: the mma fragment order).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// fp64 warp sum: the rare exact paths (norm statistics that overflow fp32) use it.
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

inline __host__ __device__ bool is_aligned(const void* p, int bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

}  // namespace hires
