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
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "csrc/cpu/attention_prefill.h"
#include "csrc/cpu/avx2.h"

namespace hires::attention {

namespace {

// 0 when every element is finite, NaN otherwise (x * 0 is 0 for finite x, NaN for inf / NaN; the
// sum never overflows), in kLanes independent accumulators (vectorizable).
template <typename T>
bool finite_contiguous_generic(const T* x, int64_t n) {
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
float sum_sq_contiguous_generic(const T* x, int64_t n) {
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

#ifdef HIRES_X86
using cpu::cpu_has_avx2;
using cpu::hsum8;
using cpu::load8;

template <typename T>
HIRES_AVX2 float sum_sq_avx2(const T* x, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {  // 8 independent FMA chains (FMA latency x throughput)
    const __m256 v0 = load8(x + i), v1 = load8(x + i + 8), v2 = load8(x + i + 16), v3 = load8(x + i + 24);
    const __m256 v4 = load8(x + i + 32), v5 = load8(x + i + 40), v6 = load8(x + i + 48), v7 = load8(x + i + 56);
    a0 = _mm256_fmadd_ps(v0, v0, a0);
    a1 = _mm256_fmadd_ps(v1, v1, a1);
    a2 = _mm256_fmadd_ps(v2, v2, a2);
    a3 = _mm256_fmadd_ps(v3, v3, a3);
    a4 = _mm256_fmadd_ps(v4, v4, a4);
    a5 = _mm256_fmadd_ps(v5, v5, a5);
    a6 = _mm256_fmadd_ps(v6, v6, a6);
    a7 = _mm256_fmadd_ps(v7, v7, a7);
  }
  a0 = _mm256_add_ps(a0, a4);
  a1 = _mm256_add_ps(a1, a5);
  a2 = _mm256_add_ps(a2, a6);
  a3 = _mm256_add_ps(a3, a7);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = load8(x + i);
    a0 = _mm256_fmadd_ps(v, v, a0);
  }
  float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < n; ++i) s += static_cast<float>(x[i]) * static_cast<float>(x[i]);
  return s;
}

// Every element finite: no exponent field all ones (inf / NaN), checked on the bits 32 bytes at a
// time (and, compare, or: no floating-point dependency chain).
template <typename T>
HIRES_AVX2 bool finite_avx2(const T* x, int64_t n) {
  constexpr bool k16 = sizeof(T) == 2;
  const __m256i em = k16 ? _mm256_set1_epi16(std::is_same_v<T, c10::Half> ? 0x7c00 : 0x7f80)
                         : _mm256_set1_epi32(0x7f800000);
  constexpr int64_t kStep = 32 / int64_t(sizeof(T));
  __m256i bad = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    const __m256i e = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)), em);
    bad = _mm256_or_si256(bad, k16 ? _mm256_cmpeq_epi16(e, em) : _mm256_cmpeq_epi32(e, em));
  }
  bool ok = _mm256_testz_si256(bad, bad);
  for (; i < n; ++i) ok &= std::isfinite(static_cast<float>(x[i]));
  return ok;
}
#endif

template <typename T>
float sum_sq_contiguous(const T* x, int64_t n) {
#ifdef HIRES_X86
  if constexpr (!std::is_same_v<T, double>)
    if (cpu_has_avx2()) return sum_sq_avx2(x, n);
#endif
  return sum_sq_contiguous_generic(x, n);
}

template <typename T>
bool finite_contiguous(const T* x, int64_t n) {
#ifdef HIRES_X86
  if constexpr (!std::is_same_v<T, double>)
    if (cpu_has_avx2()) return finite_avx2(x, n);
#endif
  return finite_contiguous_generic(x, n);
}

// sum of t^2 in fp32 (inf / NaN as sum_sq_contiguous); chunks over the intra-op threads when large.
// A 4-D (B, S, H, D) view whose H * D elements of each token are contiguous (a slice of a fused
// qkv tensor) is read in place, token by token, not copied.
bool tokens_in_place(const at::Tensor& t) {
  return t.dim() == 4 && t.stride(3) == 1 && t.stride(2) == t.size(3);
}

