#include "csrc/cpu/dwconv_bwd.h"

// No contraction of a * b + c into one FMA in this file: the AVX2 loops (FMA in their target) must
// round as the portable twin does (a product, then a sum), so that the two agree bitwise.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "csrc/cpu/avx2.h"
#include "csrc/cpu/cpu_path.h"

#include <ATen/Parallel.h>
#include <algorithm>
#include <type_traits>
#include <vector>

namespace hires::convnext {
namespace {

// stage 2: the chunks' partial sums added in chunk order, rounded to T
template <typename T>
void reduce_chunks(const DwconvBwdParams& p) {
  const int64_t C = p.C;
  T* dw = static_cast<T*>(p.dweight);
  T* db = static_cast<T*>(p.dbias);
  for (int64_t k = 0; k <= kDwTaps; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      float s = 0.f;
      for (int64_t ch = 0; ch < p.chunks; ++ch) s += p.partial[(ch * (kDwTaps + 1) + k) * C + c];
      if (k < kDwTaps) dw[c * kDwTaps + k] = static_cast<T>(s);
      else if (db != nullptr) db[c] = static_cast<T>(s);
    }
  }
}

template <typename T>
void run_twin(const DwconvBwdParams& p) {
  const int64_t B = p.B, H = p.H, W = p.W, C = p.C;
  const T* x = static_cast<const T*>(p.x);
  const T* wt = static_cast<const T*>(p.weight);
  constexpr int R = kDwK / 2;
  // stage 1: per chunk, acc[k][c] over the chunk's rows in (row, column) order, as the CUDA thread
  at::parallel_for(0, p.chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<float> xf(C);
    for (int64_t ch = cb; ch < ce; ++ch) {
      float* acc = p.partial + ch * (kDwTaps + 1) * C;
      std::fill(acc, acc + (kDwTaps + 1) * C, 0.f);
      const int64_t r1 = std::min(B * H, (ch + 1) * p.rows_per_chunk);
      for (int64_t r = ch * p.rows_per_chunk; r < r1; ++r) {
        const int64_t b = r / H, h = r % H;
        for (int64_t w = 0; w < W; ++w) {
          const float* g = p.dy + (r * W + w) * C;
          for (int i = 0; i < kDwK; ++i) {
            const int64_t hh = h + i - R;
            if (hh < 0 || hh >= H) continue;
            for (int j = 0; j < kDwK; ++j) {
              const int64_t ww = w + j - R;
              if (ww < 0 || ww >= W) continue;
              const T* xs = x + ((b * H + hh) * W + ww) * C;
              float* a = acc + (i * kDwK + j) * C;
              for (int64_t c = 0; c < C; ++c) a[c] += g[c] * static_cast<float>(xs[c]);
            }
          }
          float* a = acc + kDwTaps * C;
          for (int64_t c = 0; c < C; ++c) a[c] += g[c];
        }
      }
    }
  });
  reduce_chunks<T>(p);
  // dx: the transposed conv, taps in fixed order
  std::vector<float> wf(C * kDwTaps);
  for (int64_t i = 0; i < C * kDwTaps; ++i) wf[i] = static_cast<float>(wt[i]);
  T* dx = static_cast<T*>(p.dx);
  at::parallel_for(0, B * H, 1, [&](int64_t rb, int64_t re) {
    std::vector<float> s(C);
    for (int64_t r = rb; r < re; ++r) {
      const int64_t b = r / H, h = r % H;
      for (int64_t w = 0; w < W; ++w) {
        std::fill(s.begin(), s.end(), 0.f);
        for (int i = 0; i < kDwK; ++i) {
          const int64_t hh = h + R - i;
          if (hh < 0 || hh >= H) continue;
          for (int j = 0; j < kDwK; ++j) {
            const int64_t ww = w + R - j;
            if (ww < 0 || ww >= W) continue;
            const float* g = p.dy + ((b * H + hh) * W + ww) * C;
            for (int64_t c = 0; c < C; ++c) s[c] += g[c] * wf[c * kDwTaps + i * kDwK + j];
          }
        }
        for (int64_t c = 0; c < C; ++c) dx[(r * W + w) * C + c] = static_cast<T>(s[c]);
      }
    }
  });
}

