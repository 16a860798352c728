#include "csrc/cpu/dwconv_layernorm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include <immintrin.h>

namespace hires::convnext {
namespace {

constexpr int kK = DwconvLnLimits::kKernel;
constexpr int kPad = DwconvLnLimits::kPad;
constexpr int kTaps = DwconvLnLimits::kTaps;
constexpr int kLanes = 32;

// ---- the CPU twin of the tiled CUDA kernel ------------------------------------------------------

// warp_sum of kernels/common/numeric.cuh: the xor butterfly, every lane ends with the same value.
template <typename A>
A butterfly(std::array<A, kLanes> v) {
  for (int o = kLanes / 2; o > 0; o >>= 1) {
    std::array<A, kLanes> n;
    for (int l = 0; l < kLanes; ++l) n[l] = v[l] + v[l ^ o];
    v = n;
  }
  return v[0];
}

// dwln_pixel_norm of the kernel: one warp (32 lanes) normalizes the C conv outputs y of a pixel.
template <typename T>
void twin_pixel_norm(const float* y, T* o, int64_t C, bool vec4, const float* lw, const float* lb,
                     float eps) {
  const float inv_c = 1.f / float(C);
  std::array<float, kLanes> s{}, ss{};
  for (int l = 0; l < kLanes; ++l) {
    if (vec4) {
      for (int64_t q = l; q < C / 4; q += kLanes)
        for (int e = 0; e < 4; ++e) s[l] += y[4 * q + e];
    } else {
      for (int64_t c = l; c < C; c += kLanes) s[l] += y[c];
    }
  }
  const float mean = butterfly(s) * inv_c;
  for (int l = 0; l < kLanes; ++l) {
    if (vec4) {
      for (int64_t q = l; q < C / 4; q += kLanes)
        for (int e = 0; e < 4; ++e) {
          const float d = y[4 * q + e] - mean;
          ss[l] = std::fma(d, d, ss[l]);
        }
    } else {
      for (int64_t c = l; c < C; c += kLanes) {
        const float d = y[c] - mean;
        ss[l] = std::fma(d, d, ss[l]);
      }
    }
  }
  const float var = butterfly(ss) * inv_c;
  if (!std::isfinite(var)) {
    // fp64 redo (README "Non-finite values"), lane-strided as the kernel
    std::array<double, kLanes> sd{}, ssd{};
    for (int l = 0; l < kLanes; ++l)
      for (int64_t c = l; c < C; c += kLanes) sd[l] += y[c];
    const double md = butterfly(sd) / double(C);
    for (int l = 0; l < kLanes; ++l)
      for (int64_t c = l; c < C; c += kLanes) ssd[l] = std::fma(y[c] - md, y[c] - md, ssd[l]);
    const double rd = 1.0 / std::sqrt(butterfly(ssd) / double(C) + double(eps));
    for (int64_t c = 0; c < C; ++c)
      o[c] = static_cast<T>(std::fma(static_cast<float>((y[c] - md) * rd), lw[c], lb[c]));
    return;
  }
  const float rstd = 1.f / std::sqrt(var + eps);  // the kernel: rsqrtf (approximate, ~2 ulp)
  for (int64_t c = 0; c < C; ++c) o[c] = static_cast<T>(std::fma((y[c] - mean) * rstd, lw[c], lb[c]));
}

template <typename T>
void run_twin(const DwconvLnParams& p) {
  const int64_t B = p.B, H = p.H, W = p.W, C = p.C;
  // The launcher's choice on an sm_90 device; C past it runs the generic kernel on CUDA (its index
  // math is modelled by tests/test_kernel_tiling_emulation.py), the twin keeps the smallest tile.
  int shape = DwconvLnTiling::pick(C, DwconvLnTiling::kSm90MaxSmem);
  if (shape < 0) shape = DwconvLnTiling::kNumShapes - 1;
  const int RH = DwconvLnTiling::kShapes[shape].rh, S = DwconvLnTiling::kShapes[shape].strips;
  constexpr int kRw = DwconvLnTiling::kRw, kInCols = DwconvLnTiling::kInCols;
  const int TW = S * kRw, CC = DwconvLnTiling::kThreads / S, P = RH * TW;
  const int in_rows = RH + kK - 1, in_w = TW + kK - 1;
  // The kernel's pack width on aligned data: 16-byte packs when C allows, else scalar; it decides
  // whether the LayerNorm passes read float4 (the order of the lane sums).
  const int vec = C % (16 / int(sizeof(T))) == 0 ? 16 / int(sizeof(T)) : 1;
  const bool vec4 = vec % 4 == 0;

  const T* x = static_cast<const T*>(p.x);
  const T* wt = static_cast<const T*>(p.w_t);
  const T* db = static_cast<const T*>(p.dw_bias);
  const T* lwt = static_cast<const T*>(p.ln_weight);
  const T* lbt = static_cast<const T*>(p.ln_bias);
  T* out = static_cast<T*>(p.out);
  std::vector<float> lw(C), lb(C, 0.f);
  for (int64_t c = 0; c < C; ++c) {
    lw[c] = static_cast<float>(lwt[c]);
    if (lbt) lb[c] = static_cast<float>(lbt[c]);
  }

  const int64_t tiles_h = (H + RH - 1) / RH, tiles_w = (W + TW - 1) / TW;
  const int64_t tiles = B * tiles_h * tiles_w;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> conv(size_t(P) * C);                 // shared memory: conv[P][C]
    std::vector<float> ring(size_t(2) * in_w * CC);         // shared memory: ring[2][in_w][CC]
    std::vector<float> wr(size_t(CC) * kTaps);              // registers: each thread's 49 taps
    std::vector<float> acc(size_t(S) * CC * RH * kRw);      // registers: each thread's RH x 8 sums
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t tx = tile % tiles_w, ty = (tile / tiles_w) % tiles_h, b = tile / tiles_w / tiles_h;
      const int64_t h0 = ty * RH, w0 = tx * TW;
      // dwln_stage_load + dwln_stage_store: staged row (ih, chunk c0) into ring buffer `buf`
      auto stage = [&](int buf, int64_t ih, int64_t c0, int64_t ccv) {
        float* dst = ring.data() + size_t(buf) * in_w * CC;
        const bool row_ok = ih >= 0 && ih < H;
        for (int j = 0; j < in_w; ++j) {
          const int64_t iw = w0 - kPad + j;
          for (int cc = 0; cc < CC; ++cc)
            dst[j * CC + cc] = row_ok && cc < ccv && iw >= 0 && iw < W
                                   ? static_cast<float>(x[b * p.sx_b + ih * p.sx_h + iw * p.sx_w + c0 + cc])
                                   : 0.f;
        }
      };
      const int64_t nchunks = (C + CC - 1) / CC;
      stage(0, h0 - kPad, 0, std::min<int64_t>(CC, C));  // prologue
      int buf = 0;
      for (int64_t k = 0; k < nchunks; ++k) {
        const int64_t c0 = k * CC, ccv = std::min<int64_t>(CC, C - c0);
        for (int cc = 0; cc < ccv; ++cc)
          for (int t = 0; t < kTaps; ++t) wr[cc * kTaps + t] = static_cast<float>(wt[t * C + c0 + cc]);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int i = 0; i < in_rows; ++i) {
          const int64_t ih = h0 - kPad + i;
          if (ih >= 0 && ih < H) {
            const float* row = ring.data() + size_t(buf) * in_w * CC;
            for (int s = 0; s < S; ++s) {
              const int64_t ws = w0 + s * kRw;
              const bool interior = ws >= kPad && ws + kRw + kPad <= W;
              for (int cc = 0; cc < ccv; ++cc) {  // thread (strip s, channel cc): dwln_row_taps
                float xr[kInCols];
                for (int j = 0; j < kInCols; ++j) xr[j] = row[(s * kRw + j) * CC + cc];
                float* a = acc.data() + (size_t(s) * CC + cc) * RH * kRw;
                for (int r = 0; r < RH; ++r) {
                  const int kh = i - r;
                  if (kh < 0 || kh >= kK) continue;
                  for (int kw = 0; kw < kK; ++kw) {
                    const float w = wr[cc * kTaps + kh * kK + kw];
                    for (int rw = 0; rw < kRw; ++rw) {
                      const int64_t iw = ws - kPad + rw + kw;
                      if (!interior && (iw < 0 || iw >= W)) continue;  // a padding tap: skipped
                      a[r * kRw + rw] = std::fma(w, xr[rw + kw], a[r * kRw + rw]);
                    }
                  }
                }
              }
            }
          }
          // the next staged row (this chunk's i + 1, or the next chunk's row 0) into the other buffer
          const bool last = i + 1 == in_rows;
          if (!last || k + 1 < nchunks) {
            const int64_t nc0 = last ? c0 + CC : c0;
            stage(buf ^ 1, h0 - kPad + (last ? 0 : i + 1), nc0, std::min<int64_t>(CC, C - nc0));
          }
          buf ^= 1;
        }
        for (int s = 0; s < S; ++s)
          for (int cc = 0; cc < ccv; ++cc) {
            const float* a = acc.data() + (size_t(s) * CC + cc) * RH * kRw;
            const int64_t c = c0 + cc;
            for (int r = 0; r < RH; ++r)
              for (int rw = 0; rw < kRw; ++rw)
                conv[size_t(r * TW + s * kRw + rw) * C + c] =
                    db ? a[r * kRw + rw] + static_cast<float>(db[c]) : a[r * kRw + rw];
          }
      }
      for (int pix = 0; pix < P; ++pix) {  // the warps' pixels
        const int64_t h = h0 + pix / TW, w = w0 + pix % TW;
        if (h >= H || w >= W) continue;
        twin_pixel_norm<T>(conv.data() + size_t(pix) * C, out + ((b * H + h) * W + w) * C, C, vec4,
                           lw.data(), lb.data(), p.eps);
      }
    }
  });
}


