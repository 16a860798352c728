// Default CPU attention path; see attention_fast.h.
//
// The ATen kernel computes softmax(q k^T * scale + mask) v per (batch, head) with fp32
// accumulation and returns the natural-log lse, which is our formula whenever
//   * there is no softcap (it has none);
//   * every query row sees at least one key (it has no "row sees nothing -> 0" rule): Sk > 0 and,
//     with a mask (causal / window, aligned bottom-right), Sq <= Sk, so each row's aligned key
//     i + Sk - Sq lies inside [0, Sk) and is visible;
//   * every score is finite: |scale| sqrt(sum q^2 sum k^2) < 1e37 (one pass over q and k); ATen's
//     kernel returns o = 0, lse = 0 for a row whose scores are all -inf (ours: NaN, -inf) and can
//     return a finite lse for a row with a +inf score;
//   * o and lse come out finite (and no lse is exactly 0, as a second guard): with finite scores a
//     non-finite o comes from v, where its P.V product also multiplies masked keys' v rows by 0
//     (0 * inf = NaN would reach rows that mask the key). Any of these sends the call to the twin.
// The bottom-right causal mask / window is passed as an additive mask (0 / -inf) in the input
// dtype (ATen's own causal flag is top-left; it is used when Sq == Sk and there is no window).
// GQA: the kernel maps query head h to kv head h / (Hq / Hkv) itself (no copy).
#include "csrc/cpu/attention_fast.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>

namespace hires::attention {

namespace {

// 0 when every element is finite, NaN otherwise (x * 0 is 0 for finite x, NaN for inf / NaN; the
// sum never overflows), in kLanes independent accumulators (vectorizable).
template <typename T>
bool finite_contiguous(const T* x, int64_t n) {
  constexpr int kLanes = 16;
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<float>(x[i + j]) * 0.f;
  for (; i < n; ++i) acc[0] += static_cast<float>(x[i]) * 0.f;
  float s = 0.f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s == 0.f;
}

// sum of x^2 in kLanes independent fp32 accumulators (vectorizable): inf / NaN when an element
// is, or when the sum overflows.
template <typename T>
float sum_sq_contiguous(const T* x, int64_t n) {
  constexpr int kLanes = 16;
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float v = static_cast<float>(x[i + j]);
      acc[j] += v * v;
    }
  for (; i < n; ++i) acc[0] += static_cast<float>(x[i]) * static_cast<float>(x[i]);
  float s = 0.f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

float sum_sq(const at::Tensor& t) {
  if (t.numel() == 0) return 0.f;
  const at::Tensor c = t.contiguous();
  float s = 0.f;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "sum_sq", [&] {
    s = sum_sq_contiguous(c.const_data_ptr<scalar_t>(), c.numel());
  });
  return s;
}

}  // namespace

bool all_finite(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  if (!t.is_contiguous()) return at::isfinite(t).all().item<bool>();
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "all_finite", [&] {
    const scalar_t* x = t.const_data_ptr<scalar_t>();
    const int64_t n = t.numel();
    constexpr int64_t kChunk = int64_t(1) << 16;
    if (n <= kChunk) {
      ok = finite_contiguous(x, n);
      return;
    }
    std::atomic<bool> all{true};
    at::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c)
        if (!finite_contiguous(x + c * kChunk, std::min(kChunk, n - c * kChunk))) all = false;
    });
    ok = all;
  });
  return ok;
}

namespace {
constexpr int64_t kMaxMaskElems = int64_t(1) << 26;  // 64 Mi mask entries; larger masked calls: twin
}

bool attention_cpu_fast_shape_ok(int64_t Sq, int64_t Sk, int64_t window_left, int64_t window_right,
                                 double softcap) {
  if (softcap != 0.0 || Sk <= 0 || Sq <= 0) return false;
  const bool masked = window_left >= 0 || window_right >= 0;
  if (!masked) return true;
  if (Sq > Sk) return false;  // some rows would see no key
  const bool plain_causal = window_left < 0 && window_right == 0 && Sq == Sk;
  return plain_causal || Sq * Sk <= kMaxMaskElems;
}

c10::optional<std::tuple<at::Tensor, at::Tensor>> attention_cpu_fast(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, int64_t window_left,
    int64_t window_right, double softcap) {
  const int64_t Sq = q.size(1), Sk = k.size(1), Hq = q.size(2), Hkv = k.size(2);
  if (q.numel() == 0 || !attention_cpu_fast_shape_ok(Sq, Sk, window_left, window_right, softcap))
    return c10::nullopt;
  // Every score finite: |scale q_i.k_j| <= |scale| sqrt(sum q^2 sum k^2) (Cauchy-Schwarz) < 1e37 rules
  // out an inf / NaN in q or k, a non-finite scale and any fp32 overflow of a score (ATen's kernel
  // can return a finite lse for a row with a +inf score).
  const double bound = std::abs(scale) * std::sqrt(double(sum_sq(q)) * double(sum_sq(k)));
  if (!(bound < 1e37)) return c10::nullopt;
  (void)Hq; (void)Hkv;  // GQA: the ATen kernel maps query head h to kv head h / (Hq / Hkv) itself
  const bool masked = window_left >= 0 || window_right >= 0;
  const bool plain_causal = window_left < 0 && window_right == 0 && Sq == Sk;
  c10::optional<at::Tensor> mask;
  if (masked && !plain_causal) {
    // additive mask: key j visible to query i iff i + Sk - Sq - left <= j <= i + Sk - Sq + right
    at::Tensor m = at::empty({Sq, Sk}, at::TensorOptions().dtype(at::kFloat));
    float* mp = m.data_ptr<float>();
    const float kNegInf = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < Sq; ++i) {
      const int64_t c = i + Sk - Sq;
      const int64_t lo = window_left >= 0 ? c - window_left : 0;
      const int64_t hi = window_right >= 0 ? c + window_right : Sk - 1;
      for (int64_t j = 0; j < Sk; ++j) mp[i * Sk + j] = (j >= lo && j <= hi) ? 0.f : kNegInf;
    }
    mask = m.to(q.scalar_type());
  }
  auto [out, lse] = at::_scaled_dot_product_flash_attention_for_cpu(
      q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, plain_causal, mask, scale);
  // out (B,H,Sq,D) is a view of (B,Sq,H,D) memory; make sure of it rather than assume it
  at::Tensor o = out.transpose(1, 2);
  if (!o.is_contiguous()) o = o.contiguous();
  lse = lse.contiguous();
  // lse of a row whose scores are all -inf comes back as exactly 0 (ours: -inf, with o = NaN): an
  // lse of exactly 0 (rare for real scores: it needs sum_j exp(s_ij) == 1) goes to the twin too.
  {
    const float* l = lse.const_data_ptr<float>();
    bool ok = true;
    for (int64_t i = 0, n = lse.numel(); i < n; ++i) ok &= std::isfinite(l[i]) && l[i] != 0.f;
    if (!ok) return c10::nullopt;
  }
  // Finite inputs give a finite o and lse here (every row sees a key); a non-finite one means a
  // non-finite input (or an overflow), where the ATen kernel's rules are not ours: the twin decides.
  if (!all_finite(o)) return c10::nullopt;
  return std::make_tuple(o, lse);
}

}  // namespace hires::attention
