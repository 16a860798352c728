#include "csrc/cpu/deepstack.h"

#include <ATen/Dispatch.h>
#include <algorithm>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "csrc/cpu/avx2.h"
#include "csrc/cpu/cpu_path.h"

namespace hires::deepstack {
namespace {

template <typename T> inline float round_to(float v) { return static_cast<float>(static_cast<T>(v)); }

int64_t find_visual(const int64_t* index, int64_t n, int64_t row) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (index[mid] < row) lo = mid + 1; else hi = mid;
  }
  return (lo < n && index[lo] == row) ? lo : -1;
}

// Sums with kLanes independent accumulators so the compiler can vectorize them (a single fp32
// accumulator is a serial dependency chain); the lanes are added at the end.
constexpr int kLanes = 16;

float sum_of(const float* x, int64_t n, float shift, bool square) {
  float acc[kLanes] = {};
  int64_t c = 0;
  if (square) {
    for (; c + kLanes <= n; c += kLanes)
      for (int j = 0; j < kLanes; ++j) acc[j] += (x[c + j] - shift) * (x[c + j] - shift);
    for (; c < n; ++c) acc[0] += (x[c] - shift) * (x[c] - shift);
  } else {
    for (; c + kLanes <= n; c += kLanes)
      for (int j = 0; j < kLanes; ++j) acc[j] += x[c + j];
    for (; c < n; ++c) acc[0] += x[c];
  }
  float s = 0.f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// The fp32 statistic overflowed (|x| > ~1.8e19, or a non-finite x): redo the row in fp64,
// which cannot overflow for finite fp32 input (README "Non-finite values"); rare, so the
// common path stays fp32. A non-finite x still gives what IEEE arithmetic gives.
template <typename T>
void norm_row_f64(const float* x, int64_t D, Norm norm, const float* w, const float* b, float eps, T* o) {
  double sd = 0.0;
  if (norm == Norm::kLayer)
    for (int64_t c = 0; c < D; ++c) sd += x[c];
  const double mean = sd / double(D);
  double ssd = 0.0;
  for (int64_t c = 0; c < D; ++c) ssd += (x[c] - mean) * (x[c] - mean);
  const double rstd = 1.0 / std::sqrt(ssd / double(D) + double(eps));
  if (norm == Norm::kRms) {
    for (int64_t c = 0; c < D; ++c) o[c] = static_cast<T>(w[c] * round_to<T>(static_cast<float>(x[c] * rstd)));
  } else {
    for (int64_t c = 0; c < D; ++c) o[c] = static_cast<T>(static_cast<float>((x[c] - mean) * rstd) * w[c] + b[c]);
  }
}

template <typename T, typename E>
void run(const InjectNormParams& p, Norm norm) {
  const int64_t D = p.dim;
  const T* hidden = static_cast<const T*>(p.hidden);
  const E* embeds = static_cast<const E*>(p.embeds);
  T* normed = static_cast<T*>(p.normed);
  T* injected = static_cast<T*>(p.injected);
  // weight and bias once in fp32
  std::vector<float> w(norm == Norm::kNone ? 0 : D), b(D, 0.f);
  for (int64_t c = 0; c < int64_t(w.size()); ++c) w[c] = static_cast<float>(static_cast<const T*>(p.weight)[c]);
  if (p.bias != nullptr)
    for (int64_t c = 0; c < D; ++c) b[c] = static_cast<float>(static_cast<const T*>(p.bias)[c]);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1));
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> x(D);
    for (int64_t row = begin; row < end; ++row) {
      // 1. load; 2. inject with HF's roundings
      const T* h = hidden + row * p.hidden_stride;
      const int64_t r = p.num_visual > 0 ? find_visual(p.index, p.num_visual, row) : -1;
      if (norm == Norm::kNone && r < 0) {  // plain copy of a text row: no conversion needed
        std::memcpy(injected + row * D, h, sizeof(T) * D);
        continue;
      }
      for (int64_t c = 0; c < D; ++c) x[c] = static_cast<float>(h[c]);
      if (r >= 0) {
        const E* e = embeds + r * p.embeds_stride;
        for (int64_t c = 0; c < D; ++c)
          x[c] = round_to<T>(x[c] + round_to<T>(static_cast<float>(e[c])));
      }
      if (injected != nullptr) {
        T* o = injected + row * D;
        for (int64_t c = 0; c < D; ++c) o[c] = static_cast<T>(x[c]);
      }
      if (norm == Norm::kNone) continue;
      // 3. fp32 statistics (two-pass variance for LayerNorm); 4. normalize
      const float shift = norm == Norm::kLayer ? sum_of(x.data(), D, 0.f, false) / float(D) : 0.f;
      const float var = sum_of(x.data(), D, shift, true) / float(D);
      T* o = normed + row * D;
      if (!std::isfinite(var)) {
        norm_row_f64<T>(x.data(), D, norm, w.data(), b.data(), p.eps, o);
        continue;
      }
      const float rstd = 1.f / std::sqrt(var + p.eps);
      if (norm == Norm::kRms) {
        for (int64_t c = 0; c < D; ++c) o[c] = static_cast<T>(w[c] * round_to<T>(x[c] * rstd));
      } else {
        for (int64_t c = 0; c < D; ++c) o[c] = static_cast<T>((x[c] - shift) * rstd * w[c] + b[c]);
      }
    }
  });
}

