// Binding of the DeepStack op family: schemas, argument checks, CPU and CUDA dispatch.
//   visual_index, deepstack_inject, deepstack_inject_rms_norm, deepstack_inject_layer_norm,
//   rms_norm, layer_norm
// One implementation function (inject_norm) serves all six; the kernel is
// kernels/deepstack/inject_norm.cuh and its CPU twin csrc/cpu/deepstack.cpp. On the CPU the
// five injection / norm ops also have their autograd here (AutogradCPU, end of file).
#include <torch/library.h>
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/ATen.h>

#include "csrc/common.h"
#include "csrc/cpu/deepstack.h"
#include "kernels/common/dtype.h"

#ifdef HIRES_LMM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "csrc/cuda/deepstack.h"
#endif

namespace hires::deepstack {
namespace {

constexpr int64_t kMaxDim = 16384;  // registers per row in the CUDA kernel (csrc/cuda/deepstack.cu)

// Checks that cost a device->host sync (see csrc/common.h): index range and strict order.
void check_index_values(const char* op, const at::Tensor& index, int64_t rows) {
  if (index.numel() == 0 || !value_checks_enabled() || cuda_stream_capturing(index)) return;
  at::Tensor stats = at::stack({index.min(), index.max(),
                                index.numel() > 1
                                    ? (index.slice(0, 1) <= index.slice(0, 0, -1)).sum()
                                    : at::zeros({}, index.options())})
                         .cpu();
  const int64_t* s = stats.data_ptr<int64_t>();
  HIRES_CHECK(s[0] >= 0 && s[1] < rows, op, "visual_index",
              "has values outside [0, ", rows, ") (the flattened rows of 'hidden'): min ", s[0],
              ", max ", s[1]);
  HIRES_CHECK(s[2] == 0, op, "visual_index",
              "must be strictly increasing (the row-major order of visual_pos_masks); ", s[2],
              " positions are not");
}

// hidden (..., D) -> (normed or undefined, injected or undefined)
std::tuple<at::Tensor, at::Tensor> inject_norm(const char* op, const at::Tensor& hidden,
                                                const c10::optional<at::Tensor>& embeds,
                                                const c10::optional<at::Tensor>& index,
                                                const c10::optional<at::Tensor>& weight,
                                                const c10::optional<at::Tensor>& bias, double eps,
                                                Norm norm, bool want_injected) {
  const char* hname = embeds ? "hidden" : "x";
  // devices first, before any data pointer is taken
  check_device_kind(hidden, op, hname);
  if (embeds) check_same_device(*embeds, hidden, op, "visual_embeds", hname);
  if (index) check_same_device(*index, hidden, op, "visual_index", hname);
  if (weight) check_same_device(*weight, hidden, op, "weight", hname);
  if (bias) check_same_device(*bias, hidden, op, "bias", hname);
  check_float(hidden, op, hname);
  HIRES_CHECK(hidden.dim() >= 1, op, hname, "must have a last (hidden) dimension, got a scalar");
  const int64_t D = hidden.size(-1);
  HIRES_CHECK(D > 0, op, hname, "must have a non-empty last dimension");
  HIRES_CHECK(D <= kMaxDim, op, hname, "has hidden size ", D, "; the kernel supports up to ", kMaxDim);

  InjectNormParams p;
  at::Tensor h2;  // (rows, D) with unit column stride: hidden itself when contiguous (no view to build)
  if (hidden.is_contiguous()) {
    p.rows = hidden.numel() / D;
    p.hidden = hidden.data_ptr();
    p.hidden_stride = D;
  } else {
    h2 = hidden.reshape({-1, D});  // a view when the leading dims collapse
    if (h2.stride(1) != 1) h2 = h2.contiguous();
    p.rows = h2.size(0);
    p.hidden = h2.data_ptr();
    p.hidden_stride = h2.stride(0);
  }
  p.dim = D;
  p.eps = static_cast<float>(eps);

  at::Tensor e2, idx;
  at::ScalarType etype = hidden.scalar_type();
  if (embeds) {
    check_float(*embeds, op, "visual_embeds");
    HIRES_CHECK(embeds->dim() == 2, op, "visual_embeds", "must be 2-D (num_visual, hidden_size), got shape ",
                embeds->sizes());
    HIRES_CHECK(embeds->size(1) == D, op, "visual_embeds", "has hidden size ", embeds->size(1),
                " but 'hidden' has ", D);
    HIRES_CHECK(index->scalar_type() == at::kLong, op, "visual_index", "must be int64, got ",
                index->scalar_type());
    HIRES_CHECK(index->dim() == 1, op, "visual_index", "must be 1-D, got shape ", index->sizes());
    HIRES_CHECK(embeds->size(0) == index->size(0), op, "visual_embeds", "has ", embeds->size(0),
                " rows but 'visual_index' has ", index->size(0),
                " entries (one row per visual token is required)");
    check_index_values(op, *index, p.rows);
    e2 = embeds->stride(1) == 1 ? *embeds : embeds->contiguous();
    idx = index->contiguous();
    etype = e2.scalar_type();
    p.embeds = e2.data_ptr();
    p.embeds_stride = e2.stride(0);
    p.index = idx.data_ptr<int64_t>();
    p.num_visual = idx.size(0);
  }
  at::Tensor w, b;
  if (norm != Norm::kNone) {
    HIRES_CHECK(weight->scalar_type() == hidden.scalar_type(), op, "weight", "must have the dtype of '",
                hname, "' (", hidden.scalar_type(), "), got ", weight->scalar_type());
    HIRES_CHECK(weight->dim() == 1 && weight->size(0) == D, op, "weight", "must have shape (", D,
                ",) (the last dim of '", hname, "'), got ", weight->sizes());
    w = weight->contiguous();
    p.weight = w.data_ptr();
    if (bias) {
      HIRES_CHECK(bias->scalar_type() == hidden.scalar_type(), op, "bias", "must have the dtype of '",
                  hname, "' (", hidden.scalar_type(), "), got ", bias->scalar_type());
      HIRES_CHECK(bias->dim() == 1 && bias->size(0) == D, op, "bias", "must have shape (", D,
                  ",) (the last dim of '", hname, "'), got ", bias->sizes());
      b = bias->contiguous();
      p.bias = b.data_ptr();
    }
    HIRES_CHECK(eps >= 0.0, op, "eps", "must be >= 0, got ", eps);
  }

  const auto opts = hidden.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor normed, injected;
  if (norm != Norm::kNone) {
    normed = at::empty(hidden.sizes(), opts);
    p.normed = normed.data_ptr();
  }
  if (want_injected) {
    injected = at::empty(hidden.sizes(), opts);
    p.injected = injected.data_ptr();
  }

  if (hidden.is_cpu()) {
    inject_norm_cpu(p, hidden.scalar_type(), etype, norm);
  } else {
#ifdef HIRES_LMM_WITH_CUDA
    const c10::cuda::CUDAGuard guard(hidden.device());
    const std::string err = launch_inject_norm(p, to_dtype(hidden.scalar_type()), to_dtype(etype),
                                               norm, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err.empty(), op, ": CUDA launch failed: ", err);
#else
    TORCH_CHECK(false, op, ": this build of hires_lmm has no CUDA kernels (built CPU-only)");
#endif
  }
  return {normed, injected};
}

at::Tensor visual_index(const at::Tensor& mask) {
  check_device_kind(mask, "visual_index", "visual_pos_masks");
  HIRES_CHECK(mask.scalar_type() == at::kBool, "visual_index", "visual_pos_masks",
              "must be a bool mask, got ", mask.scalar_type());
  HIRES_CHECK(mask.dim() >= 1, "visual_index", "visual_pos_masks", "must be (B, S), got a scalar");
  // nonzero syncs: this runs once per forward, outside the injection ops, which reuse the index.
  return at::nonzero(mask.reshape({-1})).view({-1});
}

at::Tensor deepstack_inject(const at::Tensor& hidden, const at::Tensor& embeds, const at::Tensor& index) {
  return std::get<1>(inject_norm("deepstack_inject", hidden, embeds, index, c10::nullopt, c10::nullopt,
                                 0.0, Norm::kNone, true));
}

std::tuple<at::Tensor, at::Tensor> deepstack_inject_rms_norm(const at::Tensor& hidden,
                                                             const at::Tensor& embeds,
                                                             const at::Tensor& index,
                                                             const at::Tensor& weight, double eps) {
  return inject_norm("deepstack_inject_rms_norm", hidden, embeds, index, weight, c10::nullopt, eps,
                     Norm::kRms, true);
}

std::tuple<at::Tensor, at::Tensor> deepstack_inject_layer_norm(
    const at::Tensor& hidden, const at::Tensor& embeds, const at::Tensor& index,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, double eps) {
  return inject_norm("deepstack_inject_layer_norm", hidden, embeds, index, weight, bias, eps,
                     Norm::kLayer, true);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return std::get<0>(inject_norm("rms_norm", x, c10::nullopt, c10::nullopt, weight, c10::nullopt,
                                 eps, Norm::kRms, false));
}

at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, double eps) {
  return std::get<0>(inject_norm("layer_norm", x, c10::nullopt, c10::nullopt, weight, bias, eps,
                                 Norm::kLayer, false));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hires_lmm, m) {
  m.def("visual_index(Tensor visual_pos_masks) -> Tensor");
  m.def("deepstack_inject(Tensor hidden, Tensor visual_embeds, Tensor visual_index) -> Tensor");
  m.def("deepstack_inject_rms_norm(Tensor hidden, Tensor visual_embeds, Tensor visual_index, "
        "Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("deepstack_inject_layer_norm(Tensor hidden, Tensor visual_embeds, Tensor visual_index, "
        "Tensor weight, Tensor? bias, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("layer_norm(Tensor x, Tensor weight, Tensor? bias, float eps) -> Tensor");
}

HIRES_BIND_CPU_CUDA(bind_deepstack) {
  b.impl("visual_index", &visual_index)
      .impl("deepstack_inject", &deepstack_inject)
      .impl("deepstack_inject_rms_norm", &deepstack_inject_rms_norm)
      .impl("deepstack_inject_layer_norm", &deepstack_inject_layer_norm)
      .impl("rms_norm", &rms_norm)
      .impl("layer_norm", &layer_norm);
}


// ---- autograd on the CPU key -----------------------------------------------------------------------
// The ops' autograd is registered from Python (python/hires_lmm/ops/deepstack.py,
// torch.library.register_autograd on the Autograd alias key): every call, gradients or not, then
// runs Python functions (several us on this CPU, more than a small norm costs). On AutogradCPU
// the same formulas are these C++ kernels: no gradient needed -> straight to the CPU kernel;
// otherwise a torch::autograd::Function saving what the Python one saves and calling
// hires_lmm::norm_backward as it does. CUDA keeps the Python registration.
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool needs_grad(std::initializer_list<const at::Tensor*> ts) {
  if (!c10::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : ts)
    if (t->defined() && t->requires_grad()) return true;
  return false;
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using NormBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                  const at::Tensor&, const c10::optional<at::Tensor>&,
                                                                  double, bool, bool);
using InjectSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&);
using InjectRmsSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        const at::Tensor&, double);
using InjectLnSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                       const at::Tensor&, const c10::optional<at::Tensor>&, double);
using RmsSig = at::Tensor(const at::Tensor&, const at::Tensor&, double);
using LnSig = at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, double);

