#include "csrc/cpu/norm_bwd.h"

// No contraction of a * b + c into one FMA in this file: the AVX2 / AVX-512 rows (FMA in their
// targets) must round as the portable rows do, and a LayerNorm of width 1 must give dx = 0 exactly (g w - mean(g w)).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "csrc/cpu/avx2.h"
#include "csrc/cpu/cpu_path.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

namespace hires::deepstack {
namespace {

template <typename T> inline float round_to(float v) { return static_cast<float>(static_cast<T>(v)); }

// Row statistics as sums of kP = 32 interleaved fp32 partials: p[j] sums the elements c = j mod 32
// of the full 32-element blocks, then the last D mod 32 elements are added to p[0], p[1], ..., and
// fold32 adds the 32 partials in a fixed tree. A single running sum is one dependent add per
// element (4 such row sums were most of this kernel's time); 32 partials are 4 independent 8-lane
// accumulators in the AVX2 rows, 2 16-lane ones in the AVX-512 rows. The order depends on D only
// (not on threads or the machine), and the portable and vector rows follow it exactly, so they
// agree bitwise.
constexpr int64_t kP = 32;

inline float fold32(const float* p) {
  float q[8];
  for (int j = 0; j < 8; ++j) q[j] = (p[j] + p[j + 8]) + (p[j + 16] + p[j + 24]);
  return ((q[0] + q[4]) + (q[1] + q[5])) + ((q[2] + q[6]) + (q[3] + q[7]));
}

template <typename F>
inline float sum32(int64_t D, F f) {
  float p[kP] = {};
  const int64_t D32 = D / kP * kP;
  for (int64_t c = 0; c < D32; c += kP)
    for (int64_t j = 0; j < kP; ++j) p[j] += f(c + j);
  for (int64_t c = D32; c < D; ++c) p[c - D32] += f(c);
  return fold32(p);
}


// The statistics of one row: mean (LayerNorm), 1 / std, mean(g) (LayerNorm), mean(g * y).
struct RowStats {
  float mu, rstd, mg, mgy;
};

#ifdef HIRES_X86
// AVX2 rows: 8 lanes, 4 accumulators per statistic.
namespace avx2 {
#define NB_TARGET HIRES_AVX2
using vf = __m256;
constexpr int kN = 8;
constexpr int kStatRows = 2;  // rows whose statistics are interleaved (16 ymm registers)
NB_TARGET inline vf vzero() { return _mm256_setzero_ps(); }
NB_TARGET inline vf vset1(float v) { return _mm256_set1_ps(v); }
NB_TARGET inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
NB_TARGET inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
NB_TARGET inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
NB_TARGET inline vf vand(vf a, vf m) { return _mm256_and_ps(a, m); }
NB_TARGET inline vf vloadf(const float* x) { return _mm256_loadu_ps(x); }
NB_TARGET inline void vstoref(float* x, vf v) { _mm256_storeu_ps(x, v); }
template <typename T> NB_TARGET inline vf vload(const T* x) { return cpu::load8(x); }
template <typename T> NB_TARGET inline void vstore(T* x, vf v) { cpu::store8(x, v); }
template <typename T> NB_TARGET inline vf vround(vf v) { return cpu::round8<T>(v); }
NB_TARGET inline vf vmask(int64_t n) {
  const int c = int(std::max<int64_t>(std::min<int64_t>(n, kN), 0));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}
// fold32's tree in registers: q[j] = (p[j] + p[j + 8]) + (p[j + 16] + p[j + 24]), then
// ((q0 + q4) + (q1 + q5)) + ((q2 + q6) + (q3 + q7)).
NB_TARGET inline float fold8(__m256 q) {
  const __m128 r = _mm_add_ps(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1));  // q[j] + q[j + 4]
  const __m128 t = _mm_add_ps(r, _mm_movehdup_ps(r));                                  // r0 + r1, r2 + r3
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehl_ps(t, t)));
}
NB_TARGET inline float vfold(const vf* a) {
  return fold8(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
}
NB_TARGET inline vf vloadf_n(const float* x, int64_t n) {  // lanes >= n: +0, not read
  return _mm256_maskload_ps(x, _mm256_castps_si256(vmask(n)));
}
NB_TARGET inline void vstoref_n(float* x, vf v, int64_t n) {
  _mm256_maskstore_ps(x, _mm256_castps_si256(vmask(n)), v);
}
#include "csrc/cpu/norm_bwd_rows.inc"
#undef NB_TARGET
}  // namespace avx2