#ifdef HIRES_X86
// Default CPU path (AVX2): the twin's row algorithm and roundings element by element
// (round_to<T> of the embedding and of the sum, RMS: w * round_to<T>(x * rstd), LayerNorm:
// ((x - mean) * rstd) * w + b with the last multiply-add fused), 8 lanes at a time (bf16: 16).
// The norm reads its input row in T (x itself, or the injected row it has just written: exactly
// the twin's fp32 x, a T value), converting at each load, in two passes over a row that stays in
// cache (no fp32 copy of it): the statistics, then the normalization. fp32 statistics summed in
// 4 x 8 lanes; LayerNorm's are shifted-data ones (below), more accurate than the twin's on rows
// far from zero, otherwise equal up to the summation order (the last bits of rstd). A row whose
// statistic is not finite takes the twin's fp64 redo. Rows split over at::parallel_for, at least
// kMinTaskElems elements per task: with the extension built with OpenMP, a second thread at 32K
// elements (8 x 4096) made a LayerNorm slower than one thread here (20-31 us vs 14-21), at 128K it
// paid (48 -> 34 us).
constexpr int64_t kMinTaskElems = int64_t(1) << 16;
constexpr bool kSplit16 = true;  // bf16: the shuffle-free 16-element blocks below

// bf16, 16 elements per 256-bit load split without shuffles (AVX2's bf16 -> fp32 widening is a
// shuffle per 8 elements and pass; with it, bf16 rows ran slower than fp32 rows here): ev holds
// the even elements 0, 2, .., 14 (shifted up), od the odd ones 1, 3, .., 15 (masked). The sums do
// not care about the order; the normalization reads weight and bias in the same even/odd order
// (permuted once per call) and store16 interleaves the rounded results back without a shuffle.
HIRES_AVX2 inline void split16(const c10::BFloat16* x, __m256& ev, __m256& od) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  ev = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  od = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xffff0000u))));
}
// cpu::bf16_round_bits without its NaN blend: exact for every value these rows produce. A NaN
// here comes from a bf16 input (x, weight, bias: fp32 bits whose low 16 bits are 0, a payload
// that arithmetic keeps) or from an invalid operation (the default NaN 0x7fc00000, low bits 0),
// the statistics being finite on this path; adding at most 0x8000 to low bits 0 cannot carry
// into the exponent, so a NaN stays a NaN.
HIRES_AVX2 inline __m256i bf16_round_bits_lo0(__m256 x) {
  const __m256i b = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  return _mm256_and_si256(r, _mm256_set1_epi32(int(0xffff0000u)));
}
HIRES_AVX2 inline __m256 bf16_round_lo0(__m256 x) { return _mm256_castsi256_ps(bf16_round_bits_lo0(x)); }
HIRES_AVX2 inline void store16(c10::BFloat16* o, __m256 ev, __m256 od) {
  const __m256i r = _mm256_or_si256(_mm256_srli_epi32(bf16_round_bits_lo0(ev), 16), bf16_round_bits_lo0(od));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), r);
}
// v (16 values of a bf16 block, in element order) as split16 orders them: even, then odd
inline void permute16(const float* v, float* out) {
  for (int j = 0; j < 8; ++j) {
    out[j] = v[2 * j];
    out[8 + j] = v[2 * j + 1];
  }
}