// (dx, dweight, dbias) of the norm of x (python/hires_lmm/ops/deepstack.py _norm_grads): an
// undefined grad_out counts as zero; grad_res (the gradient of `injected`) may be undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_grads(AutogradContext* ctx, const at::Tensor& x,
                                                         const at::Tensor& weight, const at::Tensor& grad_out,
                                                         const at::Tensor& grad_res) {
  static const auto op = typed_op<NormBwdSig>("hires_lmm::norm_backward");
  const at::Tensor go = grad_out.defined() ? grad_out : at::zeros_like(x);
  const c10::optional<at::Tensor> gr = grad_res.defined() ? c10::optional<at::Tensor>(grad_res) : c10::nullopt;
  const bool has_bias = ctx->saved_data["has_bias"].toBool();
  auto [dx, dw, db] = op.call(go, x, weight, gr, ctx->saved_data["eps"].toDouble(),
                              ctx->saved_data["layer"].toBool(), has_bias);
  return {dx, dw, has_bias ? db : at::Tensor()};
}

// d(visual_embeds) = d(injected)[visual_index] in visual_embeds' dtype (HF's `out[mask] + e.to(dtype)`)
at::Tensor visual_grad(AutogradContext* ctx, const at::Tensor& d_injected, const at::Tensor& index) {
  if (!ctx->needs_input_grad(1) || !d_injected.defined()) return at::Tensor();
  const int64_t d = d_injected.size(-1);
  return d_injected.reshape({-1, d}).index_select(0, index).to(ctx->saved_data["embeds_dtype"].toScalarType());
}

