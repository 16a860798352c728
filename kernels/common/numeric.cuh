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

// Stores VEC floats rounded to T (to nearest even, as from_f32) at dst (aligned to the pack) as ONE
// global store when the pack is 16 bytes: the value is built in 32-bit words and written with an
// explicit st.global.v4 (NVVM splits the copy of a Pack<T, 8> of 16-bit T, and even a plain uint4
// store, into narrower STGs). Other pack sizes store element by element.
template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* dst, const float (&v)[VEC]) {
  if constexpr (int(sizeof(T)) * VEC == 16) {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if constexpr (sizeof(T) == 4) w[k] = __float_as_uint(v[k]);
      else w[k] = pack2<T>(v[2 * k], v[2 * k + 1]);
    }
    asm volatile("st.global.v4.b32 [%0], {%1,%2,%3,%4};\n" ::"l"(dst), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
                 : "memory");
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) dst[j] = from_f32<T>(v[j]);
  }
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
