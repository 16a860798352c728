#include "csrc/cpu/dwconv_bwd.h"

#include <ATen/Parallel.h>
#include <vector>

namespace hires::convnext {
namespace {

template <typename T>
void run(const DwconvBwdParams& p) {
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
  // stage 2: chunks in order
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
