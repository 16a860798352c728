// Binding of the select family (SliME's text-guided token selection): schemas, argument checks,
// CPU and CUDA dispatch.
//   similarity_topk, similarity_topp: kernels/select/similarity_select.cuh (CUDA),
//     csrc/cpu/select.cpp (CPU twin); one implementation function (similarity_select) serves both.
//   gather_tokens: the kept sequence (padded indices -> zero rows).
#include <torch/library.h>
#include <ATen/ATen.h>

#include "csrc/common.h"
#include "csrc/cpu/select.h"
#include "kernels/common/dtype.h"

#ifdef HIRES_LMM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "csrc/cuda/similarity_select.h"
#endif

namespace hires::select {
namespace {

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> similarity_select(
    const char* op, const at::Tensor& local, const at::Tensor& text,
    const c10::optional<at::Tensor>& mask, SelectMode mode, int64_t k, double p, double temperature,
    c10::optional<double> presoftmax_temperature) {
  check_device_kind(local, op, "local_tokens");
  check_same_device(text, local, op, "text_embeds", "local_tokens");
  if (mask) check_same_device(*mask, local, op, "text_mask", "local_tokens");
  check_float(local, op, "local_tokens");
  check_float(text, op, "text_embeds");
  HIRES_CHECK(local.dim() == 3, op, "local_tokens", "must be 3-D (B, N, D), got shape ", local.sizes());
  HIRES_CHECK(text.dim() == 3, op, "text_embeds", "must be 3-D (B, T, D), got shape ", text.sizes());
  const int64_t B = local.size(0), N = local.size(1), D = local.size(2), T = text.size(1);
  HIRES_CHECK(N >= 1, op, "local_tokens", "must have at least one token (N >= 1), got shape ", local.sizes());
  HIRES_CHECK(D >= 1, op, "local_tokens", "must have a non-empty hidden dimension, got shape ", local.sizes());
  HIRES_CHECK(N <= 0x7fffffffLL, op, "local_tokens", "has ", N, " tokens; at most 2^31 - 1 are supported");
  HIRES_CHECK(text.size(0) == B, op, "text_embeds", "has batch size ", text.size(0),
              " but 'local_tokens' has ", B);
  HIRES_CHECK(text.size(2) == D, op, "text_embeds", "has hidden size ", text.size(2),
              " but 'local_tokens' has ", D, " (project both into the same space first)");
  HIRES_CHECK(T >= 1, op, "text_embeds", "must have at least one text token (T >= 1), got shape ", text.sizes());
  if (mask) {
    HIRES_CHECK(mask->scalar_type() == at::kBool, op, "text_mask", "must be bool, got ", mask->scalar_type());
    HIRES_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == T, op, "text_mask",
                "must have shape (B, T) = (", B, ", ", T, "), got ", mask->sizes());
  }
  if (mode == SelectMode::kTopK) {
    HIRES_CHECK(k >= 1 && k <= N, op, "k", "must be in [1, N] = [1, ", N, "], got ", k);
  } else {
    HIRES_CHECK(p > 0.0 && p <= 1.0, op, "p", "must be in (0, 1], got ", p);
    HIRES_CHECK(temperature > 0.0, op, "temperature", "must be > 0, got ", temperature);
    if (presoftmax_temperature) {
      HIRES_CHECK(*presoftmax_temperature > 0.0, op, "presoftmax_temperature",
                  "must be > 0 or None, got ", *presoftmax_temperature);
    }
  }

  const at::Tensor l = last_dim_contiguous(local), x = last_dim_contiguous(text);
  at::Tensor m;
  SimilaritySelectParams prm;
  prm.local = l.data_ptr();
  prm.local_stride_b = l.stride(0);
  prm.local_stride_n = l.stride(1);
  prm.text = x.data_ptr();
  prm.text_stride_b = x.stride(0);
  prm.text_stride_t = x.stride(1);
  if (mask) {
    m = mask->contiguous();
    prm.mask = m.data_ptr<bool>();
  }
  prm.batch = B;
  prm.n = N;
  prm.t = T;
  prm.dim = D;
  prm.mode = mode;
  prm.k = k;
  prm.p = p;
  prm.temperature = temperature;
  prm.presoftmax = presoftmax_temperature.has_value();
  prm.presoftmax_temperature = presoftmax_temperature ? *presoftmax_temperature : 1.0;