float sum_sq(const at::Tensor& t) {
  if (t.numel() == 0) return 0.f;
  if (!t.is_contiguous() && tokens_in_place(t)) {
    float s = 0.f;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "sum_sq_tokens", [&] {
      const scalar_t* x = t.const_data_ptr<scalar_t>();
      const int64_t S = t.size(1), n = t.size(2) * t.size(3), tokens = t.size(0) * S;
      const int64_t per = std::max<int64_t>(1, (int64_t(1) << 17) / n), chunks = (tokens + per - 1) / per;
      std::vector<float> part(chunks, 0.f);
      at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
        for (int64_t c = b; c < e; ++c)
          for (int64_t i = c * per; i < std::min(tokens, (c + 1) * per); ++i)
            part[c] += sum_sq_contiguous(x + (i / S) * t.stride(0) + (i % S) * t.stride(1), n);
      });
      for (float v : part) s += v;
    });
    return s;
  }
  const at::Tensor c = t.contiguous();
  float s = 0.f;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "sum_sq", [&] {
    const scalar_t* x = c.const_data_ptr<scalar_t>();
    const int64_t n = c.numel();
    constexpr int64_t kChunk = int64_t(1) << 17;
    if (n <= kChunk) {
      s = sum_sq_contiguous(x, n);
      return;
    }
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    std::vector<float> part(chunks, 0.f);
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) part[i] = sum_sq_contiguous(x + i * kChunk, std::min(kChunk, n - i * kChunk));
    });
    for (float v : part) s += v;
  });
  return s;
}

// sum_sq of n contiguous tensors of one dtype in one pass: their elements in segments of 16K, one
// parallel region over all the segments when they hold >= 256K elements in all (fewer: the calling
// thread). Partials are added in segment order (the result does not depend on the thread count).
void sum_sq_many(const at::Tensor* const* ts, int n, float* out) {
  constexpr int64_t kSeg = int64_t(1) << 14, kParallelMin = int64_t(1) << 18;
  std::vector<int64_t> seg0(size_t(n) + 1, 0);
  int64_t total = 0;
  for (int i = 0; i < n; ++i) {
    seg0[i + 1] = seg0[i] + (ts[i]->numel() + kSeg - 1) / kSeg;
    total += ts[i]->numel();
  }
  const int64_t segs = seg0[n];
  std::vector<float> part(size_t(segs), 0.f);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ts[0]->scalar_type(), "sum_sq_many", [&] {
    at::parallel_for(0, segs, total >= kParallelMin ? 1 : segs, [&](int64_t b, int64_t e) {
      for (int64_t sg = b; sg < e; ++sg) {
        const int i = int(std::upper_bound(seg0.begin(), seg0.end(), sg) - seg0.begin()) - 1;
        const int64_t off = (sg - seg0[i]) * kSeg;
        part[sg] = sum_sq_contiguous(ts[i]->const_data_ptr<scalar_t>() + off, std::min(kSeg, ts[i]->numel() - off));
      }
    });
  });
  for (int i = 0; i < n; ++i) {
    out[i] = 0.f;
    for (int64_t sg = seg0[i]; sg < seg0[i + 1]; ++sg) out[i] += part[sg];
  }
}

}  // namespace

bool& cpu_fast_taken() {
  thread_local bool taken = false;
  return taken;
}

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

// ATen's own causal flag (top-left aligned) equals ours (bottom-right) when Sq == Sk
bool fast_plain_causal(int64_t Sq, int64_t Sk, int64_t window_left, int64_t window_right) {
  return window_left < 0 && window_right == 0 && Sq == Sk;
}