struct NormFn : public torch::autograd::Function<NormFn> {
  // rms_norm (bias undefined, layer false) and layer_norm
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, double eps, bool layer) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor y;
    if (layer) {
      static const auto op = typed_op<LnSig>("hires_lmm::layer_norm");
      y = op.call(x, weight, bias, eps);
    } else {
      static const auto op = typed_op<RmsSig>("hires_lmm::rms_norm");
      y = op.call(x, weight, eps);
    }
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, weight});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["layer"] = layer;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return {y};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto [dx, dw, db] = norm_grads(ctx, s[0], s[1], grads[0], at::Tensor());
    return {dx, dw, db, at::Tensor(), at::Tensor()};
  }
};

struct InjectNormFn : public torch::autograd::Function<InjectNormFn> {
  // deepstack_inject_rms_norm (bias undefined, layer false) and deepstack_inject_layer_norm
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& embeds,
                               const at::Tensor& index, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, double eps, bool layer) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor normed, injected;
    if (layer) {
      static const auto op = typed_op<InjectLnSig>("hires_lmm::deepstack_inject_layer_norm");
      std::tie(normed, injected) = op.call(hidden, embeds, index, weight, bias, eps);
    } else {
      static const auto op = typed_op<InjectRmsSig>("hires_lmm::deepstack_inject_rms_norm");
      std::tie(normed, injected) = op.call(hidden, embeds, index, weight, eps);
    }
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({injected, weight, index});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["layer"] = layer;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["embeds_dtype"] = embeds.scalar_type();
    return {normed, injected};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto [dx, dw, db] = norm_grads(ctx, s[0], s[1], grads[0], grads[1]);
    return {dx, visual_grad(ctx, dx, s[2]), at::Tensor(), dw, db, at::Tensor(), at::Tensor()};
  }
};

