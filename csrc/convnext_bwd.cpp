// Backward of the ConvNeXt ops (dwconv_layernorm, convnext_block, convnext_mlp): one C++ formula
// for every device, made of ATen ops and our norm_backward / dwconv_backward kernels.
//   hires_lmm::dwconv_layernorm_backward, convnext_block_backward, convnext_mlp_backward
// are ops with one CompositeExplicitAutograd kernel (every device) and fake kernels in
// python/hires_lmm/ops/convnext.py (torch.compile keeps them as single nodes of the backward
// graph); the Python autograd there calls them (CUDA), and on the CPU the ops' autograd is the C++
// functions at the end of this file (AutogradCPU), which call them through the dispatcher: a call
// without gradients goes straight to the CPU kernel, and a training step runs no Python between
// the wrapper and the kernels.
//
// convnext_mlp / the block's MLP: out = res + gamma * (G(a W1^T + b1) W2^T + b2), G = erf-GELU.
// fc1 is recomputed in row chunks (temporaries of about chunk_elems fp32 elements); with
// dv = go * gamma:
//     dW2 = dv^T G(u)   db2 = sum_m dv   dgamma = sum_m go * (G(u) W2^T + b2)
//         = rowsum((go^T G(u)) * W2) + b2 * sum_m go        (no second fc2 GEMM)
//     du = (dv W2) * G'(u)   dW1 = du^T a   db1 = sum_m du   da = du W1
// fp32: fp32 GEMMs, the fp32 formula's derivative. fp16 / bf16: the GEMMs in that dtype (fp32
// accumulation; AMX / tensor cores) with eager autograd's roundings: u, G(u), dv, dv W2 and du
// rounded to it once; db1, db2, dgamma and the chunk sums in fp32.
// Saved by the forwards: x and the parameters only.
#include <torch/library.h>
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "csrc/common.h"
#include "csrc/cpu/gelu.h"

