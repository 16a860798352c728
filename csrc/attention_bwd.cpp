// Binding of the attention backward ops (internal: the autograd of flash_attn_func /
// flash_attn_varlen_func in python/hires_lmm/ops/attention.py calls them):
//   flash_attn_bwd(dout, q, k, v, out, softmax_lse, ...) -> (dq, dk, dv)
//   flash_attn_varlen_bwd(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, ...)
// FlashAttention-2's backward from the forward's saved q, k, v, out and softmax_lse (natural log,
// (B, Hq, Sq) dense / (Hq, total_q) varlen): O(S) extra memory (fp32 dQ accumulator and
// D = rowsum(dO * O)). CPU: by default ATen's CPU flash backward where the forward's ATen path
// applies (attention_cpu_fast_bwd, csrc/cpu/attention_fast.h; varlen per sequence), otherwise (and
// with HIRES_LMM_CPU_TWIN=1) the twin csrc/cpu/attention_bwd.cpp (every dtype, head_dim <= 512).
// CUDA: kernels/attention/flash_bwd.cuh for fp16/bf16 with head_dim 64 or 128; fp32 and other
// head dims run `attention_bwd_math` below (ATen ops, O(S^2) memory; HIRES_LMM_ATTN_MATH=1 forces
// it on any device so CPU tests cover it).
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>

#include "csrc/attention_params.h"
#include "csrc/common.h"
#include "csrc/cpu/attention_bwd.h"
#include "csrc/cpu/attention_fast.h"
#include "csrc/cpu/cpu_path.h"
#include "kernels/attention/flash_bwd_params.h"
#include "kernels/common/dtype.h"

#ifdef HIRES_LMM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "csrc/cuda/flash_attn_bwd.h"
#endif