// The bottom-right causal mask / window as an additive mask (0 / -inf) in `dtype`: key j visible
// to query i iff i + Sk - Sq - left <= j <= i + Sk - Sq + right; none when unmasked or plain causal.
c10::optional<at::Tensor> fast_mask(int64_t Sq, int64_t Sk, int64_t window_left, int64_t window_right,
                                    at::ScalarType dtype) {
  const bool masked = window_left >= 0 || window_right >= 0;
  if (!masked || fast_plain_causal(Sq, Sk, window_left, window_right)) return c10::nullopt;
  at::Tensor m = at::empty({Sq, Sk}, at::TensorOptions().dtype(at::kFloat));
  float* mp = m.data_ptr<float>();
  const float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < Sq; ++i) {
    const int64_t c = i + Sk - Sq;
    const int64_t lo = window_left >= 0 ? c - window_left : 0;
    const int64_t hi = window_right >= 0 ? c + window_right : Sk - 1;
    for (int64_t j = 0; j < Sk; ++j) mp[i * Sk + j] = (j >= lo && j <= hi) ? 0.f : kNegInf;
  }
  return m.to(dtype);
}
}  // namespace

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
  const bool masked = window_left >= 0 || window_right >= 0;
  if (q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 &&
      prefill_route(q.size(0), Sq, Sk, Hq, Hkv, q.size(3), masked, q.scalar_type()) &&
      k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type()) {
    // Our fused kernel (csrc/cpu/attention_prefill.h): the same bound on q and k; it checks o / lse
    // itself (a non-finite one, e.g. from a NaN / inf in v: the twin).
    float s2[2];
    if (q.is_contiguous() && k.is_contiguous()) {
      const at::Tensor* ts[2] = {&q, &k};
      sum_sq_many(ts, 2, s2);
    } else {
      s2[0] = sum_sq(q);
      s2[1] = sum_sq(k);
    }
    if (!(std::abs(scale) * std::sqrt(double(s2[0]) * double(s2[1])) < 1e37)) return c10::nullopt;
    at::Tensor o = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
    at::Tensor lse = at::empty({q.size(0), Hq, Sq}, q.options().dtype(at::kFloat));
    PrefillArgs a;
    a.q = q.const_data_ptr(); a.k = k.const_data_ptr(); a.v = v.const_data_ptr();
    a.o = o.data_ptr(); a.lse = lse.data_ptr<float>();
    for (int d = 0; d < 3; ++d) {
      a.q_s[d] = q.stride(d); a.k_s[d] = k.stride(d); a.v_s[d] = v.stride(d);
    }
    a.B = q.size(0); a.Sq = Sq; a.Sk = Sk; a.Hq = Hq; a.Hkv = Hkv; a.D = q.size(3);
    a.scale = scale;
    a.window_left = window_left;
    a.window_right = window_right;
    if (!attention_cpu_prefill(a, q.scalar_type())) return c10::nullopt;
    cpu_fast_taken() = true;
    return std::make_tuple(o, lse);
  }
  // (v's sum of squares, for the output check below, in the same pass when all three are contiguous)
  const bool v_read_in_place = v.is_contiguous() || tokens_in_place(v);
  float sq[3];
  if (q.is_contiguous() && k.is_contiguous() && v.is_contiguous()) {
    const at::Tensor* ts[3] = {&q, &k, &v};
    sum_sq_many(ts, 3, sq);
  } else {
    sq[0] = sum_sq(q);
    sq[1] = sum_sq(k);
    sq[2] = -1.f;  // v: after the kernel, only if the bound holds
  }
  const double bound = std::abs(scale) * std::sqrt(double(sq[0]) * double(sq[1]));
  if (!(bound < 1e37)) return c10::nullopt;
  if (sq[2] < 0.f && v_read_in_place) sq[2] = sum_sq(v);
  (void)Hq; (void)Hkv;  // GQA: the ATen kernel maps query head h to kv head h / (Hq / Hkv) itself
  const bool plain_causal = fast_plain_causal(Sq, Sk, window_left, window_right);
  const c10::optional<at::Tensor> mask = fast_mask(Sq, Sk, window_left, window_right, q.scalar_type());
  auto [out, lse] = at::_scaled_dot_product_flash_attention_for_cpu(
      q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, plain_causal, mask, scale);
  // out (B,H,Sq,D) is a view of (B,Sq,H,D) memory; make sure of it rather than assume it
  at::Tensor o = out.transpose(1, 2);
  if (!o.is_contiguous()) o = o.contiguous();
  // lse of a row whose scores are all -inf comes back as exactly 0 (ours: -inf, with o = NaN): an
  // lse of exactly 0 (rare for real scores: it needs sum_j exp(s_ij) == 1) goes to the twin too.
  // Checked while copied into a contiguous (B, H, Sq) tensor (ATen's is a view of (B, Sq, H) memory).
  if (lse.scalar_type() != at::kFloat) return c10::nullopt;
  {
    at::Tensor l = at::empty(lse.sizes(), lse.options().memory_format(at::MemoryFormat::Contiguous));
    const float* src = lse.const_data_ptr<float>();
    float* dst = l.data_ptr<float>();
    const int64_t n0 = lse.size(0), n1 = lse.size(1), n2 = lse.size(2);
    const int64_t s0 = lse.stride(0), s1 = lse.stride(1), s2 = lse.stride(2);
    bool ok = true;
    for (int64_t a = 0; a < n0; ++a)
      for (int64_t h = 0; h < n1; ++h)
        for (int64_t i = 0; i < n2; ++i) {
          const float x = src[a * s0 + h * s1 + i * s2];
          *dst++ = x;
          ok &= std::isfinite(x) && x != 0.f;
        }
    if (!ok) return c10::nullopt;
    lse = l;
  }
  // Finite inputs give a finite o and lse here (every row sees a key); a non-finite one means a
  // non-finite input (or an overflow), where the ATen kernel's rules are not ours: the twin decides.
  // With finite scores and lse, o can only be non-finite through v: each row accumulates at most Sk
  // terms exp(s - m) v_j with weights <= 1, so sum v^2 < inf (every |v_j| < 2e19) keeps the fp32
  // accumulator and o finite; that pass reads v (1 / g of o's size under GQA). Otherwise o is checked.
  if (!(v_read_in_place && std::isfinite(sq[2])) && !all_finite(o)) return c10::nullopt;
  cpu_fast_taken() = true;
  return std::make_tuple(o, lse);
}