namespace hires::convnext {
namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

constexpr int64_t kMlpBwdChunkElems = int64_t(1) << 22;  // (rows, F) fp32 temporaries ~16 MB

Tensor as(const Tensor& t, at::ScalarType dt) { return !t.defined() || t.scalar_type() == dt ? t : t.to(dt); }
Tensor opt(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}
using Grads3 = std::tuple<Tensor, Tensor, Tensor>;
using NormBwdSig = Grads3(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, double, bool, bool);
using DwBwdSig = Grads3(const Tensor&, const Tensor&, const Tensor&, bool);

// fp32 gradients (da in t for fp16 / bf16) of the MLP; see the file comment. need: a, w1, b1, w2, b2, gamma.
std::array<Tensor, 6> mlp_grads(const Tensor& go, const Tensor& a, const Tensor& w1, const Tensor& b1,
                                const Tensor& w2, const Tensor& b2, const Tensor& gamma,
                                std::array<bool, 6> need, int64_t chunk_elems) {
  const bool need_a = need[0], need_w1 = need[1], need_b1 = need[2] && b1.defined();
  const bool need_w2 = need[3], need_b2 = need[4] && b2.defined(), need_g = need[5] && gamma.defined();
  const int64_t M = a.size(0), C = a.size(1), Fh = w1.size(0);
  const auto f32 = at::kFloat;
  const at::ScalarType a_t = a.scalar_type();
  const at::ScalarType t = (a_t == at::kHalf || a_t == at::kBFloat16) ? a_t : f32;
  const bool lowp = t != f32;
  const Tensor w1t = as(w1, t), w2t = as(w2, t), b1t = as(b1, t), gf = as(gamma, f32);
  const bool need_gsum = (need_b2 || need_g) && b2.defined();
  // go in fp32 only where it is read in fp32 (fp32 GEMMs, dv = go * gamma, the column sums)
  const Tensor go32 = (!lowp || gf.defined() || need_gsum) ? as(go, f32) : Tensor();
  const bool need_gu = need_w2 || need_g;  // G(u) for go^T G(u)
  const bool need_du = need_a || need_w1 || need_b1;
  Tensor da, dw1, db1, gtg, dv, w2g;
  if (need_du) {
    if (lowp) {  // dv = round(go * gamma), then dv W2 in t
      dv = gf.defined() ? (go32 * gf).to(t) : as(go, t);
      w2g = w2t;
    } else {  // fp32: go (gamma W2), one fp32 product
      dv = go32;
      w2g = gf.defined() ? w2t * gf.unsqueeze(1) : w2t;
    }
    if (need_a) da = at::empty({M, C}, go.options().dtype(t));
  }
  if (need_gu || need_du) {
    const Tensor got = as(go, t);
    const int64_t rows = std::max<int64_t>(1, chunk_elems / std::max<int64_t>(Fh, 1));
    for (int64_t r0 = 0; r0 < M; r0 += rows) {
      const int64_t n = std::min(M, r0 + rows) - r0;
      const bool first = r0 == 0;
      const Tensor ac = as(a.narrow(0, r0, n), t);
      const Tensor u = b1t.defined() ? at::addmm(b1t, ac, w1t.t()) : at::mm(ac, w1t.t());
      Tensor gu, du;  // G(u) and du = (dv W2) * G'(u), each rounded to t once
      if (need_du) {  // CPU: both in one pass (one exp per element; the same values whichever are needed)
        const Tensor dh = at::mm(dv.narrow(0, r0, n), w2g);
        if (!(u.is_cpu() && gelu_fwd_bwd_cpu(u, dh, gu, du))) du = at::gelu_backward(dh, u);
      }
      if (need_gu) {
        Tensor unused;
        if (!gu.defined() && !(u.is_cpu() && gelu_fwd_bwd_cpu(u, Tensor(), gu, unused))) gu = at::gelu(u);
        const Tensor s = at::mm(got.narrow(0, r0, n).t(), gu);
        gtg = first ? as(s, f32) : gtg.add_(s);
      }
      if (need_du) {
        if (need_b1) {
          const Tensor s = du.sum(0);  // fp32 accumulation (dtype=f32 would copy du)
          db1 = first ? as(s, f32) : db1.add_(s);
        }
        if (need_w1) {
          const Tensor s = at::mm(du.t(), ac);
          dw1 = first ? as(s, f32) : dw1.add_(s);
        }
        if (need_a) {
          Tensor dst = da.narrow(0, r0, n);
          at::mm_out(dst, du, w1t);
        }
      }
    }
  }
  const Tensor gsum = need_gsum ? go32.sum(0) : Tensor();
  Tensor dw2, db2, dgamma;
  if (need_w2) dw2 = gf.defined() ? gtg * gf.unsqueeze(1) : gtg;
  if (need_b2) db2 = gf.defined() ? gsum * gf : gsum;
  if (need_g) {
    dgamma = (gtg * as(w2, f32)).sum(1);
    if (b2.defined()) dgamma = dgamma + gsum * as(b2, f32);
  }
  return {da, dw1, db1, dw2, db2, dgamma};
}

// d x, dw_weight, dw_bias, ln_weight, ln_bias of LayerNorm(dwconv(x)) given dh = d LayerNorm output
// (fp32) and y = the conv output in fp32 (NHWC contiguous).
std::array<Tensor, 5> dwln_grads_from(const Tensor& dh, const Tensor& y, const Tensor& x, const Tensor& dw_weight,
                                      const Tensor& dw_bias, const Tensor& ln_weight, const Tensor& ln_bias,
                                      double eps, const std::array<bool, 5>& need) {
  static const auto norm_bwd = typed_op<NormBwdSig>("hires_lmm::norm_backward");
  static const auto dw_bwd = typed_op<DwBwdSig>("hires_lmm::dwconv_backward");
  auto [dy, dlnw, dlnb] = norm_bwd.call(dh, y, as(ln_weight, at::kFloat), c10::nullopt, eps, true, ln_bias.defined());
  auto [gx, gw, gb] = dw_bwd.call(dy, x, dw_weight, dw_bias.defined());
  return {need[0] ? gx : Tensor(), need[1] ? gw : Tensor(), need[2] && dw_bias.defined() ? gb : Tensor(),
          need[3] ? as(dlnw, ln_weight.scalar_type()) : Tensor(),
          need[4] && ln_bias.defined() ? as(dlnb, ln_bias.scalar_type()) : Tensor()};
}

// the depthwise conv of x in fp32, NHWC contiguous (oneDNN keeps channels-last: the permutes are views)
Tensor conv_f32(const Tensor& x, const Tensor& dw_weight, const Tensor& dw_bias) {
  const int64_t k = dw_weight.size(-1);
  return at::conv2d(as(x, at::kFloat).permute({0, 3, 1, 2}), as(dw_weight, at::kFloat), as(dw_bias, at::kFloat),
                    {1, 1}, {k / 2, k / 2}, {1, 1}, x.size(3))
      .permute({0, 2, 3, 1})
      .contiguous();
}

using Grads10 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Grads6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Grads5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

}  // namespace

