// CPU twin of the fused ConvNeXt MLP kernel (kernels/convnext/fused_mlp.cuh). It models, step by
// step, what one thread block does:
//   - a block owns BM = fused_mlp_bm(C) pixel rows (the last block a partial tile: rows past M
//     are zero-filled in the kernel and never stored, so they are skipped here);
//   - the hidden dimension F is walked in chunks of BH = fused_mlp_bh(C) columns, in order;
//   - per chunk: S = x_tile . W1[chunk]^T in fp32 (k = 0..C-1 in order; the mma.sync groups 16
//     products per instruction, whose internal order is not modelled), then
//     H = round_T(GELU_erf(S + b1)): the ONE rounding of the hidden, as the unfused path rounds
//     when it stores fc1's output;
//   - O (BM x C, fp32) accumulates H . W2[:, chunk]^T chunk after chunk (never rounded);
//   - the final epilogue: out = round_T(res + gamma * (O + b2)), in fp32, one rounding.
// Blocks are independent (at::parallel_for over them), as the kernel's grid.
#include "csrc/cpu/fused_mlp.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace hires::convnext {
namespace {

inline float gelu_erf(float s) { return 0.5f * s * (1.f + std::erf(s * 0.70710678118654752f)); }

template <typename T>
inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

template <typename T>
void run(const FusedMlpParams& p) {
  const int64_t M = p.M, C = p.C, F = p.F;
  const int64_t BM = fused_mlp_bm(C), BH = fused_mlp_bh(C);
  const T* x = static_cast<const T*>(p.x);
  const T* w1 = static_cast<const T*>(p.w1);
  const T* w2 = static_cast<const T*>(p.w2);
  const T* b1 = static_cast<const T*>(p.b1);
  const T* b2 = static_cast<const T*>(p.b2);
  const T* g = static_cast<const T*>(p.gamma);
  const T* res = static_cast<const T*>(p.residual);
  T* out = static_cast<T*>(p.out);

  // Weights in fp32 once, laid out so the inner loops run over contiguous memory:
  // w1t[k][h] = W1[h][k], w2t[h][n] = W2[n][h].
  std::vector<float> w1t(size_t(C) * F), w2t(size_t(F) * C), b1f(F, 0.f), b2f(C, 0.f), gf(C, 1.f);
  for (int64_t h = 0; h < F; ++h)
    for (int64_t k = 0; k < C; ++k) w1t[size_t(k) * F + h] = static_cast<float>(w1[h * C + k]);
  for (int64_t n = 0; n < C; ++n)
    for (int64_t h = 0; h < F; ++h) w2t[size_t(h) * C + n] = static_cast<float>(w2[n * F + h]);
  for (int64_t h = 0; h < F; ++h)
    if (b1) b1f[h] = static_cast<float>(b1[h]);
  for (int64_t n = 0; n < C; ++n) {
    if (b2) b2f[n] = static_cast<float>(b2[n]);
    if (g) gf[n] = static_cast<float>(g[n]);
  }

  const int64_t blocks = (M + BM - 1) / BM;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xs(size_t(BM) * C), O(size_t(BM) * C), S(size_t(BM) * BH);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t m0 = blk * BM, rows = std::min(BM, M - m0);
      for (int64_t i = 0; i < rows * C; ++i) xs[i] = static_cast<float>(x[m0 * C + i]);  // x tile
      std::fill(O.begin(), O.end(), 0.f);
      for (int64_t j0 = 0; j0 < F; j0 += BH) {  // hidden chunks, in order
        const int64_t bh = std::min(BH, F - j0);
        // GEMM 1: S = x_tile . W1[j0:j0+bh]^T, fp32, k in order.
        std::fill(S.begin(), S.end(), 0.f);
        for (int64_t m = 0; m < rows; ++m)
          for (int64_t k = 0; k < C; ++k) {
            const float xv = xs[m * C + k];
            const float* wr = &w1t[size_t(k) * F + j0];
            float* sr = &S[m * BH];
            for (int64_t h = 0; h < bh; ++h) sr[h] += xv * wr[h];
          }
        // Epilogue of GEMM 1: bias + erf-GELU in fp32, rounded once to T (the A operand of GEMM 2).
        for (int64_t m = 0; m < rows; ++m)
          for (int64_t h = 0; h < bh; ++h)
            S[m * BH + h] = round_to<T>(gelu_erf(S[m * BH + h] + b1f[j0 + h]));
        // GEMM 2: O += H . W2[:, j0:j0+bh]^T, fp32, h in order within the chunk.
        for (int64_t m = 0; m < rows; ++m)
          for (int64_t h = 0; h < bh; ++h) {
            const float hv = S[m * BH + h];
            const float* wr = &w2t[size_t(j0 + h) * C];
            float* orow = &O[m * C];
            for (int64_t n = 0; n < C; ++n) orow[n] += hv * wr[n];
          }
      }
      // Final epilogue: (O + b2) * gamma + res, one rounding.
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t n = 0; n < C; ++n) {
          const int64_t i = (m0 + m) * C + n;
          const float v = (O[m * C + n] + b2f[n]) * gf[n];
          out[i] = static_cast<T>(static_cast<float>(res[i]) + v);
        }
    }
  });
}

}  // namespace