c10::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> attention_cpu_fast_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, double scale, int64_t window_left, int64_t window_right, double softcap,
    bool forward_checked) {
  const at::ScalarType t = q.scalar_type();
  if (t != at::kFloat && t != at::kHalf && t != at::kBFloat16) return c10::nullopt;
  const int64_t Sq = q.size(1), Sk = k.size(1);
  if (q.numel() == 0 || k.numel() == 0 || !attention_cpu_fast_shape_ok(Sq, Sk, window_left, window_right, softcap))
    return c10::nullopt;
  if (q.stride(3) != 1 || k.stride(3) != 1 || v.stride(3) != 1 || out.stride(3) != 1 || dout.stride(3) != 1)
    return c10::nullopt;
  // The forward's conditions for the ATen kernel (every score finite, every row sees a key), checked
  // on the saved tensors: lse finite and nonzero, out finite; and dO finite (a NaN / inf in dO meets
  // masked keys' zero weights in ATen's GEMMs, which the twin never multiplies).
  if (!forward_checked) {
    const double bound = std::abs(scale) * std::sqrt(double(sum_sq(q)) * double(sum_sq(k)));
    if (!(bound < 1e37)) return c10::nullopt;
    const at::Tensor l = lse.contiguous();
    const float* lp = l.const_data_ptr<float>();
    bool ok = true;
    for (int64_t i = 0, n = l.numel(); i < n; ++i) ok &= std::isfinite(lp[i]) && lp[i] != 0.f;
    if (!ok || !all_finite(out)) return c10::nullopt;
  }
  if (!all_finite(dout)) return c10::nullopt;
  const bool plain_causal = fast_plain_causal(Sq, Sk, window_left, window_right);
  // fp16 / bf16 run in fp32 (one rounding of dq / dk / dv, as the twin): ATen's kernel in those dtypes
  // rounds P to the input dtype and accumulates dK / dV across query blocks and GQA heads in it
  // (bf16 dV about 2.5x the error of plain bf16 autograd at (2, 33, 4/2 heads, 64)).
  const c10::optional<at::Tensor> mask = fast_mask(Sq, Sk, window_left, window_right, at::kFloat);
  auto f32 = [](const at::Tensor& x) { return x.scalar_type() == at::kFloat ? x : x.to(at::kFloat); };
  // (B, S, H, D) memory seen as (B, H, S, D); GQA: the kernel reduces dK / dV over the group itself
  auto [dq, dk, dv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
      f32(dout).transpose(1, 2), f32(q).transpose(1, 2), f32(k).transpose(1, 2), f32(v).transpose(1, 2),
      f32(out).transpose(1, 2), lse, 0.0, plain_causal, mask, scale);
  auto back = [t](const at::Tensor& g) {
    at::Tensor r = g.transpose(1, 2);
    if (t != at::kFloat) return r.to(t, /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::Contiguous);
    return r.is_contiguous() ? r : r.contiguous();
  };
  return std::make_tuple(back(dq), back(dk), back(dv));
}

}  // namespace hires::attention