// d = x - shift: sum of d^2 (returned) and, when sum_d is given, sum of d, in 4 x 8 fp32 lanes
template <typename T>
HIRES_AVX2 float lane_sum_sq(const T* x, int64_t D, float shift, float* sum_d) {
  using cpu::load8;
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, s0 = a0, s1 = a0;
  int64_t c = 0;
  for (; c + 32 <= D; c += 32) {
    __m256 v0, v1, v2, v3;
    if constexpr (std::is_same_v<T, c10::BFloat16> && kSplit16) {
      split16(x + c, v0, v1);
      split16(x + c + 16, v2, v3);
    } else {
      v0 = load8(x + c); v1 = load8(x + c + 8); v2 = load8(x + c + 16); v3 = load8(x + c + 24);
    }
    v0 = _mm256_sub_ps(v0, sh); v1 = _mm256_sub_ps(v1, sh); v2 = _mm256_sub_ps(v2, sh); v3 = _mm256_sub_ps(v3, sh);
    a0 = _mm256_fmadd_ps(v0, v0, a0); a1 = _mm256_fmadd_ps(v1, v1, a1);
    a2 = _mm256_fmadd_ps(v2, v2, a2); a3 = _mm256_fmadd_ps(v3, v3, a3);
    if (sum_d != nullptr) { s0 = _mm256_add_ps(s0, _mm256_add_ps(v0, v1)); s1 = _mm256_add_ps(s1, _mm256_add_ps(v2, v3)); }
  }
  for (; c + 8 <= D; c += 8) {
    const __m256 v = _mm256_sub_ps(load8(x + c), sh);
    a0 = _mm256_fmadd_ps(v, v, a0);
    if (sum_d != nullptr) s0 = _mm256_add_ps(s0, v);
  }
  float s = cpu::hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  float sd = cpu::hsum8(_mm256_add_ps(s0, s1));
  for (; c < D; ++c) {
    const float v = static_cast<float>(x[c]) - shift;
    s += v * v;
    sd += v;
  }
  if (sum_d != nullptr) *sum_d = sd;
  return s;
}

// The first index entry >= row (index sorted).
int64_t first_visual_at_or_after(const int64_t* index, int64_t n, int64_t row) {
  return std::lower_bound(index, index + n, row) - index;
}

