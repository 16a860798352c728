#include "csrc/cpu/gelu.h"

#include <ATen/Parallel.h>
#include <algorithm>

#include "csrc/cpu/avx2.h"

namespace hires::convnext {
namespace {

#ifdef HIRES_X86
// Phi(x) and phi(x) for 8 lanes (see gelu.h); NaN lanes give NaN.
HIRES_AVX2 inline void normal_cdf_pdf8(__m256 x, __m256& cdf, __m256& pdf) {
  const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f));
  const __m256 az = _mm256_andnot_ps(_mm256_set1_ps(-0.f), z);
  // t = 1 / d, d = 1 + p |z| in [1, inf]: the approximate reciprocal and one Newton step (relative
  // error ~2^-22; 1 / inf = 0 survives: rcp gives 0 and the step keeps it)
  const __m256 d = _mm256_fmadd_ps(az, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.f));
  const __m256 r0 = _mm256_rcp_ps(d);
  const __m256 t = _mm256_mul_ps(r0, _mm256_fnmadd_ps(d, r0, _mm256_set1_ps(2.f)));
  __m256 poly = _mm256_set1_ps(1.061405429f);
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(-1.453152027f));
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(1.421413741f));
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(-0.284496736f));
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(0.254829592f));
  poly = _mm256_mul_ps(poly, t);
  const __m256 e = cpu::exp8_nonpos(_mm256_mul_ps(_mm256_mul_ps(z, z), _mm256_set1_ps(-1.f)));  // exp(-x^2/2)
  const __m256 half_q = _mm256_mul_ps(_mm256_mul_ps(poly, e), _mm256_set1_ps(0.5f));   // erfc(|z|) / 2
  const __m256 pos = _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GE_OQ);
  cdf = _mm256_blendv_ps(half_q, _mm256_sub_ps(_mm256_set1_ps(1.f), half_q), pos);
  // a NaN lane: half_q is NaN (t is), and the blend keeps it
  pdf = _mm256_mul_ps(e, _mm256_set1_ps(0.39894228040143268f));
}

template <typename T>
HIRES_AVX2 void gelu_fwd_bwd_avx2(const T* u, const T* dh, T* gu, T* du, int64_t n) {
  using cpu::load8;
  using cpu::store8;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = load8(u + i);
    __m256 cdf, pdf;
    normal_cdf_pdf8(x, cdf, pdf);
    store8(gu + i, _mm256_mul_ps(x, cdf));
    if (du != nullptr) store8(du + i, _mm256_mul_ps(load8(dh + i), _mm256_fmadd_ps(x, pdf, cdf)));
  }
  if (i < n) {  // the tail through a zero-padded 8-lane buffer
    alignas(32) T ub[8] = {}, db[8] = {}, gb[8], ob[8];
    std::copy(u + i, u + n, ub);
    if (du != nullptr) std::copy(dh + i, dh + n, db);
    gelu_fwd_bwd_avx2<T>(ub, db, gb, du != nullptr ? ob : nullptr, 8);
    std::copy(gb, gb + (n - i), gu + i);
    if (du != nullptr) std::copy(ob, ob + (n - i), du + i);
  }
}
#endif

}  // namespace

bool gelu_fwd_bwd_cpu(const at::Tensor& u, const at::Tensor& dh, at::Tensor& gu, at::Tensor& du) {
#ifdef HIRES_X86
  const at::ScalarType st = u.scalar_type();
  const bool grad = dh.defined();
  // fp32 only: in fp16 / bf16 ATen's two passes measured faster here (its AVX-512 conversions)
  if (!cpu::cpu_has_avx2() || st != at::kFloat || !u.is_contiguous() ||
      (grad && (!dh.is_contiguous() || dh.scalar_type() != st || u.sizes() != dh.sizes())))
    return false;
  gu = at::empty_like(u, at::MemoryFormat::Contiguous);
  du = grad ? at::empty_like(u, at::MemoryFormat::Contiguous) : at::Tensor();
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* up = static_cast<const T*>(u.const_data_ptr());
    const T* dp = grad ? static_cast<const T*>(dh.const_data_ptr()) : nullptr;
    T* gp = static_cast<T*>(gu.data_ptr());
    T* op = grad ? static_cast<T*>(du.data_ptr()) : nullptr;
    at::parallel_for(0, u.numel(), int64_t(1) << 15, [&](int64_t b, int64_t e) {
      gelu_fwd_bwd_avx2<T>(up + b, grad ? dp + b : nullptr, gp + b, grad ? op + b : nullptr, e - b);
    });
  };
  run(float());
  return true;
#else
  (void)u; (void)dh; (void)gu; (void)du;
  return false;
#endif
}

}  // namespace hires::convnext
