#include "csrc/cpu/dwconv_layernorm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace hires::convnext {
namespace {

constexpr int kPix = 4;  // output pixels per register tile
constexpr int kCh = 8;   // channels per register tile
typedef float V8 __attribute__((vector_size(kCh * sizeof(float))));
inline V8 load8(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof(V8));
  return v;
}

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
    std::vector<float> ybuf(W * C);  // conv outputs of one output row (the kernel's shared memory)
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H, h = r % H;
      // 1. Stage the window's input rows in fp32 (the padding columns are never multiplied).
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
      // 2. Depthwise conv in fp32, taps row by row, bias added last (the kernel's order). Tiles
      //    of kPix pixels x kCh channels keep their sums in registers across the 49 taps, and
      //    each weight load serves kPix pixels.
      for (int64_t w0 = 0; w0 < W; w0 += kPix) {
        const int64_t nr = std::min<int64_t>(kPix, W - w0);
        for (int64_t c0 = 0; c0 < C; c0 += kCh) {
          const int64_t cn = std::min<int64_t>(kCh, C - c0);
          float acc[kPix][kCh] = {};
          if (nr == kPix && cn == kCh) {
            // Register tile as 4 vectors of 8 floats (GCC/Clang vector extension): the sums stay
            // in registers for all 49 taps instead of round-tripping through the stack.
            // Taps that fall on the zero padding are skipped, not multiplied by 0 (an inf weight
            // must not turn border pixels into NaN: F.conv2d's rule, README "Non-finite values").
            // Interior tiles (every tap inside the image) keep the branch-free loop.
            V8 a[kPix] = {};
            const bool interior = w0 >= PAD && w0 + kPix + PAD <= W;
            for (int kh = 0; kh < K; ++kh) {
              if (h + kh - PAD < 0 || h + kh - PAD >= H) continue;
              if (interior) {
                for (int kw = 0; kw < K; ++kw) {
                  const V8 wv = load8(wf.data() + (kh * K + kw) * C + c0);
                  const float* xi = in.data() + (kh * Wp + w0 + kw) * C + c0;
                  for (int r = 0; r < kPix; ++r) a[r] += wv * load8(xi + r * C);
                }
              } else {
                for (int kw = 0; kw < K; ++kw) {
                  const V8 wv = load8(wf.data() + (kh * K + kw) * C + c0);
                  const float* xi = in.data() + (kh * Wp + w0 + kw) * C + c0;
                  for (int r = 0; r < kPix; ++r) {
                    const int64_t iw = w0 + r + kw - PAD;
                    if (iw >= 0 && iw < W) a[r] += wv * load8(xi + r * C);
                  }
                }
              }
            }
            for (int r = 0; r < kPix; ++r) std::memcpy(acc[r], &a[r], sizeof(V8));
          } else {
            for (int kh = 0; kh < K; ++kh) {
              if (h + kh - PAD < 0 || h + kh - PAD >= H) continue;
              for (int kw = 0; kw < K; ++kw) {
                const float* wk = wf.data() + (kh * K + kw) * C + c0;
                const float* xi = in.data() + (kh * Wp + w0 + kw) * C + c0;
                for (int64_t r = 0; r < nr; ++r) {
                  const int64_t iw = w0 + r + kw - PAD;
                  if (iw < 0 || iw >= W) continue;
                  for (int64_t e = 0; e < cn; ++e) acc[r][e] += wk[e] * xi[r * C + e];
                }
              }
            }
          }
          for (int64_t r = 0; r < nr; ++r)
            for (int64_t e = 0; e < cn; ++e) ybuf[(w0 + r) * C + c0 + e] = acc[r][e] + dbf[c0 + e];
        }
      }
      for (int64_t w = 0; w < W; ++w) {
        const float* acc = ybuf.data() + w * C;
        // 3. LayerNorm over C, two-pass variance, one rounding.
        float s = 0.f;
        for (int64_t c = 0; c < C; ++c) s += acc[c];
        const float mean = s / float(C);
        float ss = 0.f;
        for (int64_t c = 0; c < C; ++c) {
          const float d = acc[c] - mean;
          ss += d * d;
        }
        const float var = ss / float(C);
        T* o = out + ((b * H + h) * W + w) * C;
        if (!std::isfinite(var)) {
          // The fp32 statistic overflowed (huge conv outputs, or a non-finite one): redo the pixel
          // in fp64, which cannot overflow for finite fp32 values; rare, the fast path stays fp32.
          double sd = 0.0;
          for (int64_t c = 0; c < C; ++c) sd += acc[c];
          const double md = sd / double(C);
          double ssd = 0.0;
          for (int64_t c = 0; c < C; ++c) ssd += (acc[c] - md) * (acc[c] - md);
          const double rd = 1.0 / std::sqrt(ssd / double(C) + double(p.eps));
          for (int64_t c = 0; c < C; ++c)
            o[c] = static_cast<T>(static_cast<float>((acc[c] - md) * rd) * lwf[c] + lbf[c]);
          continue;
        }
        const float rstd = 1.f / std::sqrt(var + p.eps);
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
