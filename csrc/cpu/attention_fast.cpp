// Default CPU attention path; see attention_fast.h.
//
// The ATen kernel computes softmax(q k^T * scale + mask) v per (batch, head) with fp32
// accumulation and returns the natural-log lse, which is our formula whenever
//   * there is no softcap (it has none);
//   * every query row sees at least one key (it has no "row sees nothing -> 0" rule): Sk > 0 and,
//     with a mask (causal / window, aligned bottom-right), Sq <= Sk, so each row's aligned key
//     i + Sk - Sq lies inside [0, Sk) and is visible;
//   * every score is finite: q, k and the scale finite, and D max|q| max|k| |scale| < 1e37 (no
//     fp32 overflow); it returns o = 0, lse = 0 for a row whose scores are all -inf (ours: NaN, -inf);
//   * o and lse come out finite. With finite scores, a non-finite o comes only from v: its P.V
//     product multiplies masked keys' v rows by 0 (0 * inf = NaN would reach rows that mask the
//     key), so any non-finite o or lse sends the call to the twin (one pass over the output).
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

// max |x| over n elements; +inf when one is NaN or inf.
template <typename T>
float max_abs_contiguous(const T* x, int64_t n) {
  constexpr int kLanes = 16;
  float acc[kLanes] = {};
  float bad = 0.f;  // x * 0: NaN for a NaN / inf x
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float v = static_cast<float>(x[i + j]);
      acc[j] = std::max(acc[j], std::abs(v));
      bad += v * 0.f;
    }
  for (; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    acc[0] = std::max(acc[0], std::abs(v));
    bad += v * 0.f;
  }
  float m = 0.f;
  for (int j = 0; j < kLanes; ++j) m = std::max(m, acc[j]);
  return bad == 0.f ? m : std::numeric_limits<float>::infinity();
}

// max |x| of a tensor (+inf when an element is NaN or inf).
float max_abs(const at::Tensor& t) {
  if (t.numel() == 0) return 0.f;
  if (!t.is_contiguous()) {
    const float m = t.abs().max().item<float>();
    return std::isnan(m) ? std::numeric_limits<float>::infinity() : m;
  }
  float m = 0.f;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "max_abs", [&] {
    m = max_abs_contiguous(t.const_data_ptr<scalar_t>(), t.numel());
  });
  return m;
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
  // Every score finite: q and k finite and no fp32 overflow in scale * q.k (|q.k| <= D max|q| max|k|).
  // Otherwise (an inf / NaN in q or k, a non-finite scale) the ATen kernel's rules are not ours (it
  // returns o = 0, lse = 0 for a row whose scores are all -inf; ours: NaN, -inf): the twin decides.
  const double bound = double(max_abs(q)) * double(max_abs(k)) * double(q.size(3)) * std::abs(scale);
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
  // Finite inputs give a finite o and lse here (every row sees a key); a non-finite one means a
  // non-finite input (or an overflow), where the ATen kernel's rules are not ours: the twin decides.
  if (!(all_finite(o) && all_finite(lse))) return c10::nullopt;
  return std::make_tuple(o, lse);
}

}  // namespace hires::attention