Grads5 dwconv_layernorm_backward(
    const Tensor& grad, const Tensor& x, const Tensor& dw_weight, const OptTensor& dw_bias, const Tensor& ln_weight,
    const OptTensor& ln_bias, double eps, std::array<bool, 5> need) {
  if (!std::any_of(need.begin(), need.end(), [](bool b) { return b; })) return {};
  const Tensor y = conv_f32(x, dw_weight, opt(dw_bias));
  auto g = dwln_grads_from(as(grad, at::kFloat).contiguous(), y, x, dw_weight, opt(dw_bias), ln_weight, opt(ln_bias),
                           eps, need);
  return {g[0], g[1], g[2], g[3], g[4]};
}

std::vector<Tensor> block_grads(const Tensor& grad, const Tensor& x, const Tensor& dw_weight,
                                            const OptTensor& dw_bias, const Tensor& ln_weight, const OptTensor& ln_bias,
                                            const Tensor& w1, const OptTensor& b1, const Tensor& w2,
                                            const OptTensor& b2, const OptTensor& gamma, double eps,
                                            std::array<bool, 10> need, int64_t chunk_elems) {
  std::vector<Tensor> result(10);
  if (!std::any_of(need.begin(), need.end(), [](bool b) { return b; })) return result;
  const Tensor params[10] = {x, dw_weight, opt(dw_bias), ln_weight, opt(ln_bias), w1, opt(b1), w2, opt(b2), opt(gamma)};
  if (x.numel() == 0) {
    for (int i = 1; i < 10; ++i)
      if (need[i] && params[i].defined()) result[i] = at::zeros_like(params[i]);
    if (need[0]) result[0] = as(grad, x.scalar_type());
    return result;
  }
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3), M = B * H * W;
  const bool need_conv = need[0] || need[1] || need[2] || need[3] || need[4];
  const Tensor y = conv_f32(x, dw_weight, opt(dw_bias));
  Tensor h = at::layer_norm(y, {C}, as(ln_weight, at::kFloat), as(opt(ln_bias), at::kFloat), eps);
  if (x.scalar_type() != at::kFloat) h = h.to(x.scalar_type());  // the forward kernel's output, as fc1 reads it
  const auto g = mlp_grads(grad.reshape({M, C}), h.reshape({M, C}), w1, opt(b1), w2, opt(b2), opt(gamma),
                           {need_conv, need[5], need[6], need[7], need[8], need[9]}, chunk_elems);
  for (int i = 5; i < 10; ++i)
    if (g[i - 4].defined()) result[i] = as(g[i - 4], params[i].scalar_type());
  if (need_conv) {
    auto c = dwln_grads_from(as(g[0], at::kFloat).view({B, H, W, C}), y, x, dw_weight, opt(dw_bias), ln_weight,
                             opt(ln_bias), eps, {need[0], need[1], need[2], need[3], need[4]});
    if (need[0]) c[0] = c[0].add_(as(grad, x.scalar_type()));
    for (int i = 0; i < 5; ++i) result[i] = c[i];
  }
  return result;
}

