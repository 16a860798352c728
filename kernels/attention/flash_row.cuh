// Device helper shared by the sm_80 and sm_90a attention kernels (flash_fwd.cuh,
// flash_fwd_sm90.cuh): how a finished row turns its online-softmax statistics into o and lse.
#pragma once
#include <math_constants.h>

namespace hires::attention {

// 1/l and natural-log lse of a finished row from its fp32 statistics (m in log2 units); the rule
// of flash_fwd.cuh's header: l > 0 -> (1/l, (m + log2 l) ln 2); l == 0 -> (NaN if the row sees keys
// (their scores were all -inf: 0/0) else 0, -inf); l NaN -> (NaN, NaN). o = l > 0 ? acc * inv : inv.
struct FlashRowFinish {
  float inv, lse;
};
__device__ __forceinline__ FlashRowFinish flash_finish_row(float m, float l, bool has_keys) {
  constexpr float kLn2 = 0.6931471805599453f;
  if (l > 0.f) return {1.f / l, (m + __log2f(l)) * kLn2};
  if (l == 0.f) return {has_keys ? CUDART_NAN_F : 0.f, -CUDART_INF_F};
  return {CUDART_NAN_F, CUDART_NAN_F};
}

}  // namespace hires::attention