// AVX-512 rows: 16 lanes, 2 accumulators per statistic (the same 32 partials; AVX512F only).
// (GCC 12 warns that its own AVX-512 intrinsics read an "uninitialized" __Y: a false positive.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace avx512 {
#define NB_TARGET __attribute__((target("avx512f,avx2,fma,f16c")))
using vf = __m512;
constexpr int kN = 16;
constexpr int kStatRows = 4;  // rows whose statistics are interleaved (32 zmm registers)
inline bool supported() {
  static const bool ok = __builtin_cpu_supports("avx512f") && cpu::cpu_has_avx2();
  return ok;
}
NB_TARGET inline vf vzero() { return _mm512_setzero_ps(); }
NB_TARGET inline vf vset1(float v) { return _mm512_set1_ps(v); }
NB_TARGET inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
NB_TARGET inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
NB_TARGET inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
NB_TARGET inline vf vand(vf a, vf m) {
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), _mm512_castps_si512(m)));
}
NB_TARGET inline vf vloadf(const float* x) { return _mm512_loadu_ps(x); }
NB_TARGET inline void vstoref(float* x, vf v) { _mm512_storeu_ps(x, v); }
NB_TARGET inline vf vload(const float* x) { return _mm512_loadu_ps(x); }
NB_TARGET inline vf vload(const c10::Half* x) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}
NB_TARGET inline vf vload(const c10::BFloat16* x) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
// bf16 bits (high half of each lane) of x rounded to nearest even, NaN lanes a quiet NaN: the
// AVX2 helper's (cpu::bf16_round_bits) arithmetic in 16 lanes.
NB_TARGET inline __m512i bf16_bits(vf x) {
  const __m512i b = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  r = _mm512_and_si512(r, _mm512_set1_epi32(int(0xffff0000u)));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  return _mm512_mask_blend_epi32(nan, r, _mm512_castps_si512(_mm512_set1_ps(__builtin_nanf(""))));
}
NB_TARGET inline void vstore(float* x, vf v) { _mm512_storeu_ps(x, v); }
NB_TARGET inline void vstore(c10::Half* x, vf v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
NB_TARGET inline void vstore(c10::BFloat16* x, vf v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_bits(v), 16)));
}
template <typename T> NB_TARGET inline vf vround(vf v);
template <> NB_TARGET inline vf vround<float>(vf v) { return v; }
template <> NB_TARGET inline vf vround<c10::Half>(vf v) {
  return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
template <> NB_TARGET inline vf vround<c10::BFloat16>(vf v) { return _mm512_castsi512_ps(bf16_bits(v)); }
NB_TARGET inline vf vmask(int64_t n) {
  const int c = int(std::max<int64_t>(std::min<int64_t>(n, kN), 0));
  return _mm512_castsi512_ps(_mm512_maskz_set1_epi32(__mmask16((1u << c) - 1u), -1));
}
// fold32's tree: a[0] = p[0..15], a[1] = p[16..31], so q[j] = (p[j] + p[j + 8]) + (p[j + 16] +
// p[j + 24]) is (low + high half of a[0]) + (low + high half of a[1]); then avx2::fold8's steps.
NB_TARGET inline __m256 hi256(vf a) {
  return _mm512_castps512_ps256(_mm512_shuffle_f32x4(a, a, _MM_SHUFFLE(3, 2, 3, 2)));
}
NB_TARGET inline float vfold(const vf* a) {
  const __m256 q = _mm256_add_ps(_mm256_add_ps(_mm512_castps512_ps256(a[0]), hi256(a[0])),
                                 _mm256_add_ps(_mm512_castps512_ps256(a[1]), hi256(a[1])));
  const __m128 r = _mm_add_ps(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1));
  const __m128 t = _mm_add_ps(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehl_ps(t, t)));
}
NB_TARGET inline vf vloadf_n(const float* x, int64_t n) {  // lanes >= n: +0, not read
  return _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1u), x);
}
NB_TARGET inline void vstoref_n(float* x, vf v, int64_t n) {
  _mm512_mask_storeu_ps(x, __mmask16((1u << n) - 1u), v);
}
#include "csrc/cpu/norm_bwd_rows.inc"
#undef NB_TARGET
}  // namespace avx512
#pragma GCC diagnostic pop