// ---- the default CPU path: a fused AVX2/FMA kernel -----------------------------------------------
// Per worker: a contiguous range of output rows. The 7 input rows of the current output row live in
// a ring of fp32 rows with 3 zero columns each side, stored channel-block-major ([block of 8
// channels][column][8]: a block's columns are contiguous), each input row converted once per worker
// (8 elements per instruction). Per block of 8 channels, sliding along the row in groups of kPix = 8
// output pixels: 8 vector accumulators (8 independent FMA chains: two FMA ports x 4 cycles of
// latency) take the 49 taps, inputs as memory operands from L1 (14 consecutive vectors per kernel
// row), bias last, into the row's fp32 conv outputs; then the LayerNorm of each pixel of the row (two-pass fp32, fp64 redo of a pixel
// whose variance is not finite) and 8-wide rounding to T. Zero columns are multiplied (+0 for
// finite weights: the caller checks them).
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
typedef __m256 F8;  // 8 floats (GCC vector arithmetic; FMAs explicit: -std=c++17 turns off contraction)
constexpr int kPix = 8;

inline F8 ld8(const float* q) { return _mm256_loadu_ps(q); }
inline void st8(float* q, F8 v) { _mm256_storeu_ps(q, v); }
inline float hsum8(F8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}
// 8 elements of T <-> 8 floats (exact widening; rounding to nearest even, NaN kept, on narrowing).
template <typename T>
inline F8 ld8t(const T* q) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(q);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  } else {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
}
template <typename T>
inline void st8t(T* q, F8 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(q, v);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {  // bfloat16: c10's round-to-nearest-even, NaN -> 0x7fc0
    const __m256i b = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), packed);
  }
}