#ifdef HIRES_X86
// The AVX2 loops (C % 8 == 0): the twin's formula, per (tap, channel) the same sequence of
// fp32 products and sums, 8 channels per vector, so the results are bitwise the twin's.
//   stage 1: per chunk row r and tap row i, the 7 accumulators of (i, j = 0..6) for 8 channels
//     stay in registers while the row's pixels w go by in order (each accumulator still sees the
//     pixels in (row, column) order, as the twin's); the 7 input rows of r converted to fp32 once.
//   dx: per pixel and 8 channels, the 49 taps in the twin's (i, j) order, weights transposed to
//     (tap, C) once.
template <typename T>
HIRES_AVX2 void partials_avx2(const DwconvBwdParams& p, int64_t ch, float* rows_f) {
  using namespace hires::cpu;
  const int64_t H = p.H, W = p.W, C = p.C;
  constexpr int R = kDwK / 2;
  const T* x = static_cast<const T*>(p.x);
  float* acc = p.partial + ch * (kDwTaps + 1) * C;
  std::fill(acc, acc + (kDwTaps + 1) * C, 0.f);
  const int64_t r1 = std::min(p.B * H, (ch + 1) * p.rows_per_chunk);
  for (int64_t r = ch * p.rows_per_chunk; r < r1; ++r) {
    const int64_t b = r / H, h = r % H;
    const float* g = p.dy + r * W * C;
    for (int64_t c = 0; c < C; c += 8) {          // bias: sum of g over the row's pixels
      __m256 a = _mm256_loadu_ps(acc + kDwTaps * C + c);
      for (int64_t w = 0; w < W; ++w) a = _mm256_add_ps(a, _mm256_loadu_ps(g + w * C + c));
      _mm256_storeu_ps(acc + kDwTaps * C + c, a);
    }
    for (int i = 0; i < kDwK; ++i) {
      const int64_t hh = h + i - R;
      if (hh < 0 || hh >= H) continue;
      const float* xr;
      if constexpr (std::is_same_v<T, float>) {
        xr = x + (b * H + hh) * W * C;
      } else {
        const T* src = x + (b * H + hh) * W * C;
        for (int64_t e = 0; e < W * C; e += 8) _mm256_storeu_ps(rows_f + e, load8(src + e));
        xr = rows_f;
      }
      for (int64_t c = 0; c < C; c += 8) {
        float* a = acc + i * kDwK * C + c;
        __m256 a0 = _mm256_loadu_ps(a), a1 = _mm256_loadu_ps(a + C), a2 = _mm256_loadu_ps(a + 2 * C),
               a3 = _mm256_loadu_ps(a + 3 * C), a4 = _mm256_loadu_ps(a + 4 * C),
               a5 = _mm256_loadu_ps(a + 5 * C), a6 = _mm256_loadu_ps(a + 6 * C);
        // columns w in [R, W - R) read all 7 taps: no column checks there
        const int64_t lo = std::min<int64_t>(R, W), hi = std::max<int64_t>(lo, W - R);
#define HIRES_TAP(J, A, CHECK)  /* tap j reads column w + j - R */ \
  if (!(CHECK) || (w + (J) - R >= 0 && w + (J) - R < W))                \
    A = _mm256_add_ps(A, _mm256_mul_ps(gv, _mm256_loadu_ps(xr + (w + (J) - R) * C + c)));
#define HIRES_TAPS(CHECK)                                                                   \
  {                                                                                         \
    const __m256 gv = _mm256_loadu_ps(g + w * C + c);                                       \
    HIRES_TAP(0, a0, CHECK) HIRES_TAP(1, a1, CHECK) HIRES_TAP(2, a2, CHECK)                 \
    HIRES_TAP(3, a3, CHECK) HIRES_TAP(4, a4, CHECK) HIRES_TAP(5, a5, CHECK)                 \
    HIRES_TAP(6, a6, CHECK)                                                                 \
  }
        int64_t w = 0;
        for (; w < lo; ++w) HIRES_TAPS(true)
        for (; w < hi; ++w) HIRES_TAPS(false)
        for (; w < W; ++w) HIRES_TAPS(true)
#undef HIRES_TAPS
#undef HIRES_TAP
        _mm256_storeu_ps(a, a0); _mm256_storeu_ps(a + C, a1); _mm256_storeu_ps(a + 2 * C, a2);
        _mm256_storeu_ps(a + 3 * C, a3); _mm256_storeu_ps(a + 4 * C, a4);
        _mm256_storeu_ps(a + 5 * C, a5); _mm256_storeu_ps(a + 6 * C, a6);
      }
    }
  }
}