std::vector<Tensor> mlp_op_grads(const Tensor& grad, const Tensor& x, const Tensor& w1, const OptTensor& b1,
                                          const Tensor& w2, const OptTensor& b2, const OptTensor& gamma,
                                          std::array<bool, 6> need, int64_t chunk_elems) {
  std::vector<Tensor> result(6);
  if (!std::any_of(need.begin(), need.end(), [](bool b) { return b; })) return result;
  const int64_t C = x.size(-1), M = C > 0 ? x.numel() / C : 0;
  const auto g = mlp_grads(grad.reshape({M, C}), x.reshape({M, C}), w1, opt(b1), w2, opt(b2), opt(gamma), need,
                           chunk_elems);
  const Tensor params[6] = {x, w1, opt(b1), w2, opt(b2), opt(gamma)};
  for (int i = 0; i < 6; ++i)
    if (g[i].defined()) result[i] = as(g[i], params[i].scalar_type()).reshape(params[i].sizes());
  return result;
}

Grads10 convnext_block_backward(const Tensor& grad, const Tensor& x, const Tensor& dw_weight, const OptTensor& dw_bias,
                                const Tensor& ln_weight, const OptTensor& ln_bias, const Tensor& w1, const OptTensor& b1,
                                const Tensor& w2, const OptTensor& b2, const OptTensor& gamma, double eps,
                                std::array<bool, 10> need, int64_t chunk_elems) {
  const auto r = block_grads(grad, x, dw_weight, dw_bias, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps, need, chunk_elems);
  return {r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9]};
}

Grads6 convnext_mlp_backward(const Tensor& grad, const Tensor& x, const Tensor& w1, const OptTensor& b1, const Tensor& w2,
                             const OptTensor& b2, const OptTensor& gamma, std::array<bool, 6> need, int64_t chunk_elems) {
  const auto r = mlp_op_grads(grad, x, w1, b1, w2, b2, gamma, need, chunk_elems);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

// (GELU(u), grad * GELU'(u)) as the MLP backward computes them (tests): the fused CPU pass where it
// applies, else ATen's gelu / gelu_backward; grad undefined -> the second output undefined.
std::tuple<Tensor, Tensor> gelu_fwd_bwd(const Tensor& u, const OptTensor& grad) {
  Tensor gu, du;
  const Tensor g = opt(grad);
  if (u.is_cpu() && gelu_fwd_bwd_cpu(u.contiguous(), g.defined() ? g.contiguous() : g, gu, du)) return {gu, du};
  return {at::gelu(u), g.defined() ? at::gelu_backward(g, u) : Tensor()};
}

// ---- autograd on the CPU key -----------------------------------------------------------------------
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool needs_grad(std::initializer_list<const Tensor*> ts) {
  if (!c10::GradMode::is_enabled()) return false;
  for (const Tensor* t : ts)
    if (t->defined() && t->requires_grad()) return true;
  return false;
}

// needs_input_grad per tensor argument: the Function's variables are its defined tensor arguments
// only (an absent optional is none), so argument i maps to the count of defined ones before it.
// saved[i] is argument i as saved (undefined where absent).
template <size_t N>
std::array<bool, N> needs(AutogradContext* ctx, const variable_list& saved) {
  std::array<bool, N> n{};
  size_t v = 0;
  for (size_t i = 0; i < N; ++i)
    if (i >= saved.size() || saved[i].defined()) n[i] = ctx->needs_input_grad(v++);
  return n;
}

using DwlnSig = Tensor(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const OptTensor&, double);
using BlockSig = Tensor(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const OptTensor&, const Tensor&,
                        const OptTensor&, const Tensor&, const OptTensor&, const OptTensor&, double);
using MlpSig = Tensor(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const OptTensor&, const OptTensor&,
                      const Tensor&);
using DwlnBwdSig = Grads5(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const OptTensor&,
                          double, std::array<bool, 5>);
using BlockBwdSig = Grads10(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const OptTensor&,
                            const Tensor&, const OptTensor&, const Tensor&, const OptTensor&, const OptTensor&, double,
                            std::array<bool, 10>, int64_t);
using MlpBwdSig = Grads6(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const OptTensor&,
                         const OptTensor&, std::array<bool, 6>, int64_t);

struct DwlnFn : public torch::autograd::Function<DwlnFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& dw_weight, const OptTensor& dw_bias,
                               const Tensor& ln_weight, const OptTensor& ln_bias, double eps) {
    static const auto op = typed_op<DwlnSig>("hires_lmm::dwconv_layernorm");
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = op.call(x, dw_weight, dw_bias, ln_weight, ln_bias, eps);
    ctx->save_for_backward({x, dw_weight, opt(dw_bias), ln_weight, opt(ln_bias)});
    ctx->saved_data["eps"] = eps;
    return {out};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = typed_op<DwlnBwdSig>("hires_lmm::dwconv_layernorm_backward");
    const auto s = ctx->get_saved_variables();
    auto [gx, gw, gb, glw, glb] = op.call(grads[0], s[0], s[1], s[2], s[3], s[4], ctx->saved_data["eps"].toDouble(),
                                          needs<5>(ctx, s));
    return {gx, gw, gb, glw, glb, Tensor()};
  }
};