struct InjectFn : public torch::autograd::Function<InjectFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& embeds,
                               const at::Tensor& index) {
    static const auto op = typed_op<InjectSig>("hires_lmm::deepstack_inject");
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = op.call(hidden, embeds, index);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({index});
    ctx->saved_data["embeds_dtype"] = embeds.scalar_type();
    return {out};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    return {grads[0], visual_grad(ctx, grads[0], s[0]), at::Tensor()};
  }
};

at::Tensor rms_norm_autograd_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (!needs_grad({&x, &weight})) {
    static const auto op = typed_op<RmsSig>("hires_lmm::rms_norm");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, weight, eps);
  }
  return NormFn::apply(x, weight, c10::optional<at::Tensor>(), eps, false)[0];
}

at::Tensor layer_norm_autograd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias, double eps) {
  const at::Tensor b = bias.value_or(at::Tensor());
  if (!needs_grad({&x, &weight, &b})) {
    static const auto op = typed_op<LnSig>("hires_lmm::layer_norm");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, weight, bias, eps);
  }
  return NormFn::apply(x, weight, bias, eps, true)[0];
}

at::Tensor deepstack_inject_autograd_cpu(const at::Tensor& hidden, const at::Tensor& embeds,
                                         const at::Tensor& index) {
  if (!needs_grad({&hidden, &embeds})) {
    static const auto op = typed_op<InjectSig>("hires_lmm::deepstack_inject");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(hidden, embeds, index);
  }
  return InjectFn::apply(hidden, embeds, index)[0];
}

std::tuple<at::Tensor, at::Tensor> deepstack_inject_rms_norm_autograd_cpu(const at::Tensor& hidden,
                                                                          const at::Tensor& embeds,
                                                                          const at::Tensor& index,
                                                                          const at::Tensor& weight, double eps) {
  if (!needs_grad({&hidden, &embeds, &weight})) {
    static const auto op = typed_op<InjectRmsSig>("hires_lmm::deepstack_inject_rms_norm");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(hidden, embeds, index, weight, eps);
  }
  const auto r = InjectNormFn::apply(hidden, embeds, index, weight, c10::optional<at::Tensor>(), eps, false);
  return {r[0], r[1]};
}

std::tuple<at::Tensor, at::Tensor> deepstack_inject_layer_norm_autograd_cpu(
    const at::Tensor& hidden, const at::Tensor& embeds, const at::Tensor& index, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, double eps) {
  const at::Tensor b = bias.value_or(at::Tensor());
  if (!needs_grad({&hidden, &embeds, &weight, &b})) {
    static const auto op = typed_op<InjectLnSig>("hires_lmm::deepstack_inject_layer_norm");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(hidden, embeds, index, weight, bias, eps);
  }
  const auto r = InjectNormFn::apply(hidden, embeds, index, weight, bias, eps, true);
  return {r[0], r[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(hires_lmm, AutogradCPU, m) {
  m.impl("deepstack_inject", &deepstack_inject_autograd_cpu);
  m.impl("deepstack_inject_rms_norm", &deepstack_inject_rms_norm_autograd_cpu);
  m.impl("deepstack_inject_layer_norm", &deepstack_inject_layer_norm_autograd_cpu);
  m.impl("rms_norm", &rms_norm_autograd_cpu);
  m.impl("layer_norm", &layer_norm_autograd_cpu);
}

}  // namespace hires::deepstack