void fused_mlp_cpu(const FusedMlpParams& p, at::ScalarType t) {
  if (p.M == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "fused_mlp_cpu", [&] { run<scalar_t>(p); });
}

}  // namespace hires::convnext

// ---- default CPU path: oneDNN GEMMs in x's dtype (see fused_mlp.h) ----------------------------
#include <ATen/core/dispatch/Dispatcher.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

namespace hires::convnext {
namespace {

// mkldnn::_linear_pointwise overloads, looked up once (null when this torch lacks them).
const c10::OperatorHandle* linear_pointwise_op(const char* overload) {
  auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", overload});
  return op ? new c10::OperatorHandle(*op) : nullptr;  // lives as long as the process
}

const c10::OperatorHandle* linear_unary() {
  static const c10::OperatorHandle* h = linear_pointwise_op("");
  return h;
}

const c10::OperatorHandle* linear_binary() {
  static const c10::OperatorHandle* h = linear_pointwise_op("binary");
  return h;
}

// Dtypes oneDNN refused on this CPU (bit per dtype: fp32, fp16, bf16).
std::atomic<unsigned> g_refused{0};

unsigned dtype_bit(at::ScalarType t) {
  return t == at::kFloat ? 1u : t == at::kHalf ? 2u : 4u;
}

c10::IValue opt(const at::Tensor& t) { return t.defined() ? c10::IValue(t) : c10::IValue(); }

// _linear_pointwise(X, W, B, attr, [], "none"): X W^T + B, then the unary attr, one rounding.
at::Tensor linear_unary_call(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                             const char* attr) {
  std::vector<c10::IValue> st;
  st.reserve(6);
  st.emplace_back(x);
  st.emplace_back(w);
  st.emplace_back(opt(b));
  st.emplace_back(std::string(attr));
  st.emplace_back(c10::List<c10::optional<at::Scalar>>());
  st.emplace_back(std::string("none"));
  linear_unary()->callBoxed(&st);
  return st[0].toTensor();
}

// _linear_pointwise.binary(X, other, W, B, "add"): X W^T + B + other, one rounding.
at::Tensor linear_add_call(const at::Tensor& x, const at::Tensor& other, const at::Tensor& w,
                           const at::Tensor& b) {
  std::vector<c10::IValue> st;
  st.reserve(5);
  st.emplace_back(x);
  st.emplace_back(other);
  st.emplace_back(w);
  st.emplace_back(opt(b));
  st.emplace_back(std::string("add"));
  linear_binary()->callBoxed(&st);
  return st[0].toTensor();
}

// True when every element of t (contiguous, fp32/fp16/bf16) is finite: an exponent-bits test.
template <typename U>
bool all_finite_bits(const at::Tensor& t, U mask) {
  const U* p = static_cast<const U*>(t.const_data_ptr());
  std::atomic<bool> ok{true};
  at::parallel_for(0, t.numel(), 1 << 16, [&](int64_t b, int64_t e) {
    bool good = true;
    for (int64_t i = b; i < e; ++i) good &= (p[i] & mask) != mask;
    if (!good) ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}

bool all_finite(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return all_finite_bits<uint32_t>(t, 0x7F800000u);
    case at::kHalf: return all_finite_bits<uint16_t>(t, uint16_t(0x7C00));
    default: return all_finite_bits<uint16_t>(t, uint16_t(0x7F80));  // bf16
  }
}

}  // namespace

at::Tensor mlp_cpu_onednn(const at::Tensor& x2, const at::Tensor& fc1_weight,
                          const c10::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
                          const c10::optional<at::Tensor>& fc2_bias,
                          const c10::optional<at::Tensor>& gamma, const at::Tensor& res2) {
  const char* env = std::getenv("HIRES_LMM_CPU_ONEDNN_MLP");
  if (env != nullptr && std::strcmp(env, "0") == 0) return at::Tensor();
  const at::ScalarType t = x2.scalar_type();
  // fp32 with little work (the benchmark's smallest shapes): ATen's MKL GEMMs have less fixed cost
  // per call than building oneDNN primitives, and the same roundings.
  if (t == at::kFloat && x2.size(0) * x2.size(1) * fc1_weight.size(0) <= (int64_t(1) << 24))
    return at::Tensor();
  if (!at::hasMKLDNN() || !at::globalContext().userEnabledMkldnn() || linear_unary() == nullptr ||
      linear_binary() == nullptr || (g_refused.load() & dtype_bit(t)) != 0)
    return at::Tensor();
  const at::Tensor w1 = fc1_weight.contiguous(), w2 = fc2_weight.contiguous();
  const at::Tensor b1 = fc1_bias ? fc1_bias->contiguous() : at::Tensor();
  const at::Tensor b2 = fc2_bias ? fc2_bias->contiguous() : at::Tensor();
  const int64_t M = x2.size(0), F = fc1_weight.size(0);
  // Row chunks whose hidden is ~16 MB: it is reused from the allocator's heap chunk after chunk
  // (a whole-M hidden of 100+ MB is a fresh mmap, page-faulted on every call) and partly stays in
  // cache for fc2. Measured here 1.3-1.8x faster than one call over all M at M = 36864.
  const int64_t rows = std::max<int64_t>(1, (int64_t(16) << 20) / (F * x2.element_size()));
  at::Tensor out = at::empty_like(res2);
  try {
    for (int64_t r0 = 0; r0 < M; r0 += rows) {
      const int64_t r1 = std::min(M, r0 + rows);
      const at::Tensor xc = x2.slice(0, r0, r1), rc = res2.slice(0, r0, r1);
      at::Tensor oc = out.slice(0, r0, r1);
      const at::Tensor h = linear_unary_call(xc, w1, b1, "gelu");  // round_T(GELU_erf(x W1^T + b1))
      if (gamma) {
        const at::Tensor p = linear_unary_call(h, w2, b2, "none");  // round_T(h W2^T + b2)
        at::addcmul_out(oc, rc, *gamma, p);                         // round_T(res + gamma * p)
      } else {
        const at::Tensor y = linear_add_call(h, rc, w2, b2);        // round_T(h W2^T + b2 + res)
        if (y.scalar_type() != t || y.sizes() != oc.sizes()) return at::Tensor();
        oc.copy_(y);
      }
    }
  } catch (const c10::Error&) {
    // oneDNN does not take this dtype on this CPU (e.g. bf16 without AVX-512 / AMX): remember.
    g_refused.fetch_or(dtype_bit(t));
    return at::Tensor();
  }
  if (!all_finite(out)) return at::Tensor();
  return out;
}

}  // namespace hires::convnext
