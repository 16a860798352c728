#include "csrc/cpu/norm_bwd.h"

// No contraction of a * b + c into one FMA in this file: the AVX2 rows (FMA in their target) must
// round as the portable rows do, and a LayerNorm of width 1 must give dx = 0 exactly (g w - mean(g w)).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "csrc/cpu/avx2.h"
#include "csrc/cpu/cpu_path.h"

#ifndef HIRES_NB_R
#define HIRES_NB_R 2
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <type_traits>
#include <vector>

namespace hires::deepstack {
namespace {

template <typename T> inline float round_to(float v) { return static_cast<float>(static_cast<T>(v)); }

// Row statistics as sums of kP = 32 interleaved fp32 partials: p[j] sums the elements c = j mod 32
// of the full 32-element blocks, then the last D mod 32 elements are added to p[0], p[1], ..., and
// fold32 adds the 32 partials in a fixed tree. A single running sum is one dependent add per
// element (4 such row sums were most of this kernel's time); 32 partials are 4 independent 8-lane
// accumulators in the AVX2 rows. The order depends on D only (not on threads or the machine), and
// the portable and AVX2 rows follow it exactly, so they agree bitwise.
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


#ifdef HIRES_X86
using cpu::load8;
using cpu::round8;
using cpu::store8;

// fold32's tree on the 4 accumulators (accumulator k holds p[8k .. 8k + 7]), in registers:
// q[j] = (p[j] + p[j + 8]) + (p[j + 16] + p[j + 24]), then ((q0 + q4) + (q1 + q5)) +
// ((q2 + q6) + (q3 + q7)).
HIRES_AVX2 inline float fold4(const __m256 (&a)[4]) {
  const __m256 q = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
  const __m128 r = _mm_add_ps(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1));  // q[j] + q[j + 4]
  const __m128 t = _mm_add_ps(r, _mm_movehdup_ps(r));                                  // r0 + r1, r2 + r3
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehl_ps(t, t)));
}

// The statistics of one row: mean (LayerNorm), 1 / std, mean(g) (LayerNorm), mean(g * y).
struct RowStats {
  float mu, rstd, mg, mgy;
};