  const auto lopts = local.options().dtype(at::kLong);
  at::Tensor scores = at::empty({B, N}, local.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({B, mode == SelectMode::kTopK ? k : N}, lopts);
  at::Tensor lengths;
  prm.scores = scores.data_ptr<float>();
  prm.indices = indices.data_ptr<int64_t>();
  prm.out_cols = indices.size(1);
  if (mode == SelectMode::kTopP) {
    lengths = at::empty({B}, lopts);
    prm.lengths = lengths.data_ptr<int64_t>();
  }
  if (B == 0) return {indices, scores, lengths};

  if (local.is_cpu()) {
    similarity_select_cpu(prm, l.scalar_type(), x.scalar_type());
  } else {
#ifdef HIRES_LMM_WITH_CUDA
    HIRES_CHECK(N <= kMaxSelectTokens, op, "local_tokens", "has ", N, " tokens; the CUDA kernel sorts a row in shared "
                "memory and supports N <= ", kMaxSelectTokens, " (the CPU path has no limit)");
    HIRES_CHECK(D <= kMaxSelectDim, op, "local_tokens", "has hidden size ", D, "; the CUDA kernel supports up to ",
                kMaxSelectDim);
    HIRES_CHECK(B <= kMaxSelectBatch, op, "local_tokens", "has batch size ", B, "; the CUDA kernel supports up to ",
                kMaxSelectBatch);
    const c10::cuda::CUDAGuard guard(local.device());
    // workspace: text weights (B,T), text direction (B,D), one counter per row (as floats)
    at::Tensor ws = at::empty({B * T + B * D + B}, local.options().dtype(at::kFloat));
    prm.text_weight = ws.data_ptr<float>();
    prm.text_dir = prm.text_weight + B * T;
    prm.counters = reinterpret_cast<unsigned int*>(prm.text_dir + B * D);
    const std::string err = launch_similarity_select(prm, to_dtype(l.scalar_type()), to_dtype(x.scalar_type()),
                                                     c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err.empty(), op, ": CUDA launch failed: ", err);
#else
    TORCH_CHECK(false, op, ": this build of hires_lmm has no CUDA kernels (built CPU-only)");
#endif
  }
  return {indices, scores, lengths};
}

std::tuple<at::Tensor, at::Tensor> similarity_topk(const at::Tensor& local, const at::Tensor& text, int64_t k,
                                                   const c10::optional<at::Tensor>& mask) {
  auto r = similarity_select("similarity_topk", local, text, mask, SelectMode::kTopK, k, 1.0, 1.0, c10::nullopt);
  return {std::get<0>(r), std::get<1>(r)};
}

std::tuple<at::Tensor, at::Tensor> similarity_topp(const at::Tensor& local, const at::Tensor& text, double p,
                                                   const c10::optional<at::Tensor>& mask, double temperature,
                                                   c10::optional<double> presoftmax_temperature) {
  auto r = similarity_select("similarity_topp", local, text, mask, SelectMode::kTopP, 0, p, temperature,
                             presoftmax_temperature);
  return {std::get<0>(r), std::get<2>(r)};
}

// Checks that cost a device->host sync (see csrc/common.h): the index range.
void check_gather_values(const at::Tensor& indices, int64_t n) {
  if (indices.numel() == 0 || !value_checks_enabled() || cuda_stream_capturing(indices)) return;
  at::Tensor stats = at::stack({indices.min(), indices.max()}).cpu();
  const int64_t* s = stats.data_ptr<int64_t>();
  HIRES_CHECK(s[0] >= -1 && s[1] < n, "gather_tokens", "indices",
              "has values outside [-1, ", n, ") (-1 marks padding): min ", s[0], ", max ", s[1]);
}

at::Tensor gather_tokens(const at::Tensor& tokens, const at::Tensor& indices) {
  const char* op = "gather_tokens";
  check_device_kind(tokens, op, "tokens");
  check_float(tokens, op, "tokens");
  check_same_device(indices, tokens, op, "indices", "tokens");
  HIRES_CHECK(tokens.dim() == 3, op, "tokens", "must be 3-D (B, N, D), got shape ", tokens.sizes());
  HIRES_CHECK(indices.scalar_type() == at::kLong, op, "indices", "must be int64, got ", indices.scalar_type());
  HIRES_CHECK(indices.dim() == 2 && indices.size(0) == tokens.size(0), op, "indices",
              "must have shape (B, K) with B = ", tokens.size(0), ", got ", indices.sizes());
  check_gather_values(indices, tokens.size(1));
  const at::Tensor t = last_dim_contiguous(tokens), idx = indices.contiguous();
  at::Tensor out = at::empty({t.size(0), idx.size(1), t.size(2)}, tokens.options().memory_format(at::MemoryFormat::Contiguous));
  GatherParams prm;
  prm.tokens = t.data_ptr();
  prm.tokens_stride_b = t.stride(0);
  prm.tokens_stride_n = t.stride(1);
  prm.indices = idx.data_ptr<int64_t>();
  prm.out = out.data_ptr();
  prm.batch = t.size(0);
  prm.n = t.size(1);
  prm.k = idx.size(1);
  prm.dim = t.size(2);
  if (out.numel() == 0) return out;
  if (tokens.is_cpu()) {
    gather_tokens_cpu(prm, t.scalar_type());
  } else {
#ifdef HIRES_LMM_WITH_CUDA
    const c10::cuda::CUDAGuard guard(tokens.device());
    const std::string err = launch_gather_tokens(prm, to_dtype(t.scalar_type()), c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err.empty(), op, ": CUDA launch failed: ", err);
#else
    TORCH_CHECK(false, op, ": this build of hires_lmm has no CUDA kernels (built CPU-only)");
#endif
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hires_lmm, m) {
  m.def("similarity_topk(Tensor local_tokens, Tensor text_embeds, int k, Tensor? text_mask=None) "
        "-> (Tensor indices, Tensor scores)");
  m.def("similarity_topp(Tensor local_tokens, Tensor text_embeds, float p, Tensor? text_mask=None, "
        "float temperature=1.0, float? presoftmax_temperature=0.5) -> (Tensor indices, Tensor lengths)");
  m.def("gather_tokens(Tensor tokens, Tensor indices) -> Tensor");
}

HIRES_BIND_CPU_CUDA(bind_select) {
  b.impl("similarity_topk", &similarity_topk)
      .impl("similarity_topp", &similarity_topp)
      .impl("gather_tokens", &gather_tokens);
}

}  // namespace hires::select