template <typename T, typename E>
HIRES_AVX2 void norm_rows_avx2(const InjectNormParams& p, Norm norm, const float* w, const float* b,
                               const float* wp, const float* bp, int64_t begin, int64_t end, T* xbuf) {
  using cpu::load8;
  using cpu::round8;
  using cpu::store8;
  const int64_t D = p.dim, D8 = D / 8 * 8;
  const T* hidden = static_cast<const T*>(p.hidden);
  const E* embeds = static_cast<const E*>(p.embeds);
  T* normed = static_cast<T*>(p.normed);
  T* injected = static_cast<T*>(p.injected);
  // the visual rows of [begin, end) are index[k..] in order: one search per chunk
  int64_t k = p.num_visual > 0 ? first_visual_at_or_after(p.index, p.num_visual, begin) : 0;
  for (int64_t row = begin; row < end; ++row) {
    const T* h = hidden + row * p.hidden_stride;
    const bool visual = k < p.num_visual && p.index[k] == row;
    const T* x = h;  // the norm's input row, in T
    if (visual) {
      const E* e = embeds + (k++) * p.embeds_stride;
      T* o = injected != nullptr ? injected + row * D : xbuf;
      int64_t c = 0;
      for (; c < D8; c += 8) store8(o + c, _mm256_add_ps(load8(h + c), round8<T>(load8(e + c))));
      for (; c < D; ++c) o[c] = static_cast<T>(static_cast<float>(h[c]) + round_to<T>(static_cast<float>(e[c])));
      x = o;
    } else if (injected != nullptr) {
      std::memcpy(injected + row * D, h, sizeof(T) * D);  // a text row
    }
    if (norm == Norm::kNone) continue;
    // fp32 statistics in 4 x 8 lanes. LayerNorm: from d = x - K (K: a shift near the mean) the
    // shifted-data variance (sum d^2 - (sum d)^2 / D) / D and the mean's remainder
    // delta = sum d / D, in one pass; the output reads (x - K) - delta, so the rounding of the mean
    // to fp32 does not reach rows far from zero (offset 1e4 + N(0, 1) stays exact). The pass
    // loses log2(A) bits, A = sum d^2 / (sum d^2 - (sum d)^2 / D) = 1 + (mean - K)^2 / var: with K
    // the mean of the first 8 elements A <= 2 is accepted (Gaussian rows: 99.5%); otherwise (or
    // a non-finite sum) a second pass from K + delta, the corrected two-pass algorithm (A ~ 1).
    float shift = 0.f, delta = 0.f, var;
    if (norm == Norm::kLayer) {
      const int64_t n0 = std::min<int64_t>(D, 8);
      for (int64_t c = 0; c < n0; ++c) shift += static_cast<float>(x[c]);
      shift /= float(n0);
      float sd = 0.f;
      float ss = lane_sum_sq(x, D, shift, &sd);
      if (!(sd * (sd / float(D)) <= 0.5f * ss)) {
        shift += sd / float(D);
        ss = lane_sum_sq(x, D, shift, &sd);
      }
      delta = sd / float(D);
      var = std::max((ss - sd * delta) / float(D), 0.f);
      if (!std::isfinite(shift) || !std::isfinite(delta)) var = shift + delta;  // non-finite: the fp64 redo
    } else {
      var = lane_sum_sq(x, D, 0.f, nullptr) / float(D);
    }
    T* o = normed + row * D;
    if (!std::isfinite(var)) {
      std::vector<float> xf(D);
      for (int64_t c = 0; c < D; ++c) xf[c] = static_cast<float>(x[c]);
      norm_row_f64<T>(xf.data(), D, norm, w, b, p.eps, o);
      continue;
    }
    const float rstd = 1.f / std::sqrt(var + p.eps);
    const __m256 rv = _mm256_set1_ps(rstd), sv = _mm256_set1_ps(shift), dv = _mm256_set1_ps(delta);
    int64_t c = 0;
    if constexpr (std::is_same_v<T, c10::BFloat16> && kSplit16) {
      // blocks of 16 in split16's even/odd order (wp, bp: weight and bias permuted alike)
      const int64_t D16 = D / 16 * 16;
      if (norm == Norm::kRms) {
        for (; c < D16; c += 16) {
          __m256 ev, od;
          split16(x + c, ev, od);
          store16(o + c, _mm256_mul_ps(_mm256_loadu_ps(wp + c), bf16_round_lo0(_mm256_mul_ps(ev, rv))),
                  _mm256_mul_ps(_mm256_loadu_ps(wp + c + 8), bf16_round_lo0(_mm256_mul_ps(od, rv))));
        }
      } else {
        for (; c < D16; c += 16) {
          __m256 ev, od;
          split16(x + c, ev, od);
          const __m256 ye = _mm256_mul_ps(_mm256_sub_ps(_mm256_sub_ps(ev, sv), dv), rv);
          const __m256 yo = _mm256_mul_ps(_mm256_sub_ps(_mm256_sub_ps(od, sv), dv), rv);
          store16(o + c, _mm256_fmadd_ps(ye, _mm256_loadu_ps(wp + c), _mm256_loadu_ps(bp + c)),
                  _mm256_fmadd_ps(yo, _mm256_loadu_ps(wp + c + 8), _mm256_loadu_ps(bp + c + 8)));
        }
      }
    }
    if (norm == Norm::kRms) {
      for (; c < D8; c += 8)
        store8(o + c, _mm256_mul_ps(_mm256_loadu_ps(w + c), round8<T>(_mm256_mul_ps(load8(x + c), rv))));
      for (; c < D; ++c) o[c] = static_cast<T>(w[c] * round_to<T>(static_cast<float>(x[c]) * rstd));
    } else {
      for (; c < D8; c += 8) {
        const __m256 y = _mm256_mul_ps(_mm256_sub_ps(_mm256_sub_ps(load8(x + c), sv), dv), rv);
        store8(o + c, _mm256_fmadd_ps(y, _mm256_loadu_ps(w + c), _mm256_loadu_ps(b + c)));
      }
      for (; c < D; ++c)
        o[c] = static_cast<T>(std::fma(((static_cast<float>(x[c]) - shift) - delta) * rstd, w[c], b[c]));
    }
  }
}