template <typename T>
void fast_rows(const DwconvLnParams& p, const float* wfb, const float* dbf, const float* lwf,
               const float* lbf, int64_t begin, int64_t end) {
  const int64_t H = p.H, W = p.W, C = p.C;
  // padded row: 3 zero columns left, W image columns, 3 + kPix - 1 zero columns right (the last
  // group's unused pixels read them: no bounds test in the tap loop)
  const int64_t Wp = W + 2 * kPad + kPix - 1;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const int64_t nb = C / 8;                            // channel blocks
  std::vector<float> ring(size_t(kK) * Wp * C, 0.f);  // input row ih in slot ih % 7: [nb][Wp][8]
  std::vector<int64_t> slot_row(kK, -1);               // which (b, ih) each slot holds
  std::vector<float> zeros(size_t(Wp) * C, 0.f);       // a row outside the image
  std::vector<float> y(size_t(W + kPix) * C);          // conv outputs of one output row
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / H, h = r % H;
    const float* rows[kK];
    for (int kh = 0; kh < kK; ++kh) {
      const int64_t ih = h + kh - kPad;
      if (ih < 0 || ih >= H) {
        rows[kh] = zeros.data();
        continue;
      }
      const int slot = int(ih % kK);
      float* dst = ring.data() + size_t(slot) * Wp * C;
      if (slot_row[slot] != b * H + ih) {  // convert the row once (its padding stays zero)
        const T* src = x + b * p.sx_b + ih * p.sx_h;
        for (int64_t w = 0; w < W; ++w)
          for (int64_t cb = 0; cb < nb; ++cb)
            st8(dst + (cb * Wp + w + kPad) * 8, ld8t<T>(src + w * p.sx_w + cb * 8));
        slot_row[slot] = b * H + ih;
      }
      rows[kh] = dst;
    }
    // conv: channel block outer, pixel groups inner (the block's columns stay in L1)
    for (int64_t cb = 0; cb < nb; ++cb) {
      const int64_t c0 = cb * 8;
      const F8 bv = ld8(dbf + c0);
      for (int64_t w0 = 0; w0 < W; w0 += kPix) {
        F8 a[kPix];
        for (int q = 0; q < kPix; ++q) a[q] = _mm256_setzero_ps();
        for (int kh = 0; kh < kK; ++kh) {
          // padded column w0 + j = image column w0 + j - 3
          const float* xi = rows[kh] + (cb * Wp + w0) * 8;
          const float* wk = wfb + (cb * kTaps + kh * kK) * 8;
          for (int kw = 0; kw < kK; ++kw) {
            const F8 wv = ld8(wk + kw * 8);
            for (int q = 0; q < kPix; ++q) a[q] = _mm256_fmadd_ps(wv, ld8(xi + (q + kw) * 8), a[q]);
          }
        }
        float* yq = y.data() + w0 * C + c0;  // y has kPix spare pixels: the last group fits
        for (int q = 0; q < kPix; ++q) st8(yq + q * C, a[q] + bv);
      }
    }
    T* orow = out + (b * H + h) * W * C;
    for (int64_t w = 0; w < W; ++w) {
      const float* yp = y.data() + w * C;
      F8 s8 = _mm256_setzero_ps();
      for (int64_t c = 0; c < C; c += 8) s8 += ld8(yp + c);
      const float mean = hsum8(s8) / float(C);
      const F8 m8 = _mm256_set1_ps(mean);
      F8 v8 = _mm256_setzero_ps();
      for (int64_t c = 0; c < C; c += 8) {
        const F8 d = ld8(yp + c) - m8;
        v8 = _mm256_fmadd_ps(d, d, v8);
      }
      const float var = hsum8(v8) / float(C);
      T* o = orow + w * C;
      if (!std::isfinite(var)) {
        double sd = 0.0;
        for (int64_t c = 0; c < C; ++c) sd += yp[c];
        const double md = sd / double(C);
        double ssd = 0.0;
        for (int64_t c = 0; c < C; ++c) ssd += (yp[c] - md) * (yp[c] - md);
        const double rd = 1.0 / std::sqrt(ssd / double(C) + double(p.eps));
        for (int64_t c = 0; c < C; ++c)
          o[c] = static_cast<T>(static_cast<float>((yp[c] - md) * rd) * lwf[c] + lbf[c]);
        continue;
      }
      const F8 r8 = _mm256_set1_ps(1.f / std::sqrt(var + p.eps));
      for (int64_t c = 0; c < C; c += 8)
        st8t<T>(o + c, _mm256_fmadd_ps((ld8(yp + c) - m8) * r8, ld8(lwf + c), ld8(lbf + c)));
    }
  }
}
#pragma GCC pop_options

