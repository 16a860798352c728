#include "csrc/cpu/deepstack.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <vector>

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
        // The fp32 statistic overflowed (|x| > ~1.8e19, or a non-finite x): redo the row in fp64,
        // which cannot overflow for finite fp32 input (README "Non-finite values"); rare, so the
        // fast path above stays fp32. A non-finite x still gives what IEEE arithmetic gives.
        double sd = 0.0;
        if (norm == Norm::kLayer)
          for (int64_t c = 0; c < D; ++c) sd += x[c];
        const double mean = sd / double(D);
        double ssd = 0.0;
        for (int64_t c = 0; c < D; ++c) ssd += (x[c] - mean) * (x[c] - mean);
        const double rstd = 1.0 / std::sqrt(ssd / double(D) + double(p.eps));
        if (norm == Norm::kRms) {
          for (int64_t c = 0; c < D; ++c)
            o[c] = static_cast<T>(w[c] * round_to<T>(static_cast<float>(x[c] * rstd)));
        } else {
          for (int64_t c = 0; c < D; ++c)
            o[c] = static_cast<T>(static_cast<float>((x[c] - mean) * rstd) * w[c] + b[c]);
        }
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

}  // namespace

void inject_norm_cpu(const InjectNormParams& p, at::ScalarType t, at::ScalarType e, Norm norm) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "inject_norm_cpu", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e, "inject_norm_cpu_embeds", [&] {
      run<T, scalar_t>(p, norm);
    });
  });
}

}  // namespace hires::deepstack