template <typename T, typename E>
void run_fast(const InjectNormParams& p, Norm norm) {
  const int64_t D = p.dim;
  std::vector<float> w(norm == Norm::kNone ? 0 : D), b(D, 0.f);
  for (int64_t c = 0; c < int64_t(w.size()); ++c) w[c] = static_cast<float>(static_cast<const T*>(p.weight)[c]);
  if (p.bias != nullptr)
    for (int64_t c = 0; c < D; ++c) b[c] = static_cast<float>(static_cast<const T*>(p.bias)[c]);
  // bf16: weight and bias of each 16-element block in split16's order
  std::vector<float> wp, bp;
  if (std::is_same_v<T, c10::BFloat16> && kSplit16 && norm != Norm::kNone) {
    const int64_t D16 = D / 16 * 16;
    wp.resize(D16);
    bp.resize(D16);
    for (int64_t c = 0; c < D16; c += 16) {
      permute16(w.data() + c, wp.data() + c);
      permute16(b.data() + c, bp.data() + c);
    }
  }
  const int64_t grain = std::max<int64_t>(1, kMinTaskElems / std::max<int64_t>(D, 1));
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    // the injected row when it is not an output (no caller today): a scratch row
    std::vector<T> xbuf(p.injected == nullptr && p.num_visual > 0 ? D : 0);
    norm_rows_avx2<T, E>(p, norm, w.data(), b.data(), wp.data(), bp.data(), begin, end, xbuf.data());
  });
}

// T, E in {float, Half, BFloat16}: true when it ran.
template <typename T>
bool run_fast_embeds(const InjectNormParams& p, at::ScalarType e, Norm norm) {
  switch (e) {
    case at::kFloat: run_fast<T, float>(p, norm); return true;
    case at::kHalf: run_fast<T, c10::Half>(p, norm); return true;
    case at::kBFloat16: run_fast<T, c10::BFloat16>(p, norm); return true;
    default: return false;
  }
}

bool inject_norm_fast(const InjectNormParams& p, at::ScalarType t, at::ScalarType e, Norm norm) {
  if (!cpu::cpu_has_avx2()) return false;
  switch (t) {
    case at::kFloat: return run_fast_embeds<float>(p, e, norm);
    case at::kHalf: return run_fast_embeds<c10::Half>(p, e, norm);
    case at::kBFloat16: return run_fast_embeds<c10::BFloat16>(p, e, norm);
    default: return false;
  }
}
#endif

}  // namespace

void inject_norm_cpu(const InjectNormParams& p, at::ScalarType t, at::ScalarType e, Norm norm) {
#ifdef HIRES_X86
  if (!cpu_twin_forced() && inject_norm_fast(p, t, e, norm)) return;
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "inject_norm_cpu", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e, "inject_norm_cpu_embeds", [&] {
      run<T, scalar_t>(p, norm);
    });
  });
}

}  // namespace hires::deepstack