namespace hires::attention {
namespace {

constexpr int64_t kMaxHeadDimCpuBwd = 512;

void check_like(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& ref, const char* ref_arg) {
  HIRES_CHECK(t.scalar_type() == ref.scalar_type(), op, arg, "must have the dtype of '", ref_arg, "' (",
              ref.scalar_type(), "), got ", t.scalar_type());
  check_same_device(t, ref, op, arg, ref_arg);
  HIRES_CHECK(t.sizes() == ref.sizes(), op, arg, "must have the shape of '", ref_arg, "' ", ref.sizes(),
              ", got ", t.sizes());
}

// q/k/v/out/dout/lse checks; rank 4 dense, 3 varlen.
void check_bwd_args(const char* op, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, int64_t rank) {
  check_float(q, op, "q");
  const char* shape = rank == 4 ? "(batch, seqlen, heads, head_dim)" : "(total_tokens, heads, head_dim)";
  HIRES_CHECK(q.dim() == rank, op, "q", "must be ", rank, "-D ", shape, ", got shape ", q.sizes());
  HIRES_CHECK(k.dim() == rank, op, "k", "must be ", rank, "-D ", shape, ", got shape ", k.sizes());
  HIRES_CHECK(k.scalar_type() == q.scalar_type(), op, "k", "must have the dtype of 'q' (", q.scalar_type(),
              "), got ", k.scalar_type());
  check_same_device(k, q, op, "k", "q");
  check_like(op, "v", v, k, "k");
  check_like(op, "out", out, q, "q");
  check_like(op, "dout", dout, q, "q");
  const int64_t D = q.size(-1);
  HIRES_CHECK(D > 0, op, "q", "must have head_dim > 0, got shape ", q.sizes());
  HIRES_CHECK(k.size(-1) == D, op, "k", "has head_dim ", k.size(-1), " but 'q' has head_dim ", D);
  HIRES_CHECK(k.size(-2) > 0 && q.size(-2) % k.size(-2) == 0, op, "k", "has ", k.size(-2),
              " heads, which must divide the ", q.size(-2), " heads of 'q'");
  if (rank == 4) {
    HIRES_CHECK(k.size(0) == q.size(0), op, "k", "has batch ", k.size(0), " but 'q' has batch ", q.size(0));
  }
  check_same_device(lse, q, op, "softmax_lse", "q");
  HIRES_CHECK(lse.scalar_type() == at::kFloat, op, "softmax_lse", "must be float32, got ", lse.scalar_type());
  const std::vector<int64_t> want = rank == 4 ? std::vector<int64_t>{q.size(0), q.size(2), q.size(1)}
                                              : std::vector<int64_t>{q.size(1), q.size(0)};
  HIRES_CHECK(lse.sizes() == at::IntArrayRef(want), op, "softmax_lse", "must have shape ", at::IntArrayRef(want),
              " (the forward's softmax_lse), got ", lse.sizes());
  if (q.is_cpu()) {
    HIRES_CHECK(D <= kMaxHeadDimCpuBwd, op, "q", "has head_dim ", D, "; the CPU kernel supports up to ",
                kMaxHeadDimCpuBwd);
  }
}

struct BwdOptions {
  double scale;
  bool causal;
  int64_t left, right;
  double softcap;
};

BwdOptions resolve(const char* op, const c10::optional<double>& scale, int64_t D, bool causal, int64_t left,
                   int64_t right, double softcap, int64_t max_q, int64_t max_k) {
  HIRES_CHECK(left >= -1, op, "window_size_left", "must be >= -1 (-1: unbounded), got ", left);
  HIRES_CHECK(right >= -1, op, "window_size_right", "must be >= -1 (-1: unbounded), got ", right);
  HIRES_CHECK(std::isfinite(softcap) && softcap >= 0.0, op, "softcap", "must be a finite value >= 0 (0: off), got ",
              softcap);
  BwdOptions o;
  o.scale = scale.has_value() ? *scale : 1.0 / std::sqrt(double(D));
  o.causal = causal;
  o.left = left >= max_k ? -1 : left;  // a bound that cannot bind (as the forward's binding)
  o.right = causal ? 0 : (right >= max_q ? -1 : right);
  o.softcap = softcap;
  return o;
}

// Contiguous and (CUDA: the kernel's 16-byte cp.async) 16-byte aligned; otherwise a copy.
at::Tensor ready(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (c.is_cuda() && reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

// ATen math (any device/dtype/head dim), O(S^2) memory: the same formulas as the kernel on the
// whole S x S matrix: P = exp(S - lse) on visible keys, dV = P^T dO, dP = dO V^T,
// dS = P (dP - D) (softcap: * (1 - tanh^2)), dQ = scale dS K, dK = scale dS^T Q; GQA sums dK/dV
// over the group. Varlen: a block-diagonal mask from cu_seqlens built on the device.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_math(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse_in, const at::Tensor& cu_q, const at::Tensor& cu_k, const BwdOptions& opt) {
  const bool varlen = cu_q.defined();
  if (varlen && cu_q.size(0) < 2) return {at::zeros_like(q), at::zeros_like(k), at::zeros_like(v)};
  auto bh = [&](const at::Tensor& t) {  // -> (B, H, S, D) fp32
    return (varlen ? t.unsqueeze(0) : t).transpose(1, 2).to(at::kFloat);
  };
  at::Tensor qh = bh(q), kh = bh(k), vh = bh(v), oh = bh(out), doh = bh(dout);
  at::Tensor lse = (varlen ? lse_in.unsqueeze(0) : lse_in).unsqueeze(-1);  // (B, H, Sq, 1)
  const int64_t Sq = qh.size(2), Sk = kh.size(2), Hq = qh.size(1), Hkv = kh.size(1), group = Hq / Hkv;
  if (group > 1) {
    kh = kh.repeat_interleave(group, 1);
    vh = vh.repeat_interleave(group, 1);
  }
  at::Tensor x = at::matmul(qh, kh.transpose(-1, -2)), s, c;
  if (opt.softcap != 0.0) {
    c = at::tanh(x * (opt.scale / opt.softcap));
    s = c * opt.softcap;
  } else {
    s = x * opt.scale;
  }
  const auto lopts = at::TensorOptions().dtype(at::kLong).device(q.device());
  at::Tensor iq = at::arange(Sq, lopts), jk = at::arange(Sk, lopts);
  at::Tensor pos_q = iq, pos_k = jk, diag, allowed;
  if (varlen) {
    at::Tensor cq = cu_q.to(at::kLong), ck = cu_k.to(at::kLong);
    const int64_t nb = cq.size(0) - 1;
    at::Tensor seg_q = at::searchsorted(cq.slice(0, 1), iq, false, true);
    at::Tensor seg_k = at::searchsorted(ck.slice(0, 1), jk, false, true);
    at::Tensor sq = seg_q.clamp_max(std::max<int64_t>(nb - 1, 0)), sk = seg_k.clamp_max(std::max<int64_t>(nb - 1, 0));
    pos_q = iq - cq.index_select(0, sq);
    pos_k = jk - ck.index_select(0, sk);
    allowed = (seg_q.unsqueeze(1) == seg_k.unsqueeze(0)) & (seg_q < nb).unsqueeze(1);
    diag = (ck.index_select(0, sq + 1) - ck.index_select(0, sq)) - (cq.index_select(0, sq + 1) - cq.index_select(0, sq));
  } else {
    diag = at::full({Sq}, Sk - Sq, lopts);
  }
  at::Tensor center = (pos_q + diag).unsqueeze(1);
  if (opt.right >= 0) {
    at::Tensor m = pos_k.unsqueeze(0) <= center + opt.right;
    allowed = allowed.defined() ? allowed & m : m;
  }
  if (opt.left >= 0) {
    at::Tensor m = pos_k.unsqueeze(0) >= center - opt.left;
    allowed = allowed.defined() ? allowed & m : m;
  }
  at::Tensor p = at::exp(s - lse);
  at::Tensor keep = at::isfinite(lse).expand_as(p);  // rows that see no key contribute nothing
  if (allowed.defined()) keep = keep & allowed;
  p = at::where(keep, p, at::zeros_like(p));
  at::Tensor dv = at::matmul(p.transpose(-1, -2), doh);
  at::Tensor dp = at::matmul(doh, vh.transpose(-1, -2));
  at::Tensor dsum = (doh * oh).sum(-1, /*keepdim=*/true);
  at::Tensor ds = p * (dp - dsum);
  if (opt.softcap != 0.0) ds = ds * (1 - c * c);
  ds = ds * opt.scale;
  at::Tensor dq = at::matmul(ds, kh);
  at::Tensor dk = at::matmul(ds.transpose(-1, -2), qh);
  if (group > 1) {
    const int64_t B = dk.size(0);
    dk = dk.view({B, Hkv, group, Sk, dk.size(-1)}).sum(2);
    dv = dv.view({B, Hkv, group, Sk, dv.size(-1)}).sum(2);
  }
  auto back = [&](at::Tensor t, const at::Tensor& like) {
    t = t.transpose(1, 2).to(like.scalar_type());
    return (varlen ? t.squeeze(0) : t).contiguous();
  };
  return {back(dq, q), back(dk, k), back(dv, v)};
}

void fill_bwd(FlashBwdParams& prm, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& out, const at::Tensor& dq, const at::Tensor& dk,
              const at::Tensor& dv, const BwdOptions& opt) {
  fill_strides(prm, q, k, v, out);  // dq/dk/dv/dout: contiguous, the strides of q/k/v/out
  prm.dout = dout.data_ptr(); prm.dq = dq.data_ptr(); prm.dk = dk.data_ptr(); prm.dv = dv.data_ptr();
  prm.scale = static_cast<float>(opt.scale);
  prm.causal = opt.causal;
  prm.window_left = opt.left;
  prm.window_right = opt.right;
  prm.softcap = static_cast<float>(opt.softcap);
}

void run_bwd(const char* op, FlashBwdParams& prm, const at::Tensor& q) {
  if (q.is_cpu()) {
    flash_bwd_cpu(prm, q.scalar_type());
    return;
  }
#ifdef HIRES_LMM_WITH_CUDA
  const c10::cuda::CUDAGuard guard(q.device());
  const std::string err = launch_flash_bwd(prm, to_dtype(q.scalar_type()), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err.empty(), op, ": CUDA launch failed: ", err);
#else
  TORCH_CHECK(false, op, ": this build of hires_lmm has no CUDA kernels (built CPU-only)");
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, c10::optional<double> softmax_scale, bool causal,
    int64_t window_size_left, int64_t window_size_right, double softcap) {
  const char* op = "flash_attn_bwd";
  check_bwd_args(op, dout_in, q_in, k_in, v_in, out_in, lse_in, 4);
  const BwdOptions opt = resolve(op, softmax_scale, q_in.size(-1), causal, window_size_left, window_size_right,
                                 softcap, q_in.size(1), k_in.size(1));
  if (!use_kernel(q_in, AttnPass::kBackward))
    return attention_bwd_math(dout_in, q_in, k_in, v_in, out_in, lse_in, at::Tensor(), at::Tensor(), opt);
  if (q_in.is_cpu() && !cpu_twin_forced()) {  // default CPU path: ATen's flash backward
    auto fast = attention_cpu_fast_bwd(dout_in, q_in, k_in, v_in, out_in, lse_in, opt.scale, opt.left, opt.right,
                                       opt.softcap);
    if (fast.has_value()) return *fast;
  }
  const at::Tensor q = ready(q_in), k = ready(k_in), v = ready(v_in), out = ready(out_in),
                   dout = ready(dout_in), lse = lse_in.contiguous();
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_(); dk.zero_(); dv.zero_();
    return {dq, dk, dv};
  }
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3);
  const auto fopts = q.options().dtype(at::kFloat);
  at::Tensor dq_accum = at::zeros({B * Sq, Hq, D}, fopts), dsum = at::zeros({Hq, B * Sq}, fopts);
  FlashBwdParams prm;
  fill_bwd(prm, dout, q, k, v, out, dq, dk, dv, opt);
  prm.batch = B;
  prm.seqlen_q = Sq;
  prm.seqlen_k = k.size(1);
  prm.lse = const_cast<float*>(lse.data_ptr<float>());
  prm.lse_batch_stride = lse.stride(0);
  prm.lse_head_stride = lse.stride(1);
  prm.lse_row_stride = lse.stride(2);
  prm.dq_accum = dq_accum.data_ptr<float>();
  prm.dsum = dsum.data_ptr<float>();
  prm.rows = B * Sq;
  run_bwd(op, prm, q);
  return {dq, dk, dv};
}

void check_cu(const char* op, const char* arg, const at::Tensor& cu, const at::Tensor& q, int64_t n) {
  check_same_device(cu, q, op, arg, "q");
  HIRES_CHECK(cu.scalar_type() == at::kInt, op, arg, "must be int32, got ", cu.scalar_type());
  HIRES_CHECK(cu.dim() == 1 && cu.size(0) >= 1 && (n < 0 || cu.size(0) == n), op, arg,
              "must be 1-D (batch + 1,) like 'cu_seqlens_q', got shape ", cu.sizes());
}

// Default CPU varlen backward: ATen's CPU flash backward per sequence (as the forward's
// varlen_cpu_fast), when every sequence with queries qualifies; nullopt: the twin runs the call.
c10::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> varlen_cpu_fast_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cq, const at::Tensor& ck, const BwdOptions& opt) {
  const int* pq = cq.data_ptr<int>();
  const int* pk = ck.data_ptr<int>();
  const int64_t batch = cq.size(0) - 1;
  if (q.numel() == 0 || k.numel() == 0 || batch <= 0) return c10::nullopt;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t sq = pq[b + 1] - pq[b], sk = pk[b + 1] - pk[b];
    if (sq > 0 && !attention_cpu_fast_shape_ok(sq, sk, opt.left, opt.right, opt.softcap)) return c10::nullopt;
  }
  // zeros: tokens outside every sequence (and keys no query sees) get no gradient
  at::Tensor dq = at::zeros(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dk = at::zeros(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dv = at::zeros(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t q0 = pq[b], sq = pq[b + 1] - q0, k0 = pk[b], sk = pk[b + 1] - k0;
    if (sq == 0) continue;
    auto seq = [](const at::Tensor& t, int64_t t0, int64_t n) { return t.narrow(0, t0, n).unsqueeze(0); };
    auto r = attention_cpu_fast_bwd(seq(dout, q0, sq), seq(q, q0, sq), seq(k, k0, sk), seq(v, k0, sk),
                                     seq(out, q0, sq), lse.narrow(1, q0, sq).unsqueeze(0), opt.scale, opt.left,
                                     opt.right, opt.softcap);
    if (!r.has_value()) return c10::nullopt;
    dq.narrow(0, q0, sq).copy_(std::get<0>(*r).squeeze(0));
    dk.narrow(0, k0, sk).copy_(std::get<1>(*r).squeeze(0));  // key ranges are disjoint (nondecreasing cu)
    dv.narrow(0, k0, sk).copy_(std::get<2>(*r).squeeze(0));
  }
  return std::make_tuple(dq, dk, dv);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_varlen_bwd(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    c10::optional<double> softmax_scale, bool causal, int64_t window_size_left, int64_t window_size_right,
    double softcap) {
  const char* op = "flash_attn_varlen_bwd";
  check_bwd_args(op, dout_in, q_in, k_in, v_in, out_in, lse_in, 3);
  check_cu(op, "cu_seqlens_q", cu_seqlens_q, q_in, -1);
  check_cu(op, "cu_seqlens_k", cu_seqlens_k, q_in, cu_seqlens_q.size(0));
  HIRES_CHECK(max_seqlen_q >= 0, op, "max_seqlen_q", "must be >= 0, got ", max_seqlen_q);
  HIRES_CHECK(max_seqlen_k >= 0, op, "max_seqlen_k", "must be >= 0, got ", max_seqlen_k);
  // (the forward checked the cu_seqlens values against the same tensors)
  const int64_t total_q = q_in.size(0), total_k = k_in.size(0);
  const BwdOptions opt = resolve(op, softmax_scale, q_in.size(-1), causal, window_size_left, window_size_right,
                                 softcap, total_q, total_k);
  const at::Tensor cq = cu_seqlens_q.contiguous(), ck = cu_seqlens_k.contiguous();
  if (!use_kernel(q_in, AttnPass::kBackward)) return attention_bwd_math(dout_in, q_in, k_in, v_in, out_in, lse_in, cq, ck, opt);
  if (q_in.is_cpu() && !cpu_twin_forced()) {
    auto fast = varlen_cpu_fast_bwd(dout_in, q_in, k_in, v_in, out_in, lse_in, cq, ck, opt);
    if (fast.has_value()) return *fast;
  }
  const at::Tensor q = ready(q_in), k = ready(k_in), v = ready(v_in), out = ready(out_in),
                   dout = ready(dout_in), lse = lse_in.contiguous();
  // zeros: tokens outside every sequence get no gradient (and the kernel never writes them)
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  const int64_t batch = cq.size(0) - 1;
  if (q.numel() == 0 || k.numel() == 0 || batch == 0) return {dq, dk, dv};
  const int64_t Hq = q.size(1), D = q.size(2);
  const auto fopts = q.options().dtype(at::kFloat);
  at::Tensor dq_accum = at::zeros({total_q, Hq, D}, fopts), dsum = at::zeros({Hq, total_q}, fopts);
  FlashBwdParams prm;
  fill_bwd(prm, dout, q, k, v, out, dq, dk, dv, opt);
  prm.cu_seqlens_q = cq.data_ptr<int>();
  prm.cu_seqlens_k = ck.data_ptr<int>();
  prm.batch = batch;
  prm.seqlen_q = std::min(max_seqlen_q, total_q);
  prm.seqlen_k = std::min(max_seqlen_k, total_k);
  prm.lse = const_cast<float*>(lse.data_ptr<float>());
  prm.lse_batch_stride = 0;
  prm.lse_head_stride = lse.stride(0);
  prm.lse_row_stride = lse.stride(1);
  prm.dq_accum = dq_accum.data_ptr<float>();
  prm.dsum = dsum.data_ptr<float>();
  prm.rows = total_q;
  run_bwd(op, prm, q);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hires_lmm, m) {
  m.def("flash_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, "
        "float? softmax_scale=None, bool causal=False, int window_size_left=-1, int window_size_right=-1, "
        "float softcap=0.0) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def("flash_attn_varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, "
        "Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, "
        "float? softmax_scale=None, bool causal=False, int window_size_left=-1, int window_size_right=-1, "
        "float softcap=0.0) -> (Tensor dq, Tensor dk, Tensor dv)");
}

HIRES_BIND_CPU_CUDA(bind_attention_bwd) {
  b.impl("flash_attn_bwd", &flash_attn_bwd).impl("flash_attn_varlen_bwd", &flash_attn_varlen_bwd);
}

}  // namespace hires::attention