// ---- small-query attention (decode) ----------------------------------------------------------
namespace hires::attention {
namespace {

#ifdef HIRES_X86
using cpu::exp8_nonpos;  // (csrc/cpu/avx2.h)

template <typename T>
HIRES_AVX2 void to_f32_row(const T* x, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, load8(x + i));
  for (; i < n; ++i) out[i] = static_cast<float>(x[i]);
}

// Scores of N query rows (same visible keys) against keys [j0, j1]: s[r * ldw + j - j0] =
// scale * q_r . k_j (q rows fp32; 2 keys at a time: 2N independent FMA chains, each q load
// serving both keys; 16-bit k converted in the loop).
template <int N, typename T>
HIRES_AVX2 void scores_group(const float* qf, int64_t D, const T* k, int64_t k_stride, int64_t j0, int64_t j1,
                             float scale, float* s, int64_t ldw) {
  const int64_t D8 = D / 8 * 8;
  int64_t j = j0;
  for (; j + 1 <= j1; j += 2) {
    const T* k0 = k + j * k_stride;
    const T* k1 = k0 + k_stride;
    __m256 a0[N], a1[N];
    for (int r = 0; r < N; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D8; d += 8) {
      const __m256 kv0 = load8(k0 + d), kv1 = load8(k1 + d);
      for (int r = 0; r < N; ++r) {
        const __m256 qv = _mm256_loadu_ps(qf + r * D + d);
        a0[r] = _mm256_fmadd_ps(qv, kv0, a0[r]);
        a1[r] = _mm256_fmadd_ps(qv, kv1, a1[r]);
      }
    }
    for (int r = 0; r < N; ++r) {
      float t0 = hsum8(a0[r]), t1 = hsum8(a1[r]);
      for (int64_t d = D8; d < D; ++d) {
        t0 += qf[r * D + d] * static_cast<float>(k0[d]);
        t1 += qf[r * D + d] * static_cast<float>(k1[d]);
      }
      s[r * ldw + j - j0] = t0 * scale;
      s[r * ldw + j + 1 - j0] = t1 * scale;
    }
  }
  for (; j <= j1; ++j) {
    const T* k0 = k + j * k_stride;
    __m256 a0[N];
    for (int r = 0; r < N; ++r) a0[r] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D8; d += 8) {
      const __m256 kv0 = load8(k0 + d);
      for (int r = 0; r < N; ++r) a0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(qf + r * D + d), kv0, a0[r]);
    }
    for (int r = 0; r < N; ++r) {
      float t0 = hsum8(a0[r]);
      for (int64_t d = D8; d < D; ++d) t0 += qf[r * D + d] * static_cast<float>(k0[d]);
      s[r * ldw + j - j0] = t0 * scale;
    }
  }
}

// o_r[0:D] = sum_{j in [j0, j1]} p_r[j - j0] v_j for N rows (same visible keys): 16 output columns
// at a time in registers (v converted once per key and column block, no accumulator stores).
template <int N, typename T>
HIRES_AVX2 void pv_group(const float* p, int64_t ldw, const T* v, int64_t v_stride, int64_t j0, int64_t j1,
                         int64_t D, float* out) {
  int64_t c = 0;
  for (; c + 16 <= D; c += 16) {
    __m256 a0[N], a1[N];
    for (int r = 0; r < N; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
    for (int64_t j = j0; j <= j1; ++j) {
      const T* vr = v + j * v_stride + c;
      const __m256 v0 = load8(vr), v1 = load8(vr + 8);
      for (int r = 0; r < N; ++r) {
        const __m256 pr = _mm256_set1_ps(p[r * ldw + j - j0]);
        a0[r] = _mm256_fmadd_ps(pr, v0, a0[r]);
        a1[r] = _mm256_fmadd_ps(pr, v1, a1[r]);
      }
    }
    for (int r = 0; r < N; ++r) {
      _mm256_storeu_ps(out + r * D + c, a0[r]);
      _mm256_storeu_ps(out + r * D + c + 8, a1[r]);
    }
  }
  for (; c < D; ++c)  // head dims not a multiple of 16: the last columns one by one
    for (int r = 0; r < N; ++r) {
      float t = 0.f;
      for (int64_t j = j0; j <= j1; ++j) t += p[r * ldw + j - j0] * static_cast<float>(v[j * v_stride + c]);
      out[r * D + c] = t;
    }
}

// max of s[0:n] in *m; false when an entry is not finite
HIRES_AVX2 bool max_finite(const float* s, int64_t n, float* m) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), nz = zero;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 x = _mm256_loadu_ps(s + j);
    mx = _mm256_max_ps(mx, x);
    nz = _mm256_add_ps(nz, _mm256_mul_ps(x, zero));  // NaN once an entry is inf / NaN
  }
  float buf[8];
  _mm256_storeu_ps(buf, mx);
  float r = buf[0], z = hsum8(nz);
  for (int t = 1; t < 8; ++t) r = std::max(r, buf[t]);
  for (; j < n; ++j) {
    r = std::max(r, s[j]);
    z += s[j] * 0.f;
  }
  *m = r;
  return z == 0.f;
}