// dx of pixels w0 .. w0 + NP - 1 of row r, channels c .. c + 7: NP independent accumulation
// chains (one chain is 49 dependent adds: latency-bound), each in the twin's (i, j) tap order.
// kInterior: every tap column of the NP pixels lies inside the row (no column checks).
template <typename T, int NP, bool kInterior>
HIRES_AVX2 inline void dx_pixels(const DwconvBwdParams& p, const float* wT, int64_t b, int64_t h,
                                 int64_t r, int64_t w0, int64_t c) {
  using namespace hires::cpu;
  const int64_t H = p.H, W = p.W, C = p.C;
  constexpr int R = kDwK / 2;
  __m256 s[NP];
  for (int q = 0; q < NP; ++q) s[q] = _mm256_setzero_ps();
  for (int i = 0; i < kDwK; ++i) {
    const int64_t hh = h + R - i;
    if (hh < 0 || hh >= H) continue;
    const float* grow = p.dy + (b * H + hh) * W * C + c;
    const float* wr = wT + i * kDwK * C + c;
    for (int j = 0; j < kDwK; ++j) {
      const __m256 wv = _mm256_loadu_ps(wr + j * C);
      for (int q = 0; q < NP; ++q) {
        const int64_t ww = w0 + q + R - j;
        if (!kInterior && (ww < 0 || ww >= W)) continue;
        s[q] = _mm256_add_ps(s[q], _mm256_mul_ps(_mm256_loadu_ps(grow + ww * C), wv));
      }
    }
  }
  T* dx = static_cast<T*>(p.dx) + (r * W + w0) * C + c;
  for (int q = 0; q < NP; ++q) store8(dx + q * C, s[q]);
}

template <typename T>
HIRES_AVX2 void dx_rows_avx2(const DwconvBwdParams& p, const float* wT, int64_t rb, int64_t re) {
  const int64_t H = p.H, W = p.W, C = p.C;
  constexpr int R = kDwK / 2, NP = 4;
  for (int64_t r = rb; r < re; ++r) {
    const int64_t b = r / H, h = r % H;
    for (int64_t c = 0; c < C; c += 8) {
      int64_t w = 0;
      for (; w + NP <= W; w += NP) {
        if (w >= R && w + NP - 1 + R < W) dx_pixels<T, NP, true>(p, wT, b, h, r, w, c);
        else dx_pixels<T, NP, false>(p, wT, b, h, r, w, c);
      }
      switch (W - w) {
        case 3: dx_pixels<T, 3, false>(p, wT, b, h, r, w, c); break;
        case 2: dx_pixels<T, 2, false>(p, wT, b, h, r, w, c); break;
        case 1: dx_pixels<T, 1, false>(p, wT, b, h, r, w, c); break;
        default: break;
      }
    }
  }
}

// reduce_chunks with 8 channels per vector: the same sums in the same (chunk) order
template <typename T>
HIRES_AVX2 void reduce_chunks_avx2(const DwconvBwdParams& p) {
  const int64_t C = p.C;
  T* dw = static_cast<T*>(p.dweight);
  T* db = static_cast<T*>(p.dbias);
  alignas(32) float v[8];
  for (int64_t k = 0; k <= kDwTaps; ++k) {
    if (k == kDwTaps && db == nullptr) break;
    for (int64_t c = 0; c < C; c += 8) {
      __m256 s = _mm256_setzero_ps();
      for (int64_t ch = 0; ch < p.chunks; ++ch)
        s = _mm256_add_ps(s, _mm256_loadu_ps(p.partial + (ch * (kDwTaps + 1) + k) * C + c));
      _mm256_store_ps(v, s);
      for (int l = 0; l < 8; ++l) {
        if (k < kDwTaps) dw[(c + l) * kDwTaps + k] = static_cast<T>(v[l]);
        else db[c + l] = static_cast<T>(v[l]);
      }
    }
  }
}

template <typename T>
void run_avx2(const DwconvBwdParams& p) {
  const int64_t C = p.C;
  const int64_t row_elems = std::is_same_v<T, float> ? 0 : p.W * C;
  at::parallel_for(0, p.chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<float> rows_f(row_elems);
    for (int64_t ch = cb; ch < ce; ++ch) partials_avx2<T>(p, ch, rows_f.data());
  });
  reduce_chunks_avx2<T>(p);
  std::vector<float> wT(kDwTaps * C);               // (tap, C)
  const T* wt = static_cast<const T*>(p.weight);
  for (int64_t c = 0; c < C; ++c)
    for (int k = 0; k < kDwTaps; ++k) wT[k * C + c] = static_cast<float>(wt[c * kDwTaps + k]);
  at::parallel_for(0, p.B * p.H, 1, [&](int64_t rb, int64_t re) { dx_rows_avx2<T>(p, wT.data(), rb, re); });
}
#endif

template <typename T>
void run(const DwconvBwdParams& p) {
#ifdef HIRES_X86
  if (p.C % 8 == 0 && !cpu_twin_forced() && hires::cpu::cpu_has_avx2()) return run_avx2<T>(p);
#endif
  run_twin<T>(p);
}

}  // namespace

void dwconv_bwd_cpu(const DwconvBwdParams& p, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return run<float>(p);
    case at::kHalf: return run<at::Half>(p);
    case at::kBFloat16: return run<at::BFloat16>(p);
    default: TORCH_CHECK(false, "dwconv_backward: unsupported dtype ", t);
  }
}

}  // namespace hires::convnext