struct BlockFn : public torch::autograd::Function<BlockFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& dw_weight, const OptTensor& dw_bias,
                               const Tensor& ln_weight, const OptTensor& ln_bias, const Tensor& w1, const OptTensor& b1,
                               const Tensor& w2, const OptTensor& b2, const OptTensor& gamma, double eps) {
    static const auto op = typed_op<BlockSig>("hires_lmm::convnext_block");
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = op.call(x, dw_weight, dw_bias, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps);
    ctx->save_for_backward({x, dw_weight, opt(dw_bias), ln_weight, opt(ln_bias), w1, opt(b1), w2, opt(b2), opt(gamma)});
    ctx->saved_data["eps"] = eps;
    return {out};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = typed_op<BlockBwdSig>("hires_lmm::convnext_block_backward");
    const auto s = ctx->get_saved_variables();
    auto [g0, g1, g2, g3, g4, g5, g6, g7, g8, g9] =
        op.call(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9], ctx->saved_data["eps"].toDouble(),
                needs<10>(ctx, s), kMlpBwdChunkElems);
    return {g0, g1, g2, g3, g4, g5, g6, g7, g8, g9, Tensor()};
  }
};

struct MlpFn : public torch::autograd::Function<MlpFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& w1, const OptTensor& b1,
                               const Tensor& w2, const OptTensor& b2, const OptTensor& gamma, const Tensor& residual) {
    static const auto op = typed_op<MlpSig>("hires_lmm::convnext_mlp");
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = op.call(x, w1, b1, w2, b2, gamma, residual);
    ctx->save_for_backward({x, w1, opt(b1), w2, opt(b2), opt(gamma)});  // not the residual: its gradient is grad
    ctx->saved_data["res_dtype"] = residual.scalar_type();
    return {out};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto n = needs<7>(ctx, s);  // the residual (argument 6) is not saved: always a variable
    static const auto op = typed_op<MlpBwdSig>("hires_lmm::convnext_mlp_backward");
    auto [g0, g1, g2, g3, g4, g5] = op.call(grads[0], s[0], s[1], s[2], s[3], s[4], s[5],
                                            {n[0], n[1], n[2], n[3], n[4], n[5]}, kMlpBwdChunkElems);
    return {g0, g1, g2, g3, g4, g5, n[6] ? as(grads[0], ctx->saved_data["res_dtype"].toScalarType()) : Tensor()};
  }
};