// sum_j exp(s[j] - m), writing the exponentials back into s (n entries, finite, m = max s)
HIRES_AVX2 float exp_sum(float* s, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
    _mm256_storeu_ps(s + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  float l = hsum8(acc);
  if (j < n) {  // the tail through the same polynomial (no libm: the same rounding as the lanes)
    float buf[8];
    for (int t = 0; t < 8; ++t) buf[t] = j + t < n ? s[j + t] - m : -100.f;
    _mm256_storeu_ps(buf, exp8_nonpos(_mm256_loadu_ps(buf)));
    for (int t = 0; j + t < n; ++t) {
      s[j + t] = buf[t];
      l += buf[t];
    }
  }
  return l;
}

// Visible key range [lo, hi] of each of the R = Sq * g query rows of batch element b (row r =
// query i * g + head gi; bottom-right aligned); [J0, J1] spans them (J1 < J0: no row sees a key).
struct RowRanges {
  std::vector<int64_t> lo, hi;
  int64_t J0 = 0, J1 = -1;
};

void row_ranges(const SmallQArgs& a, int64_t b, RowRanges& rr) {
  const int64_t g = a.Hq / a.Hkv, R = a.Sq * g;
  const int64_t L = a.lens != nullptr ? a.lens[b] : a.Sk;
  rr.lo.resize(R);
  rr.hi.resize(R);
  rr.J0 = L;
  rr.J1 = -1;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t c = r / g + L - a.Sq;  // the key aligned with query i
    rr.lo[r] = std::max<int64_t>(0, a.window_left >= 0 ? c - a.window_left : 0);
    rr.hi[r] = std::min<int64_t>(L - 1, a.window_right >= 0 ? c + a.window_right : L - 1);
    if (rr.lo[r] <= rr.hi[r]) {
      rr.J0 = std::min(rr.J0, rr.lo[r]);
      rr.J1 = std::max(rr.J1, rr.hi[r]);
    }
  }
}

// Multiply-adds of a decode call below which it runs on the calling thread.
constexpr int64_t kMinParallelWork = int64_t(1) << 16;

// Keys per chunk when a work item's keys are split (decode with fewer kv heads than threads).
constexpr int64_t kMinKeysPerChunk = 128;

// Chunks of one batch element's key span [J0, J1] (W keys): 1, or with fewer kv heads than threads
// up to ceil(threads / Hkv), each >= kMinKeysPerChunk keys. From one sequence's own sizes, never
// the batch's: a sequence's result does not depend on what it is batched with.
int64_t key_chunks(int64_t W, int64_t Hkv, int64_t threads) {
  if (threads <= Hkv || W < 2 * kMinKeysPerChunk) return 1;
  return std::max<int64_t>(1, std::min((threads + Hkv - 1) / Hkv, W / kMinKeysPerChunk));
}

