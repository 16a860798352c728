// AVX2 helpers of the default CPU paths (csrc/cpu/attention_fast.cpp, deepstack.cpp, select.cpp).
// The extension is compiled for baseline x86-64 (SSE2 + F16C): the hot loops get AVX2 + FMA
// versions through the target attribute, chosen at run time (cpu_has_avx2()); without AVX2 (or
// off x86) the callers run their portable code. The helpers take or give 8 fp32 lanes for 8
// elements of T in {float, c10::Half, c10::BFloat16}; roundings to T are to nearest even, as
// static_cast<T>(float) (NaN stays NaN, overflow gives inf).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define HIRES_X86 1
#define HIRES_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace hires::cpu {

inline bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}

HIRES_AVX2 inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
HIRES_AVX2 inline __m256 load8(const c10::Half* x) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}
HIRES_AVX2 inline __m256 load8(const c10::BFloat16* x) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

HIRES_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// bf16 bits (in the high half of each 32-bit lane, low half zero) of x rounded to nearest even;
// NaN lanes keep a quiet NaN.
HIRES_AVX2 inline __m256i bf16_round_bits(__m256 x) {
  const __m256i b = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  r = _mm256_and_si256(r, _mm256_set1_epi32(int(0xffff0000u)));
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_set1_ps(__builtin_nanf("")), nan));
}

// x rounded to T and back to fp32 (round_to<T>).
template <typename T> HIRES_AVX2 inline __m256 round8(__m256 x);
template <> HIRES_AVX2 inline __m256 round8<float>(__m256 x) { return x; }
template <> HIRES_AVX2 inline __m256 round8<c10::Half>(__m256 x) {
  return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
}
template <> HIRES_AVX2 inline __m256 round8<c10::BFloat16>(__m256 x) {
  return _mm256_castsi256_ps(bf16_round_bits(x));
}

// exp(x) for x <= 0 (Cephes' expf: range reduction by ln 2, degree-5 polynomial, about 1 ulp);
// 0 below -87 (the true value is < 2e-38 there), and for x = -inf.
HIRES_AVX2 inline __m256 exp8_nonpos(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(tiny, y);
}

// 8 lanes rounded to T, stored at dst.
HIRES_AVX2 inline void store8(float* dst, __m256 x) { _mm256_storeu_ps(dst, x); }
HIRES_AVX2 inline void store8(c10::Half* dst, __m256 x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
}
HIRES_AVX2 inline void store8(c10::BFloat16* dst, __m256 x) {
  const __m256i r = _mm256_srli_epi32(bf16_round_bits(x), 16);
  const __m128i p = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), p);
}

}  // namespace hires::cpu
#endif
