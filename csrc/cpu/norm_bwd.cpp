#include "csrc/cpu/norm_bwd.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <type_traits>
#include <vector>

namespace hires::deepstack {
namespace {

template <typename T> inline float round_to(float v) { return static_cast<float>(static_cast<T>(v)); }

// sum_{c < D} f(c) in 8 interleaved fp32 partial sums, added in a fixed order: the compiler
// vectorizes it (a single running sum is one dependent add per element: 4 such row sums were most
// of this kernel's time), and the result depends on D only, not on threads or the machine.
template <typename F>
inline float sum8(int64_t D, F f) {
  float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t c = 0;
  for (; c + 8 <= D; c += 8)
    for (int j = 0; j < 8; ++j) a[j] += f(c + j);
  for (int j = 0; c < D; ++c, ++j) a[j] += f(c);
  return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

template <typename T>
void run(const NormBwdParams& p) {
  const int64_t D = p.dim;
  const T* dy = static_cast<const T*>(p.dy);
  const T* xs = static_cast<const T*>(p.x);
  const T* dres = static_cast<const T*>(p.dres);
  const T* wt = static_cast<const T*>(p.weight);
  T* dx = static_cast<T*>(p.dx);
  std::vector<float> w(D);
  for (int64_t c = 0; c < D; ++c) w[c] = static_cast<float>(wt[c]);
  const float inv_d = 1.f / float(D);
  // stage 1: one chunk of rows per task, its partial sums in its own workspace row
  at::parallel_for(0, p.chunks, 1, [&](int64_t cb, int64_t ce) {
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
        float mu = p.layer ? sum8(D, [&](int64_t c) { return xr[c]; }) * inv_d : 0.f;
        const float ss = sum8(D, [&](int64_t c) { return (xr[c] - mu) * (xr[c] - mu); });
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
        const float sg = p.layer ? sum8(D, [&](int64_t c) { return gr[c] * wr[c]; }) : 0.f;
        const float sgy = sum8(D, [&](int64_t c) { return gr[c] * wr[c] * ((xr[c] - mu) * rstd); });
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
  // stage 2: chunk order per column
  T* dw = static_cast<T*>(p.dweight);
  T* db = static_cast<T*>(p.dbias);
  at::parallel_for(0, D, 1024, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float sw = 0.f, sb = 0.f;
      for (int64_t b = 0; b < p.chunks; ++b) {
        sw += p.partial[b * 2 * D + c];
        sb += p.partial[b * 2 * D + D + c];
      }
      dw[c] = static_cast<T>(sw);
      if (db != nullptr) db[c] = static_cast<T>(sb);
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