template <typename T>
bool run_fast(const DwconvLnParams& p) {
  const int64_t C = p.C;
  const T* wt = static_cast<const T*>(p.w_t);
  std::vector<float> wf(size_t(kTaps) * C), dbf(C, 0.f), lwf(C), lbf(C, 0.f);
  for (int64_t i = 0; i < kTaps * C; ++i) {
    wf[i] = static_cast<float>(wt[i]);
    if (!std::isfinite(wf[i])) return false;  // padding taps must be skipped, not multiplied
  }
  const T* db = static_cast<const T*>(p.dw_bias);
  const T* lw = static_cast<const T*>(p.ln_weight);
  const T* lb = static_cast<const T*>(p.ln_bias);
  for (int64_t c = 0; c < C; ++c) {
    if (db) dbf[c] = static_cast<float>(db[c]);
    lwf[c] = static_cast<float>(lw[c]);
    if (lb) lbf[c] = static_cast<float>(lb[c]);
  }
  // contiguous row ranges per worker (each input row converted about once per worker)
  // (one worker below 2^19 multiply-adds: there a parallel region's fork / join cost as much as the
  // work, 4x4x96 bf16 24 us on one thread vs 28 on two; 8x8x192 and up gain from the second)
  const int64_t rows = p.B * p.H;
  const bool serial = rows * p.W * C * kTaps < (int64_t(1) << 19);
  const int64_t grain = serial ? rows : std::max<int64_t>(1, rows / std::max<int64_t>(1, at::get_num_threads()));
  // weights per block of 8 channels: [C / 8][49][8]
  std::vector<float> wfb(size_t(kTaps) * C);
  for (int64_t cb = 0; cb < C / 8; ++cb)
    for (int t = 0; t < kTaps; ++t)
      for (int e = 0; e < 8; ++e) wfb[(cb * kTaps + t) * 8 + e] = wf[t * C + cb * 8 + e];
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    fast_rows<T>(p, wfb.data(), dbf.data(), lwf.data(), lbf.data(), begin, end);
  });
  return true;
}

}  // namespace

bool dwconv_layernorm_cpu_fast(const DwconvLnParams& p, at::ScalarType t) {
  static const bool cpu_ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!cpu_ok || p.C % 8 != 0) return false;
  if (p.B * p.H * p.W * p.C == 0) return true;
  bool ok = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "dwconv_layernorm_cpu_fast", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) ok = false;
    else ok = run_fast<scalar_t>(p);
  });
  return ok;
}

void dwconv_layernorm_cpu(const DwconvLnParams& p, at::ScalarType t) {
  if (p.B * p.H * p.W * p.C == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "dwconv_layernorm_cpu",
                                  [&] { run_twin<scalar_t>(p); });
}

}  // namespace hires::convnext
