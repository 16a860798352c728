// Binding of the fused norm backward (the autograd of rms_norm, layer_norm and the
// deepstack_inject_*_norm ops; python/hires_lmm/ops/deepstack.py wires it):
//   norm_backward(grad_out, x, weight, grad_res?, eps, layer, has_bias) -> (dx, dweight, dbias)
// x is the norm's input (for the inject ops: their `injected` output); grad_res, if given, is
// added to dx (the gradient of `injected`). dbias is (dim,) when has_bias, else (0,).
// Kernel: kernels/deepstack/norm_bwd.cuh; CPU twin: csrc/cpu/norm_bwd.cpp.
#include <torch/library.h>
#include <ATen/ATen.h>

#include "csrc/common.h"
#include "csrc/cpu/dwconv_bwd.h"
#include "csrc/cpu/norm_bwd.h"
#include "kernels/common/dtype.h"

#ifdef HIRES_LMM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "csrc/cuda/dwconv_bwd.h"
#include "csrc/cuda/norm_bwd.h"
#endif

namespace hires::deepstack {
namespace {

constexpr const char* kOp = "norm_backward";

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& grad_res, double eps, bool layer, bool has_bias) {
  check_device_kind(x, kOp, "x");
  check_same_device(grad_out, x, kOp, "grad_out", "x");
  check_same_device(weight, x, kOp, "weight", "x");
  if (grad_res) check_same_device(*grad_res, x, kOp, "grad_res", "x");
  check_float(x, kOp, "x");
  HIRES_CHECK(x.dim() >= 1 && x.size(-1) > 0, kOp, "x", "must have a non-empty last dimension, got shape ",
              x.sizes());
  const int64_t D = x.size(-1);
  HIRES_CHECK(grad_out.sizes() == x.sizes(), kOp, "grad_out", "must have the shape of 'x' (", x.sizes(),
              "), got ", grad_out.sizes());
  HIRES_CHECK(grad_out.scalar_type() == x.scalar_type(), kOp, "grad_out", "must have the dtype of 'x' (",
              x.scalar_type(), "), got ", grad_out.scalar_type());
  HIRES_CHECK(weight.scalar_type() == x.scalar_type(), kOp, "weight", "must have the dtype of 'x' (",
              x.scalar_type(), "), got ", weight.scalar_type());
  HIRES_CHECK(weight.dim() == 1 && weight.size(0) == D, kOp, "weight", "must have shape (", D, ",), got ",
              weight.sizes());
  if (grad_res) {
    HIRES_CHECK(grad_res->sizes() == x.sizes(), kOp, "grad_res", "must have the shape of 'x' (", x.sizes(),
                "), got ", grad_res->sizes());
    HIRES_CHECK(grad_res->scalar_type() == x.scalar_type(), kOp, "grad_res", "must have the dtype of 'x' (",
                x.scalar_type(), "), got ", grad_res->scalar_type());
  }
  HIRES_CHECK(eps >= 0.0, kOp, "eps", "must be >= 0, got ", eps);

  const at::Tensor xc = x.contiguous(), gc = grad_out.contiguous(), wc = weight.contiguous();
  at::Tensor rc;
  if (grad_res) rc = grad_res->contiguous();
  const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dx = at::empty(x.sizes(), opts);
  at::Tensor dw = at::empty({D}, opts);
  at::Tensor db = at::empty({has_bias ? D : 0}, opts);

  NormBwdParams p;
  p.rows = x.numel() / D;
  p.dim = D;
  p.dy = gc.data_ptr();
  p.x = xc.data_ptr();
  p.dres = grad_res ? rc.data_ptr() : nullptr;
  p.weight = wc.data_ptr();
  p.dx = dx.data_ptr();
  p.dweight = dw.data_ptr();
  p.dbias = has_bias ? db.data_ptr() : nullptr;
  p.eps = static_cast<float>(eps);
  p.layer = layer;
  set_partition(p);
  at::Tensor ws = at::empty({std::max<int64_t>(p.chunks, 1), 2, D}, opts.dtype(at::kFloat));
  p.partial = ws.data_ptr<float>();

  if (x.is_cpu()) {
    norm_bwd_cpu(p, x.scalar_type());
  } else {
#ifdef HIRES_LMM_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    const std::string err = launch_norm_bwd(p, to_dtype(x.scalar_type()), c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err.empty(), kOp, ": CUDA launch failed: ", err);
#else
    TORCH_CHECK(false, kOp, ": this build of hires_lmm has no CUDA kernels (built CPU-only)");
#endif
  }
  return {dx, dw, db};
}

// dwconv_backward(grad_y fp32 (B,H,W,C), x (B,H,W,C), dw_weight (C,1,7,7), has_bias)
//   -> (dx, d dw_weight, d dw_bias or (0,)): the depthwise conv part of dwconv_layernorm's backward
//   (kernels/convnext/dwconv_bwd.cuh; CPU twin csrc/cpu/dwconv_bwd.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_backward(const at::Tensor& grad_y,
                                                               const at::Tensor& x,
                                                               const at::Tensor& dw_weight,
                                                               bool has_bias) {
  constexpr const char* op = "dwconv_backward";
  check_device_kind(x, op, "x");
  check_same_device(grad_y, x, op, "grad_y", "x");
  check_same_device(dw_weight, x, op, "dw_weight", "x");
  check_float(x, op, "x");
  HIRES_CHECK(x.dim() == 4, op, "x", "must be 4-D (B, H, W, C), got shape ", x.sizes());
  const int64_t C = x.size(3);
  HIRES_CHECK(grad_y.scalar_type() == at::kFloat, op, "grad_y", "must be float32, got ",
              grad_y.scalar_type());
  HIRES_CHECK(grad_y.sizes() == x.sizes(), op, "grad_y", "must have the shape of 'x' (", x.sizes(),
              "), got ", grad_y.sizes());
  HIRES_CHECK(dw_weight.scalar_type() == x.scalar_type(), op, "dw_weight", "must have the dtype of 'x' (",
              x.scalar_type(), "), got ", dw_weight.scalar_type());
  HIRES_CHECK(dw_weight.dim() == 4 && dw_weight.size(0) == C && dw_weight.size(1) == 1 &&
                  dw_weight.size(2) == convnext::kDwK && dw_weight.size(3) == convnext::kDwK,
              op, "dw_weight", "must have shape (", C, ", 1, 7, 7), got ", dw_weight.sizes());
  const at::Tensor gc = grad_y.contiguous(), xc = x.contiguous(), wc = dw_weight.contiguous();
  const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dx = at::empty(x.sizes(), opts);
  at::Tensor dw = at::empty(dw_weight.sizes(), opts);
  at::Tensor db = at::empty({has_bias ? C : 0}, opts);
  convnext::DwconvBwdParams p;
  p.B = x.size(0);
  p.H = x.size(1);
  p.W = x.size(2);
  p.C = C;
  p.dy = gc.data_ptr<float>();
  p.x = xc.data_ptr();
  p.weight = wc.data_ptr();
  p.dx = dx.data_ptr();
  p.dweight = dw.data_ptr();
  p.dbias = has_bias ? db.data_ptr() : nullptr;
  convnext::set_dw_partition(p);
  at::Tensor ws = at::empty({std::max<int64_t>(p.chunks, 1), convnext::kDwTaps + 1, C},
                            opts.dtype(at::kFloat));
  p.partial = ws.data_ptr<float>();
  if (x.is_cpu()) {
    convnext::dwconv_bwd_cpu(p, x.scalar_type());
  } else {
#ifdef HIRES_LMM_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    const std::string err = convnext::launch_dwconv_bwd(p, to_dtype(x.scalar_type()),
                                                        c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err.empty(), op, ": CUDA launch failed: ", err);
#else
    TORCH_CHECK(false, op, ": this build of hires_lmm has no CUDA kernels (built CPU-only)");
#endif
  }
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hires_lmm, m) {
  m.def("norm_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? grad_res, float eps, "
        "bool layer, bool has_bias) -> (Tensor, Tensor, Tensor)");
  m.def("dwconv_backward(Tensor grad_y, Tensor x, Tensor dw_weight, bool has_bias) "
        "-> (Tensor, Tensor, Tensor)");
}

HIRES_BIND_CPU_CUDA(bind_norm_bwd) {
  b.impl("norm_backward", &norm_backward).impl("dwconv_backward", &dwconv_backward);
}

}  // namespace hires::deepstack