// One chunk [c0, c1] of the keys of work item (batch b, kv head hk), for its R query rows (q head
// hk * g + gi): scores S = scale q k^T over each row's visible keys inside the chunk (kept in
// `buf`), then the unnormalised partial softmax: m[r] = max, l[r] = sum exp(s - m) (fp32; l = 0 and
// m = -inf for a row that sees no key of the chunk) and acc[r, :] = sum exp(s - m) v (R x D).
// Returns false on a non-finite visible score (the caller then runs the twin for the whole call).
template <typename T>
HIRES_AVX2 bool small_q_chunk(const SmallQArgs& a, int64_t b, int64_t hk, const RowRanges& rr, int64_t c0,
                              int64_t c1, std::vector<float>& buf, float* m_out, float* l_out, float* acc) {
  const int64_t g = a.Hq / a.Hkv, R = a.Sq * g, D = a.D;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const int64_t W = c1 >= c0 ? c1 - c0 + 1 : 0;
  buf.resize(size_t(R * D + R * W));
  float* qf = buf.data();   // (R, D) q rows in fp32
  float* sc = qf + R * D;   // (R, W) scores, then exp(s - m)
  // the rows' visible ranges clipped to the chunk (empty: lo > hi)
  std::vector<int64_t> lo_v(R), hi_v(R);
  int64_t* lo = lo_v.data();
  int64_t* hi = hi_v.data();
  for (int64_t r = 0; r < R; ++r) {
    lo[r] = std::max(rr.lo[r], c0);
    hi[r] = std::min(rr.hi[r], c1);
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = r / g, h = hk * g + r % g;
    to_f32_row(q + b * a.q_s[0] + i * a.q_s[1] + h * a.q_s[2], qf + r * D, D);
  }
  const float scale = static_cast<float>(a.scale);
  const T* kb = k + b * a.k_s[0] + hk * a.k_s[2];
  const T* vb = v + b * a.v_s[0] + hk * a.v_s[2];
  // groups of up to 4 consecutive rows with the same visible keys (decode: all; causal Sq > 1: the
  // g heads of one query)
  auto for_groups = [&](auto&& fn) {
    for (int64_t r0 = 0; r0 < R;) {
      int64_t n = 1;
      while (n < 4 && r0 + n < R && lo[r0 + n] == lo[r0] && hi[r0 + n] == hi[r0]) ++n;
      if (lo[r0] <= hi[r0]) fn(r0, n);
      r0 += n;
    }
  };
  for_groups([&](int64_t r0, int64_t n) {
    float* out = sc + r0 * W + (lo[r0] - c0);
    const float* qg = qf + r0 * D;
    switch (n) {
      case 4: scores_group<4>(qg, D, kb, a.k_s[1], lo[r0], hi[r0], scale, out, W); break;
      case 3: scores_group<3>(qg, D, kb, a.k_s[1], lo[r0], hi[r0], scale, out, W); break;
      case 2: scores_group<2>(qg, D, kb, a.k_s[1], lo[r0], hi[r0], scale, out, W); break;
      default: scores_group<1>(qg, D, kb, a.k_s[1], lo[r0], hi[r0], scale, out, W); break;
    }
  });
  for (int64_t r = 0; r < R; ++r) {
    if (lo[r] > hi[r]) {  // no visible key in this chunk
      m_out[r] = -std::numeric_limits<float>::infinity();
      l_out[r] = 0.f;
      continue;
    }
    float* s = sc + r * W + (lo[r] - c0);
    const int64_t n = hi[r] - lo[r] + 1;
    float m;
    if (!max_finite(s, n, &m)) return false;  // NaN / inf scores: the twin's rules
    m_out[r] = m;
    l_out[r] = exp_sum(s, n, m);  // >= 1 (the max contributes exp(0))
  }
  std::fill(acc, acc + R * D, 0.f);
  for_groups([&](int64_t r0, int64_t n) {
    const float* pg = sc + r0 * W + (lo[r0] - c0);
    float* out = acc + r0 * D;
    switch (n) {
      case 4: pv_group<4>(pg, W, vb, a.v_s[1], lo[r0], hi[r0], D, out); break;
      case 3: pv_group<3>(pg, W, vb, a.v_s[1], lo[r0], hi[r0], D, out); break;
      case 2: pv_group<2>(pg, W, vb, a.v_s[1], lo[r0], hi[r0], D, out); break;
      default: pv_group<1>(pg, W, vb, a.v_s[1], lo[r0], hi[r0], D, out); break;
    }
  });
  return true;
}

// o and lse of work item (b, hk) from its n chunks' partials (chunk c: m + c * R, l + c * R,
// acc + c * R * D): M = max_c m_c, l = sum_c l_c exp(m_c - M), o = sum_c acc_c exp(m_c - M) / l,
// lse = M + log l (n = 1: o = acc / l exactly); a row that sees no key gets o = 0, lse = -inf.
// Returns false on a non-finite output (a NaN / inf in a visible v row, or an overflow).
template <typename T>
HIRES_AVX2 bool small_q_finish(const SmallQArgs& a, int64_t b, int64_t hk, int64_t n, const float* m,
                               const float* l, const float* acc) {
  const int64_t g = a.Hq / a.Hkv, R = a.Sq * g, D = a.D;
  T* o = static_cast<T*>(a.o);
  bool ok = true;
  std::vector<float> w(static_cast<size_t>(n));
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = r / g, h = hk * g + r % g;
    float M = -std::numeric_limits<float>::infinity(), sum = 0.f;
    for (int64_t c = 0; c < n; ++c)
      if (l[c * R + r] > 0.f) M = std::max(M, m[c * R + r]);
    if (n == 1) {
      sum = l[r];
      w[0] = 1.f;
    } else {
      for (int64_t c = 0; c < n; ++c) {
        w[c] = l[c * R + r] > 0.f ? std::exp(m[c * R + r] - M) : 0.f;
        sum += l[c * R + r] * w[c];
      }
    }
    float* lse = a.lse != nullptr ? a.lse + b * a.lse_s[0] + h * a.lse_s[1] + i * a.lse_s[2] : nullptr;
    if (lse != nullptr) *lse = sum > 0.f ? M + std::log(sum) : -std::numeric_limits<float>::infinity();
    const float inv_l = sum > 0.f ? 1.f / sum : 0.f;  // a row that sees no key: o = 0
    T* orow = o + b * a.o_s[0] + i * a.o_s[1] + h * a.o_s[2];
    for (int64_t d = 0; d < D; ++d) {
      float t = acc[r * D + d];
      if (n > 1) {
        t *= w[0];
        for (int64_t c = 1; c < n; ++c) t += acc[(c * R + r) * D + d] * w[c];
      }
      const float val = t * inv_l;
      ok &= std::isfinite(val);
      orow[d] = static_cast<T>(val);
    }
  }
  return ok;  // a NaN / inf in a visible v row (or an overflow): the twin's rules
}
#endif

}  // namespace

