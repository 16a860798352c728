// Fused CPU prefill attention (AVX-512; bf16 on AMX): the default CPU path of dense attention at small and
// medium prefills, where it beats ATen's CPU flash kernel (README "CPU paths"). Called by
// attention_cpu_fast (csrc/cpu/attention_fast.cpp) after its guards (shape, score bound), so its
// results follow the same rules; see attention_prefill.cpp for the algorithm.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace hires::attention {

// q (B, Sq, Hq, D), k / v (B, Sk, Hkv, D) with unit last stride (strides: batch, token, head);
// o (B, Sq, Hq, D) contiguous of q's dtype; lse (B, Hq, Sq) fp32 contiguous, natural log.
// Key j is visible to query i iff lo <= j <= hi with c = i + Sk - Sq, lo = max(0, c - left)
// (left >= 0, else 0), hi = min(Sk - 1, c + right) (right >= 0, else Sk - 1); every row must see a
// key (the caller's shape check).
struct PrefillArgs {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  float* lse = nullptr;
  int64_t q_s[3] = {}, k_s[3] = {}, v_s[3] = {};
  int64_t B = 0, Sq = 0, Sk = 0, Hq = 0, Hkv = 0, D = 0;
  double scale = 1.0;
  int64_t window_left = -1, window_right = -1;
};

// True when this CPU runs the kernel (AVX-512 F / BW / VL / DQ).
bool cpu_has_avx512();

// softmax(scale q k^T + mask) v and its natural-log lse for fp32 / fp16 / bf16. Returns false (o /
// lse partly written, to be discarded) when the CPU lacks AVX-512, the dtype is another, or an
// output (o or lse) is not finite: the caller then runs the twin.
bool attention_cpu_prefill(const PrefillArgs& a, at::ScalarType dtype);

// Whether the default CPU path runs attention_cpu_prefill for this call (rather than ATen's
// kernel): HIRES_LMM_CPU_PREFILL=1 forces it wherever it applies, =0 never (read per call); unset:
// the measured crossover (fp16 always; fp32 and, with AMX, bf16: masked Sq * Sk <= 2048^2,
// unmasked <= 768^2 (fp32) / 2^17 (bf16)). Requires AVX-512, fp32 / fp16 / bf16, D <= 512, and a packed K / V
// of at most 2^25 floats. bf16 runs on AMX where the CPU has it (HIRES_LMM_CPU_PREFILL_AMX=0: the
// AVX-512 kernel, e.g. to test it).
bool prefill_route(int64_t B, int64_t Sq, int64_t Sk, int64_t Hq, int64_t Hkv, int64_t D, bool masked,
                   at::ScalarType dtype);

// Number of successful attention_cpu_prefill calls in this process (tests: proof that it ran).
int64_t prefill_calls();

}  // namespace hires::attention
