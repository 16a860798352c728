#include "csrc/cpu/dwconv_layernorm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace hires::convnext {
namespace {

template <typename T>
void run(const DwconvLnParams& p) {
  constexpr int K = DwconvLnLimits::kKernel;
  constexpr int PAD = DwconvLnLimits::kPad;
  const int64_t B = p.B, H = p.H, W = p.W, C = p.C;
  const T* x = static_cast<const T*>(p.x);
  const T* wt = static_cast<const T*>(p.w_t);
  const T* db = static_cast<const T*>(p.dw_bias);
  const T* lw = static_cast<const T*>(p.ln_weight);
  const T* lb = static_cast<const T*>(p.ln_bias);
  T* out = static_cast<T*>(p.out);

  // Parameters in fp32 once (49*C + 3*C floats).
  std::vector<float> wf(size_t(DwconvLnLimits::kTaps) * C), dbf(C, 0.f), lwf(C), lbf(C, 0.f);
  for (int64_t i = 0; i < DwconvLnLimits::kTaps * C; ++i) wf[i] = static_cast<float>(wt[i]);
  for (int64_t c = 0; c < C; ++c) {
    if (db) dbf[c] = static_cast<float>(db[c]);
    lwf[c] = static_cast<float>(lw[c]);
    if (lb) lbf[c] = static_cast<float>(lb[c]);
  }

  const int64_t rows = B * H;
  const int64_t Wp = W + 2 * PAD;  // zero-padded row width
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, W * C * K * K));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> in(size_t(K) * Wp * C);  // the 7 input rows of one output row, fp32, padded
    std::vector<float> acc(C);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H, h = r % H;
      // 1. Stage the window's input rows in fp32 with zero padding (the kernel's zero fill).
      std::fill(in.begin(), in.end(), 0.f);
      for (int kh = 0; kh < K; ++kh) {
        const int64_t ih = h + kh - PAD;
        if (ih < 0 || ih >= H) continue;
        for (int64_t w = 0; w < W; ++w) {
          const T* src = x + b * p.sx_b + ih * p.sx_h + w * p.sx_w;
          float* dst = in.data() + (kh * Wp + w + PAD) * C;
          for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<float>(src[c]);
        }
      }
      for (int64_t w = 0; w < W; ++w) {
        // 2. Depthwise conv in fp32: taps row by row, bias added last.
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int kh = 0; kh < K; ++kh) {
          for (int kw = 0; kw < K; ++kw) {
            const float* xi = in.data() + (kh * Wp + w + kw) * C;
            const float* wk = wf.data() + (kh * K + kw) * C;
            for (int64_t c = 0; c < C; ++c) acc[c] += wk[c] * xi[c];
          }
        }
        for (int64_t c = 0; c < C; ++c) acc[c] += dbf[c];
        // 3. LayerNorm over C, two-pass variance, one rounding.
        float s = 0.f;
        for (int64_t c = 0; c < C; ++c) s += acc[c];
        const float mean = s / float(C);
        float ss = 0.f;
        for (int64_t c = 0; c < C; ++c) {
          const float d = acc[c] - mean;
          ss += d * d;
        }
        const float rstd = 1.f / std::sqrt(ss / float(C) + p.eps);
        T* o = out + ((b * H + h) * W + w) * C;
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<T>((acc[c] - mean) * rstd * lwf[c] + lbf[c]);
      }
    }
  });
}

}  // namespace

void dwconv_layernorm_cpu(const DwconvLnParams& p, at::ScalarType t) {
  if (p.B * p.H * p.W * p.C == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "dwconv_layernorm_cpu",
                                  [&] { run<scalar_t>(p); });
}

}  // namespace hires::convnext