Tensor dwconv_layernorm_autograd_cpu(const Tensor& x, const Tensor& dw_weight, const OptTensor& dw_bias,
                                     const Tensor& ln_weight, const OptTensor& ln_bias, double eps) {
  const Tensor b = opt(dw_bias), lb = opt(ln_bias);
  if (!needs_grad({&x, &dw_weight, &b, &ln_weight, &lb})) {
    static const auto op = typed_op<DwlnSig>("hires_lmm::dwconv_layernorm");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, dw_weight, dw_bias, ln_weight, ln_bias, eps);
  }
  return DwlnFn::apply(x, dw_weight, dw_bias, ln_weight, ln_bias, eps)[0];
}

Tensor convnext_block_autograd_cpu(const Tensor& x, const Tensor& dw_weight, const OptTensor& dw_bias,
                                   const Tensor& ln_weight, const OptTensor& ln_bias, const Tensor& w1,
                                   const OptTensor& b1, const Tensor& w2, const OptTensor& b2, const OptTensor& gamma,
                                   double eps) {
  const Tensor db = opt(dw_bias), lb = opt(ln_bias), fb1 = opt(b1), fb2 = opt(b2), g = opt(gamma);
  if (!needs_grad({&x, &dw_weight, &db, &ln_weight, &lb, &w1, &fb1, &w2, &fb2, &g})) {
    static const auto op = typed_op<BlockSig>("hires_lmm::convnext_block");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, dw_weight, dw_bias, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps);
  }
  return BlockFn::apply(x, dw_weight, dw_bias, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps)[0];
}

Tensor convnext_mlp_autograd_cpu(const Tensor& x, const Tensor& w1, const OptTensor& b1, const Tensor& w2,
                                 const OptTensor& b2, const OptTensor& gamma, const Tensor& residual) {
  const Tensor fb1 = opt(b1), fb2 = opt(b2), g = opt(gamma);
  if (!needs_grad({&x, &w1, &fb1, &w2, &fb2, &g, &residual})) {
    static const auto op = typed_op<MlpSig>("hires_lmm::convnext_mlp");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, w1, b1, w2, b2, gamma, residual);
  }
  return MlpFn::apply(x, w1, b1, w2, b2, gamma, residual)[0];
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hires_lmm, m) {
  m.def("dwconv_layernorm_backward(Tensor grad, Tensor x, Tensor dw_weight, Tensor? dw_bias, Tensor ln_weight, "
        "Tensor? ln_bias, float eps, bool[5] need) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("convnext_block_backward(Tensor grad, Tensor x, Tensor dw_weight, Tensor? dw_bias, Tensor ln_weight, "
        "Tensor? ln_bias, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, Tensor? gamma, "
        "float eps, bool[10] need, int chunk_elems) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor, Tensor)");
  m.def("convnext_mlp_backward(Tensor grad, Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, "
        "Tensor? fc2_bias, Tensor? gamma, bool[6] need, int chunk_elems) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor)");
  m.def("_gelu_fwd_bwd(Tensor u, Tensor? grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hires_lmm, CompositeExplicitAutograd, m) {
  m.impl("_gelu_fwd_bwd", &gelu_fwd_bwd);
  m.impl("dwconv_layernorm_backward", &dwconv_layernorm_backward);
  m.impl("convnext_block_backward", &convnext_block_backward);
  m.impl("convnext_mlp_backward", &convnext_mlp_backward);
}

TORCH_LIBRARY_IMPL(hires_lmm, AutogradCPU, m) {
  m.impl("dwconv_layernorm", &dwconv_layernorm_autograd_cpu);
  m.impl("convnext_block", &convnext_block_autograd_cpu);
  m.impl("convnext_mlp", &convnext_mlp_autograd_cpu);
}

}  // namespace hires::convnext