// HIRES_LMM_CPU_NO_AVX512=1 (read at each call): the AVX2 rows even where AVX-512 is available
// (the tests compare both with the portable rows).
inline bool avx512_allowed() {
  const char* v = std::getenv("HIRES_LMM_CPU_NO_AVX512");
  return avx512::supported() && !(v != nullptr && std::strcmp(v, "1") == 0);
}

#endif

template <typename T>
void run(const NormBwdParams& p) {
  const int64_t D = p.dim;
  const T* dy = static_cast<const T*>(p.dy);
  const T* xs = static_cast<const T*>(p.x);
  const T* dres = static_cast<const T*>(p.dres);
  const T* wt = static_cast<const T*>(p.weight);
  T* dx = static_cast<T*>(p.dx);
  std::vector<float> w((D + kP - 1) / kP * kP, 0.f);  // zero-padded to whole 32-element blocks
  for (int64_t c = 0; c < D; ++c) w[c] = static_cast<float>(wt[c]);
  const float inv_d = 1.f / float(D);
  // rows [n0, n1) of one chunk into its partials pw, pb: the vector rows (AVX-512, else AVX2: the
  // same arithmetic, see norm_bwd_rows.inc) unless HIRES_LMM_CPU_TWIN=1 or the CPU lacks AVX2
#ifdef HIRES_X86
  const int vec = cpu_twin_forced() || !cpu::cpu_has_avx2() ? 0 : avx512_allowed() ? 2 : 1;
#else
  const int vec = 0;
#endif
  const auto chunk = [&](int64_t n0, int64_t n1, float* pw, float* pb, float* x, float* g) {
#ifdef HIRES_X86
    if (vec == 2) return avx512::chunk_rows<T>(p, w.data(), n0, n1, pw, pb);
    if (vec == 1) return avx2::chunk_rows<T>(p, w.data(), n0, n1, pw, pb);
#endif
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t c = 0; c < D; ++c) {
        x[c] = static_cast<float>(xs[n * D + c]);
        g[c] = static_cast<float>(dy[n * D + c]);
      }
      const float* xr = x;
      const float* gr = g;
      const float* wr = w.data();
      float mu = p.layer ? sum32(D, [&](int64_t c) { return xr[c]; }) * inv_d : 0.f;
      const float ss = sum32(D, [&](int64_t c) { return (xr[c] - mu) * (xr[c] - mu); });
      float rstd;
      if (std::isfinite(ss)) {
        rstd = 1.f / std::sqrt(ss * inv_d + p.eps);
      } else {  // fp32 overflow or a non-finite x: statistics in fp64, as the forward
        double mud = 0.0, ssd = 0.0;
        if (p.layer) {
          for (int64_t c = 0; c < D; ++c) mud += double(x[c]);
          mud /= double(D);
        }
        for (int64_t c = 0; c < D; ++c) ssd += (double(x[c]) - mud) * (double(x[c]) - mud);
        mu = float(mud);
        rstd = float(1.0 / std::sqrt(ssd / double(D) + double(p.eps)));
      }
      const float sg = p.layer ? sum32(D, [&](int64_t c) { return gr[c] * wr[c]; }) : 0.f;
      const float sgy = sum32(D, [&](int64_t c) { return gr[c] * wr[c] * ((xr[c] - mu) * rstd); });
      const float mg = p.layer ? sg * inv_d : 0.f;
      const float mgy = sgy * inv_d;
      // the element loop, its branches hoisted and its pointers unaliased so that it vectorizes
      T* __restrict dxn = dx + n * D;
      float* __restrict pwr = pw;
      float* __restrict pbr = pb;
      const auto elem = [&](auto has_res, auto layer) {
        const T* __restrict rn = has_res ? dres + n * D : nullptr;
        for (int64_t c = 0; c < D; ++c) {
          const float y = (xr[c] - mu) * rstd;
          float v = rstd * (gr[c] * wr[c] - mg - y * mgy);
          if constexpr (decltype(has_res)::value) v += static_cast<float>(rn[c]);
          dxn[c] = static_cast<T>(v);
          pwr[c] += gr[c] * (decltype(layer)::value ? y : round_to<T>(y));
          pbr[c] += gr[c];
        }
      };
      using Y = std::true_type;
      using N = std::false_type;
      if (dres != nullptr) {
        if (p.layer) elem(Y{}, Y{}); else elem(Y{}, N{});
      } else {
        if (p.layer) elem(N{}, Y{}); else elem(N{}, N{});
      }
    }
  };
  // stage 1: one run of chunks per task, each chunk's partial sums in its own workspace row, except
  // in the task that starts at chunk 0: it adds its chunks' partials (summed in a scratch row) to
  // workspace row 0 at once, in chunk order, so row 0 ends as stage 2's running sum over the
  // chunks [0, first_end): the same additions in the same order, without a workspace row per chunk.
  std::atomic<int64_t> first_end{0};
  if (p.chunks == 0) std::fill(p.partial, p.partial + 2 * D, 0.f);  // no rows: dweight = dbias = 0
  at::parallel_for(0, p.chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<float> x(vec ? 0 : D), g(vec ? 0 : D), part(cb == 0 ? 2 * D : 0);
    float* run0 = p.partial;
    if (cb == 0) std::fill(run0, run0 + 2 * D, 0.f);
    for (int64_t b = cb; b < ce; ++b) {
      float* pw = cb == 0 ? part.data() : p.partial + b * 2 * D;
      std::fill(pw, pw + 2 * D, 0.f);
      chunk(b * p.rows_per_chunk, std::min(p.rows, (b + 1) * p.rows_per_chunk), pw, pw + D, x.data(), g.data());
      if (cb == 0) {
        const float* __restrict q = pw;
        float* __restrict r = run0;
        for (int64_t j = 0; j < 2 * D; ++j) r[j] += q[j];
      }
    }
    if (cb == 0) first_end.store(ce);
  });
  // stage 2: per column, the running sum of row 0 plus the other chunks in order; a block of kCols
  // columns at a time (the column loop inside vectorizes; every column still sums its chunks 0, 1,
  // 2, ... in order)
  T* dw = static_cast<T*>(p.dweight);
  T* db = static_cast<T*>(p.dbias);
  constexpr int64_t kCols = 256;
  const int64_t b0 = std::max<int64_t>(first_end.load(), 1);
  at::parallel_for(0, (D + kCols - 1) / kCols, 4, [&](int64_t k0, int64_t k1) {
    float sw[kCols], sb[kCols];
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t c0 = k * kCols, nc = std::min(kCols, D - c0);
      std::copy(p.partial + c0, p.partial + c0 + nc, sw);
      std::copy(p.partial + D + c0, p.partial + D + c0 + nc, sb);
      for (int64_t b = b0; b < p.chunks; ++b) {
        const float* __restrict pw = p.partial + b * 2 * D + c0;
        const float* __restrict pb = pw + D;
        for (int64_t j = 0; j < nc; ++j) sw[j] += pw[j];
        for (int64_t j = 0; j < nc; ++j) sb[j] += pb[j];
      }
      for (int64_t j = 0; j < nc; ++j) dw[c0 + j] = static_cast<T>(sw[j]);
      if (db != nullptr)
        for (int64_t j = 0; j < nc; ++j) db[c0 + j] = static_cast<T>(sb[j]);
    }
  });
}

}  // namespace

void norm_bwd_cpu(const NormBwdParams& p, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return run<float>(p);
    case at::kHalf: return run<at::Half>(p);
    case at::kBFloat16: return run<at::BFloat16>(p);
    default: TORCH_CHECK(false, "norm_backward: unsupported dtype ", t);
  }
}

}  // namespace hires::deepstack