// One row's statistics with AVX2, the portable row's arithmetic lane for lane (mul and add, no FMA,
// sums in sum32's order), reading x and dy in T: the same results as the portable path.
// The last D mod 32 elements (xt, gt: fp32, zero-padded to 32; w is zero-padded to a multiple of
// 32) go into the accumulators as whole vectors, the lanes past the row masked to +0: adding +0 to
// a partial changes nothing (a partial that starts at +0 is never -0), so this is sum32's tail.
template <typename T, bool kLayer>
HIRES_AVX2 RowStats stats_avx2(const T* xn, const T* gn, const float* w, int64_t D, float inv_d,
                               float eps) {
  const int64_t D32 = D / kP * kP, tail = D - D32;
  const __m256 z = _mm256_setzero_ps();
  alignas(32) float xt[kP], gt[kP];
  __m256 m[4];
  if (tail > 0) {
    for (int64_t j = 0; j < kP; ++j) {
      xt[j] = j < tail ? static_cast<float>(xn[D32 + j]) : 0.f;
      gt[j] = j < tail ? static_cast<float>(gn[D32 + j]) : 0.f;
    }
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int k = 0; k < 4; ++k)
      m[k] = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(int(tail - 8 * k)), lane));
  }
  float mu = 0.f;
  if (kLayer) {
    __m256 a[4] = {z, z, z, z};
    for (int64_t c = 0; c < D32; c += kP)
      for (int k = 0; k < 4; ++k) a[k] = _mm256_add_ps(a[k], load8(xn + c + 8 * k));
    if (tail > 0)
      for (int k = 0; k < 4; ++k) a[k] = _mm256_add_ps(a[k], _mm256_load_ps(xt + 8 * k));  // pad: +0
    mu = fold4(a) * inv_d;
  }
  __m256 mv = _mm256_set1_ps(mu);
  float ss;
  {
    __m256 a[4] = {z, z, z, z};
    for (int64_t c = 0; c < D32; c += kP)
      for (int k = 0; k < 4; ++k) {
        const __m256 d = _mm256_sub_ps(load8(xn + c + 8 * k), mv);
        a[k] = _mm256_add_ps(a[k], _mm256_mul_ps(d, d));
      }
    if (tail > 0)
      for (int k = 0; k < 4; ++k) {
        const __m256 d = _mm256_sub_ps(_mm256_load_ps(xt + 8 * k), mv);
        a[k] = _mm256_add_ps(a[k], _mm256_and_ps(_mm256_mul_ps(d, d), m[k]));
      }
    ss = fold4(a);
  }
  float rstd;
  if (std::isfinite(ss)) {
    rstd = 1.f / std::sqrt(ss * inv_d + eps);
  } else {  // fp32 overflow or a non-finite x: statistics in fp64, as the forward
    double mud = 0.0, ssd = 0.0;
    if (kLayer) {
      for (int64_t c = 0; c < D; ++c) mud += double(static_cast<float>(xn[c]));
      mud /= double(D);
    }
    for (int64_t c = 0; c < D; ++c) {
      const double d = double(static_cast<float>(xn[c])) - mud;
      ssd += d * d;
    }
    mu = float(mud);
    rstd = float(1.0 / std::sqrt(ssd / double(D) + double(eps)));
    mv = _mm256_set1_ps(mu);
  }
  const __m256 rv = _mm256_set1_ps(rstd);
  float sg = 0.f, sgy;
  {
    __m256 ag[4] = {z, z, z, z}, agy[4] = {z, z, z, z};
    for (int64_t c = 0; c < D32; c += kP)
      for (int k = 0; k < 4; ++k) {
        const int64_t e = c + 8 * k;
        const __m256 gw = _mm256_mul_ps(load8(gn + e), _mm256_loadu_ps(w + e));
        if (kLayer) ag[k] = _mm256_add_ps(ag[k], gw);
        agy[k] = _mm256_add_ps(agy[k], _mm256_mul_ps(gw, _mm256_mul_ps(_mm256_sub_ps(load8(xn + e), mv), rv)));
      }
    if (tail > 0)
      for (int k = 0; k < 4; ++k) {
        const __m256 gw = _mm256_mul_ps(_mm256_load_ps(gt + 8 * k), _mm256_loadu_ps(w + D32 + 8 * k));
        const __m256 y = _mm256_mul_ps(_mm256_sub_ps(_mm256_load_ps(xt + 8 * k), mv), rv);
        if (kLayer) ag[k] = _mm256_add_ps(ag[k], _mm256_and_ps(gw, m[k]));
        agy[k] = _mm256_add_ps(agy[k], _mm256_and_ps(_mm256_mul_ps(gw, y), m[k]));
      }
    if (kLayer) sg = fold4(ag);
    sgy = fold4(agy);
  }
  return {mu, rstd, kLayer ? sg * inv_d : 0.f, sgy * inv_d};
}

// Stage 1 for R consecutive rows: their statistics one row after the other (independent: the core
// overlaps them), then dx of the R rows and their dweight / dbias terms, added to the chunk's
// partials in row order (pw[c] + t_0 + t_1 + ...: the sequential order) with one load and one
// store of the partials per R rows.
template <typename T, bool kLayer, bool kRes, int R>
HIRES_AVX2 void rows_avx2(const T* xn, const T* gn, const T* rn, const float* w, T* dxn, float* pw,
                          float* pb, int64_t D, float inv_d, float eps) {
  const int64_t D8 = D / 8 * 8;
  RowStats st[R];
  for (int r = 0; r < R; ++r) st[r] = stats_avx2<T, kLayer>(xn + r * D, gn + r * D, w, D, inv_d, eps);
  __m256 mv[R], rv[R], mgv[R], mgyv[R];
  for (int r = 0; r < R; ++r) {
    mv[r] = _mm256_set1_ps(st[r].mu);
    rv[r] = _mm256_set1_ps(st[r].rstd);
    mgv[r] = _mm256_set1_ps(st[r].mg);
    mgyv[r] = _mm256_set1_ps(st[r].mgy);
  }
  int64_t c = 0;
  for (; c < D8; c += 8) {
    const __m256 wv = _mm256_loadu_ps(w + c);
    __m256 sw = _mm256_loadu_ps(pw + c), sb = _mm256_loadu_ps(pb + c);
    for (int r = 0; r < R; ++r) {
      const int64_t e = r * D + c;
      const __m256 g = load8(gn + e);
      const __m256 y = _mm256_mul_ps(_mm256_sub_ps(load8(xn + e), mv[r]), rv[r]);
      __m256 v = _mm256_mul_ps(rv[r], _mm256_sub_ps(_mm256_sub_ps(_mm256_mul_ps(g, wv), mgv[r]),
                                                    _mm256_mul_ps(y, mgyv[r])));
      if (kRes) v = _mm256_add_ps(v, load8(rn + e));
      store8(dxn + e, v);
      sw = _mm256_add_ps(sw, _mm256_mul_ps(g, kLayer ? y : round8<T>(y)));
      sb = _mm256_add_ps(sb, g);
    }
    _mm256_storeu_ps(pw + c, sw);
    _mm256_storeu_ps(pb + c, sb);
  }
  for (; c < D; ++c)
    for (int r = 0; r < R; ++r) {
      const int64_t e = r * D + c;
      const float g = static_cast<float>(gn[e]);
      const float y = (static_cast<float>(xn[e]) - st[r].mu) * st[r].rstd;
      float v = st[r].rstd * (g * w[c] - st[r].mg - y * st[r].mgy);
      if (kRes) v += static_cast<float>(rn[e]);
      dxn[e] = static_cast<T>(v);
      pw[c] += g * (kLayer ? y : round_to<T>(y));
      pb[c] += g;
    }
}

