// Binding of the DeepStack op family: schemas, argument checks, CPU and CUDA dispatch.
//   visual_index, deepstack_inject, deepstack_inject_rms_norm, deepstack_inject_layer_norm,
//   rms_norm, layer_norm
// One implementation function (inject_norm) serves all six; the kernel is
// kernels/deepstack/inject_norm.cuh and its CPU twin csrc/cpu/deepstack.cpp.
#include <torch/library.h>
#include <ATen/ATen.h>

#include "csrc/common.h"
#include "csrc/cpu/cpu_path.h"
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
  at::Tensor h2 = hidden.reshape({-1, D});  // a view when the leading dims collapse
  if (h2.stride(1) != 1) h2 = h2.contiguous();
  p.rows = h2.size(0);
  p.dim = D;
  p.hidden = h2.data_ptr();
  p.hidden_stride = h2.stride(0);
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

  // fp32 LayerNorm without injection on the CPU: ATen's kernel measured faster than ours there
  // (README "CPU paths"); the same formula in fp32 (another summation order), and a row whose
  // rstd is not finite and positive (|x| > ~1.8e19, a NaN) is redone by ours below.
  if (hidden.is_cpu() && norm == Norm::kLayer && !embeds && !want_injected &&
      hidden.scalar_type() == at::kFloat && !cpu_twin_forced()) {
    auto [y, mean, rstd] = at::native_layer_norm(hidden, {D}, w, b, eps);
    if (rstd_ok(rstd)) return {y, at::Tensor()};
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

}  // namespace hires::deepstack
