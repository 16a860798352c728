#include "csrc/cpu/select.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <functional>
#include <type_traits>
#include <vector>

#include "csrc/cpu/avx2.h"
#include "csrc/cpu/cpu_path.h"

namespace hires::select {
namespace {

#ifdef HIRES_X86
// l . o and l . l of one local token in 2 x 8 fp32 lanes each (the default CPU path; the twin
// keeps one running sum per product).
template <typename TL>
HIRES_AVX2 void dot_and_norm_avx2(const TL* l, const float* o, int64_t D, float* dot, float* ll) {
  __m256 d0 = _mm256_setzero_ps(), d1 = d0, n0 = d0, n1 = d0;
  int64_t c = 0;
  for (; c + 16 <= D; c += 16) {
    const __m256 v0 = cpu::load8(l + c), v1 = cpu::load8(l + c + 8);
    d0 = _mm256_fmadd_ps(v0, _mm256_loadu_ps(o + c), d0);
    d1 = _mm256_fmadd_ps(v1, _mm256_loadu_ps(o + c + 8), d1);
    n0 = _mm256_fmadd_ps(v0, v0, n0);
    n1 = _mm256_fmadd_ps(v1, v1, n1);
  }
  float sd = cpu::hsum8(_mm256_add_ps(d0, d1)), sn = cpu::hsum8(_mm256_add_ps(n0, n1));
  for (; c < D; ++c) {
    const float v = static_cast<float>(l[c]);
    sd += v * o[c];
    sn += v * v;
  }
  *dot = sd;
  *ll = sn;
}
#endif

// Steps 1-3 of similarity_select.cuh: weights w[b,t] = mask / max(|text|, eps), the direction
// dir[b] = sum_t w[b,t] text[b,t] (fp32, t in order), scores[b,i] = (l . dir) / max(|l|, eps).
template <typename TL, typename TT>
void scores_cpu(const SimilaritySelectParams& p, std::vector<float>& dir) {
  const int64_t B = p.batch, N = p.n, T = p.t, D = p.dim;
  const TT* text = static_cast<const TT*>(p.text);
  const TL* local = static_cast<const TL*>(p.local);
  std::vector<float> w(B * T, 0.f);
  at::parallel_for(0, B * T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / T, t = r % T;
      if (p.mask != nullptr && !p.mask[b * T + t]) continue;
      const TT* x = text + b * p.text_stride_b + t * p.text_stride_t;
      float ss = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        const float v = static_cast<float>(x[d]);
        ss += v * v;
      }
      if (std::isfinite(ss)) {
        w[r] = 1.f / std::max(std::sqrt(ss), kCosEps);
      } else {  // fp32 overflow or a non-finite x: the kernel's rare fp64 path
        double ssd = 0.0;
        for (int64_t d = 0; d < D; ++d) ssd += double(static_cast<float>(x[d])) * double(static_cast<float>(x[d]));
        w[r] = text_weight_f64(ssd);
      }
    }
  });
  // the kernel's order: kDirGroups partial sums over t = g (mod kDirGroups), added in group order
  constexpr int64_t kDirGroups = 8;  // SelectTile::kDirWarps
  dir.assign(B * D, 0.f);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> part(kDirGroups * D);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(part.begin(), part.end(), 0.f);
      for (int64_t t = 0; t < T; ++t) {
        const float wt = w[b * T + t];
        if (wt == 0.f) continue;
        float* o = part.data() + (t % kDirGroups) * D;
        const TT* x = text + b * p.text_stride_b + t * p.text_stride_t;
        for (int64_t d = 0; d < D; ++d) o[d] += wt * static_cast<float>(x[d]);
      }
      float* o = dir.data() + b * D;
      for (int64_t g = 0; g < kDirGroups; ++g)
        for (int64_t d = 0; d < D; ++d) o[d] += part[g * D + d];
    }
  });
  // a row with no unmasked text token: every score is the empty sum 0 (l is not read)
  std::vector<uint8_t> any_text(B, 1);
  if (p.mask != nullptr)
    for (int64_t b = 0; b < B; ++b) any_text[b] = std::any_of(p.mask + b * T, p.mask + (b + 1) * T, [](bool m) { return m; });
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
#ifdef HIRES_X86
  const bool fast = !cpu_twin_forced() && cpu::cpu_has_avx2();  // HIRES_LMM_CPU_TWIN=1: the twin's sums
#endif
  at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / N, i = r % N;
      if (!any_text[b]) {
        p.scores[r] = 0.f;
        continue;
      }
      const TL* l = local + b * p.local_stride_b + i * p.local_stride_n;
      const float* o = dir.data() + b * D;
      float dot = 0.f, ll = 0.f;
      bool done = false;