bool attention_cpu_small_q(const SmallQArgs& a, at::ScalarType dtype) {
#ifdef HIRES_X86
  if (!cpu_has_avx2()) return false;
  std::atomic<bool> ok{true};
  const int64_t g = a.Hq / a.Hkv, R = a.Sq * g, D = a.D;
  const int64_t threads = at::get_num_threads();
  // rows' visible ranges per batch element and its key chunks; work units (b, hk, chunk)
  std::vector<RowRanges> ranges(size_t(a.B));
  std::vector<int64_t> chunks(size_t(a.B)), unit0(size_t(a.B) + 1, 0);
  for (int64_t b = 0; b < a.B; ++b) {
    row_ranges(a, b, ranges[b]);
    const int64_t W = ranges[b].J1 >= ranges[b].J0 ? ranges[b].J1 - ranges[b].J0 + 1 : 0;
    chunks[b] = key_chunks(W, a.Hkv, threads);
    unit0[b + 1] = unit0[b] + a.Hkv * chunks[b];
  }
  const int64_t units = unit0[a.B];
  // one thread below ~64K multiply-adds of q k and p v in all (a parallel region's fork / join
  // would cost about as much as the work)
  int64_t work = 0;
  for (int64_t b = 0; b < a.B; ++b)
    work += ranges[b].J1 >= ranges[b].J0 ? (ranges[b].J1 - ranges[b].J0 + 1) * a.Hkv * R * D * 2 : 0;
  const int64_t grain = work < kMinParallelWork ? units : 1;
  // split items: their chunks' partials (m, l: R each; acc: R x D), merged by the chunk that
  // finishes last (an acq_rel counter per item orders the others' writes before the merge)
  const bool split = units > a.B * a.Hkv;
  std::vector<float> part;
  std::vector<int64_t> part0;
  std::unique_ptr<std::atomic<int64_t>[]> done;
  if (split) {
    part.resize(size_t(units * R * (D + 2)));
    done.reset(new std::atomic<int64_t>[size_t(a.B * a.Hkv)]);
    for (int64_t i = 0; i < a.B * a.Hkv; ++i) done[i].store(0, std::memory_order_relaxed);
  }
  auto run = [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> buf, own(size_t(R * (D + 2)));
      for (int64_t u = begin; u < end && ok.load(std::memory_order_relaxed); ++u) {
        const int64_t b = int64_t(std::upper_bound(unit0.begin(), unit0.end(), u) - unit0.begin()) - 1;
        const int64_t n = chunks[b], hk = (u - unit0[b]) / n, c = (u - unit0[b]) % n;
        const RowRanges& rr = ranges[b];
        if (n == 1) {  // the whole item: straight to o / lse
          float* m = own.data();
          if (!small_q_chunk<T>(a, b, hk, rr, rr.J0, rr.J1, buf, m, m + R, m + 2 * R) ||
              !small_q_finish<T>(a, b, hk, 1, m, m + R, m + 2 * R))
            ok = false;
          continue;
        }
        // chunk c of the item's span: keys [J0 + c * len, min(J1, J0 + (c + 1) * len - 1)]
        const int64_t W = rr.J1 - rr.J0 + 1, len = (W + n - 1) / n;
        const int64_t c0 = rr.J0 + c * len, c1 = std::min(rr.J1, c0 + len - 1);
        const int64_t first = unit0[b] + hk * n;  // this item's first unit
        float* base = part.data() + first * R * (D + 2);  // m (n x R), l (n x R), acc (n x R x D)
        if (!small_q_chunk<T>(a, b, hk, rr, c0, c1, buf, base + c * R, base + n * R + c * R,
                              base + 2 * n * R + c * R * D)) {
          ok = false;
          continue;
        }
        if (done[b * a.Hkv + hk].fetch_add(1, std::memory_order_acq_rel) == n - 1 &&
            !small_q_finish<T>(a, b, hk, n, base, base + n * R, base + 2 * n * R))
          ok = false;
      }
    });
  };
  switch (dtype) {
    case at::kFloat: run(float()); break;
    case at::kHalf: run(c10::Half()); break;
    case at::kBFloat16: run(c10::BFloat16()); break;
    default: return false;
  }
  return ok;
#else
  (void)a;
  (void)dtype;
  return false;
#endif
}

}  // namespace hires::attention