template <typename T>
bool stage1_avx2(const NormBwdParams& p, const float* w) {
  if (!cpu::cpu_has_avx2() || cpu_twin_forced()) return false;  // HIRES_LMM_CPU_TWIN=1: portable rows
  const int64_t D = p.dim;
  const T* dy = static_cast<const T*>(p.dy);
  const T* xs = static_cast<const T*>(p.x);
  const T* dres = static_cast<const T*>(p.dres);
  T* dx = static_cast<T*>(p.dx);
  const float inv_d = 1.f / float(D);
  constexpr int kR = 4;  // rows per rows_avx2 call (2 measured the same at width 192)
  const auto pick = [&](auto rows) {
    constexpr int n = decltype(rows)::value;
    return p.layer ? (dres ? &rows_avx2<T, true, true, n> : &rows_avx2<T, true, false, n>)
                   : (dres ? &rows_avx2<T, false, true, n> : &rows_avx2<T, false, false, n>);
  };
  const auto rowsR = pick(std::integral_constant<int, kR>{});
  const auto rows1 = pick(std::integral_constant<int, 1>{});
  at::parallel_for(0, p.chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t b = cb; b < ce; ++b) {
      float* pw = p.partial + b * 2 * D;
      float* pb = pw + D;
      std::fill(pw, pw + 2 * D, 0.f);
      const int64_t r1 = std::min(p.rows, (b + 1) * p.rows_per_chunk);
      int64_t n = b * p.rows_per_chunk;
      for (; n + kR <= r1; n += kR)
        rowsR(xs + n * D, dy + n * D, dres ? dres + n * D : nullptr, w, dx + n * D, pw, pb, D, inv_d, p.eps);
      for (; n < r1; ++n)
        rows1(xs + n * D, dy + n * D, dres ? dres + n * D : nullptr, w, dx + n * D, pw, pb, D, inv_d, p.eps);
    }
  });
  return true;
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
  // stage 1: one chunk of rows per task, its partial sums in its own workspace row (AVX2 rows
  // where the CPU has it: the same arithmetic, see row_avx2)
#ifdef HIRES_X86
  const bool done = stage1_avx2<T>(p, w.data());
#else
  const bool done = false;
#endif
  if (!done) at::parallel_for(0, p.chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<float> x(D), g(D);
    for (int64_t b = cb; b < ce; ++b) {
      float* pw = p.partial + b * 2 * D;
      float* pb = pw + D;
      std::fill(pw, pw + 2 * D, 0.f);
      const int64_t r1 = std::min(p.rows, (b + 1) * p.rows_per_chunk);
      for (int64_t n = b * p.rows_per_chunk; n < r1; ++n) {
        for (int64_t c = 0; c < D; ++c) {
          x[c] = static_cast<float>(xs[n * D + c]);
          g[c] = static_cast<float>(dy[n * D + c]);
        }
        const float* xr = x.data();
        const float* gr = g.data();
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
    }
  });
  // stage 2: per column, the chunks in order; a block of kCols columns at a time (the column loop
  // inside vectorizes; every column still sums its chunks 0, 1, 2, ... in order)
  T* dw = static_cast<T*>(p.dweight);
  T* db = static_cast<T*>(p.dbias);
  constexpr int64_t kCols = 256;
  at::parallel_for(0, (D + kCols - 1) / kCols, 4, [&](int64_t k0, int64_t k1) {
    float sw[kCols], sb[kCols];
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t c0 = k * kCols, nc = std::min(kCols, D - c0);
      std::fill(sw, sw + nc, 0.f);
      std::fill(sb, sb + nc, 0.f);
      for (int64_t b = 0; b < p.chunks; ++b) {
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