#ifdef HIRES_X86
      if constexpr (!std::is_same_v<TL, double>) {
        if (fast) {
          dot_and_norm_avx2(l, o, D, &dot, &ll);
          done = true;
        }
      }
#endif
      for (int64_t d = 0; d < D && !done; ++d) {
        const float v = static_cast<float>(l[d]);
        dot += v * o[d];
        ll += v * v;
      }
      if (!std::isfinite(ll) || !std::isfinite(dot)) {  // the kernel's rare fp64 path
        double dd = 0.0, lld = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          const double v = static_cast<float>(l[d]);
          dd += v * double(o[d]);
          lld += v * v;
        }
        dot = float(local_score_f64(dd, lld));
        ll = 1.f;
      }
      p.scores[r] = dot / std::max(std::sqrt(ll), kCosEps);
    }
  });
}

// Step 4: selection of one row; writes indices[0, out_cols) and, for top-p, the length.
// Ranking by score (the shared key rule: ties to the lower index, NaN last); top-p probabilities
// in fp64 (similarity_select.h, TopPProbs), cumulative sums in fp64 rounded to fp32.
void select_row(const SimilaritySelectParams& p, int64_t b) {
  const int64_t N = p.n;
  const float* s = p.scores + b * N;
  std::vector<uint64_t> keys(N);
  for (int64_t i = 0; i < N; ++i) keys[i] = rank_key(s[i], i);
  std::sort(keys.begin(), keys.end(), std::greater<uint64_t>());
  int64_t keep = p.k;
  if (p.mode == SelectMode::kTopP) {
    TopPProbs q;
    q.presoftmax = p.presoftmax;
    q.t0 = p.presoftmax_temperature;
    q.t1 = p.temperature;
    const float m = key_value(keys[0]);  // the largest score; NaN only when every score is NaN
    q.none = m != m;
    if (!q.none) {
      if (q.presoftmax) {
        q.m0 = double(m) / q.t0;
        double s0 = 0.0;
        for (int64_t i = 0; i < N; ++i)
          if (s[i] == s[i]) s0 += topp_exp0(q, s[i]);
        q.s0 = s0;
        q.a_max1 = (1.0 / s0) / q.t1;
      } else {
        q.a_max1 = double(m) / q.t1;
      }
      double s1 = 0.0;
      for (int64_t i = 0; i < N; ++i)
        if (s[i] == s[i]) s1 += topp_exp1(q, s[i]);
      q.s1 = s1;
    }
    // cumulative sums in ranking order in fp64, each rounded to fp32, compared with float32(p)
    const float pf = static_cast<float>(p.p);
    double cum = 0.0;
    int64_t c = 0;
    for (int64_t j = 0; j < N; ++j) {
      cum += topp_prob(q, key_value(keys[j]));
      if (float(cum) <= pf) ++c;
    }
    keep = std::min<int64_t>(c + 1, N);
    p.lengths[b] = keep;
  }
  std::vector<uint8_t> flag(N, 0);
  for (int64_t j = 0; j < keep; ++j) flag[key_index(keys[j])] = 1;
  int64_t* out = p.indices + b * p.out_cols;
  int64_t pos = 0;
  for (int64_t i = 0; i < N; ++i)
    if (flag[i]) out[pos++] = i;
  for (; pos < p.out_cols; ++pos) out[pos] = -1;
}

template <typename T>
void gather_impl(const GatherParams& p) {
  const T* tokens = static_cast<const T*>(p.tokens);
  T* out = static_cast<T*>(p.out);
  const int64_t D = p.dim;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1));
  at::parallel_for(0, p.batch * p.k, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / p.k;
      const int64_t i = p.indices[r];
      T* o = out + r * D;
      if (i < 0 || i >= p.n) {
        std::fill(o, o + D, static_cast<T>(0.f));
        continue;
      }
      const T* x = tokens + b * p.tokens_stride_b + i * p.tokens_stride_n;
      std::copy(x, x + D, o);
    }
  });
}

}  // namespace

void similarity_select_cpu(const SimilaritySelectParams& p, at::ScalarType local_t, at::ScalarType text_t) {
  std::vector<float> dir;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, local_t, "similarity_select_cpu", [&] {
    using TL = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, text_t, "similarity_select_cpu", [&] {
      scores_cpu<TL, scalar_t>(p, dir);
    });
  });
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) select_row(p, b);
  });
}

void gather_tokens_cpu(const GatherParams& p, at::ScalarType t) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "gather_tokens_cpu",
                                  [&] { gather_impl<scalar_t>(p); });
}

}  // namespace hires::select
