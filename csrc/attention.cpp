// Binding of the attention family: schemas, argument checks, CPU and CUDA dispatch.
//   flash_attn_func, flash_attn_varlen_func: return (out, softmax_lse); the Python wrappers
//   (flash-attn 2 signatures) drop the lse unless return_attn_probs=True. Sliding window and
//   softcap follow flash-attn (see kernels/attention/flash_params.h).
// Kernel: kernels/attention/flash_fwd.cuh (launcher csrc/cuda/flash_attn.cu); CPU twin:
// csrc/cpu/attention.cpp. On CUDA the tensor-core kernel covers fp16/bf16 with head_dim 64 or
// 128; other CUDA cases (fp32, other head dims) run `attention_math` below: ATen ops, the same
// semantics, O(S^2) memory (a correctness fallback, not a fast path). With HIRES_LMM_ATTN_SM90=1
// on an sm_90 device, dense unsplit fp16/bf16 calls run the sm_90a kernel (flash_fwd_sm90.cuh).
#include <torch/library.h>
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/ATen.h>

#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "csrc/attention_params.h"
#include "csrc/common.h"
#include "csrc/cpu/attention.h"
#include "csrc/cpu/attention_fast.h"
#include "csrc/cpu/attention_prefill.h"
#include "kernels/attention/flash_params.h"
#include "kernels/common/dtype.h"

#ifdef HIRES_LMM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "csrc/cuda/flash_attn.h"
#endif

namespace hires::attention {
namespace {

constexpr int64_t kMaxHeadDimCpu = 512;  // CPU twin: per-thread tiles of kBlockM x D floats

// Checks shared by both ops. `tok` is the token dimension (1 dense, 0 varlen); the last three
// dims are (tokens, heads, head_dim).
void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               int64_t rank) {
  check_float(q, op, "q");
  HIRES_CHECK(k.scalar_type() == q.scalar_type(), op, "k", "must have the dtype of 'q' (",
              q.scalar_type(), "), got ", k.scalar_type());
  HIRES_CHECK(v.scalar_type() == q.scalar_type(), op, "v", "must have the dtype of 'q' (",
              q.scalar_type(), "), got ", v.scalar_type());
  check_same_device(k, q, op, "k", "q");
  check_same_device(v, q, op, "v", "q");
  const char* shape = rank == 4 ? "(batch, seqlen, heads, head_dim)" : "(total_tokens, heads, head_dim)";
  HIRES_CHECK(q.dim() == rank, op, "q", "must be ", rank, "-D ", shape, ", got shape ", q.sizes());
  HIRES_CHECK(k.dim() == rank, op, "k", "must be ", rank, "-D ", shape, ", got shape ", k.sizes());
  HIRES_CHECK(v.dim() == rank, op, "v", "must be ", rank, "-D ", shape, ", got shape ", v.sizes());
  const int64_t D = q.size(-1);
  HIRES_CHECK(D > 0, op, "q", "must have head_dim > 0, got shape ", q.sizes());
  HIRES_CHECK(k.size(-1) == D, op, "k", "has head_dim ", k.size(-1), " but 'q' has head_dim ", D);
  HIRES_CHECK(v.size(-1) == D, op, "v", "has head_dim ", v.size(-1), " but 'q' has head_dim ", D,
              " (this op needs equal q/k/v head dims)");
  HIRES_CHECK(v.size(-2) == k.size(-2), op, "v", "has ", v.size(-2), " heads but 'k' has ", k.size(-2));
  HIRES_CHECK(v.size(-3) == k.size(-3), op, "v", "has ", v.size(-3), " tokens but 'k' has ", k.size(-3));
  HIRES_CHECK(k.size(-2) > 0 && q.size(-2) % k.size(-2) == 0, op, "k",
              "has ", k.size(-2), " heads, which must divide the ", q.size(-2),
              " heads of 'q' (GQA/MQA need heads_q % heads_kv == 0)");
  if (rank == 4) {
    HIRES_CHECK(k.size(0) == q.size(0), op, "k", "has batch ", k.size(0), " but 'q' has batch ", q.size(0));
    HIRES_CHECK(v.size(0) == q.size(0), op, "v", "has batch ", v.size(0), " but 'q' has batch ", q.size(0));
  }
  if (q.is_cpu()) {
    HIRES_CHECK(D <= kMaxHeadDimCpu, op, "q", "has head_dim ", D, "; the CPU kernel supports up to ",
                kMaxHeadDimCpu);
  }
}

// Last dim contiguous (and, for the CUDA kernel's 16-byte copies, every other stride a multiple
// of 8 elements and the pointer 16-byte aligned); otherwise a contiguous copy.
at::Tensor prepare(const at::Tensor& t) {
  bool ok = t.stride(-1) == 1;
  if (ok && t.is_cuda()) {
    for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && (t.stride(d) % 8 == 0);
    ok = ok && (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0);
  }
  // clone, not contiguous(): a tensor that is already contiguous (a misaligned storage offset, or
  // an odd stride on a size-1 dim) would come back unchanged and still fail the kernel's needs.
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Default CPU path for decode-shaped calls (csrc/cpu/attention_fast.h): q (B,Sq,Hq,D), k/v
// (B,Sk,Hkv,D) with unit last stride; lens: per-batch key counts or null. Returns (o, lse) or
// nothing when the twin must decide (non-finite values, no AVX2).
c10::optional<std::tuple<at::Tensor, at::Tensor>> small_q_cpu(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const int64_t* lens,
                                                              double scale, int64_t left, int64_t right,
                                                              bool want_lse) {
  if (q.stride(3) != 1 || k.stride(3) != 1 || v.stride(3) != 1) return c10::nullopt;
  at::Tensor o = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = want_lse ? at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat))
                            : at::Tensor();
  SmallQArgs a;
  a.q = q.const_data_ptr(); a.k = k.const_data_ptr(); a.v = v.const_data_ptr(); a.o = o.data_ptr();
  for (int d = 0; d < 3; ++d) {
    a.q_s[d] = q.stride(d); a.k_s[d] = k.stride(d); a.v_s[d] = v.stride(d); a.o_s[d] = o.stride(d);
  }
  if (want_lse) {
    a.lse = lse.data_ptr<float>();
    for (int d = 0; d < 3; ++d) a.lse_s[d] = lse.stride(d);
  }
  a.lens = lens;
  a.B = q.size(0); a.Sq = q.size(1); a.Sk = k.size(1); a.Hq = q.size(2); a.Hkv = k.size(2); a.D = q.size(3);
  a.scale = scale;
  a.window_left = left;
  a.window_right = right;
  if (!attention_cpu_small_q(a, q.scalar_type())) return c10::nullopt;
  return std::make_tuple(o, lse);
}

double resolve_scale(const c10::optional<double>& softmax_scale, int64_t D) {
  return softmax_scale.has_value() ? *softmax_scale : 1.0 / std::sqrt(double(D));
}

// Masking and score options of one call (flash-attn's window_size and softcap; windows already
// clamped by `resolve_window`, causal folded in as right = 0 by the kernels and here alike).
struct AttnOptions {
  double scale = 1.0;
  bool causal = false;
  int64_t window_left = -1, window_right = -1;
  double softcap = 0.0;
};

// Same semantics with ATen ops (any device, any dtype, any head dim), O(S^2) memory: the CUDA
// fallback for fp32 and head dims without a kernel. Varlen builds a block-diagonal mask on the
// device from cu_seqlens (no host sync). Returns (o, lse): lse (B, Hq, Sq) fp32 natural log
// (varlen (Hq, total_q)) with the kernels' non-finite rule: rows that see no key get o = 0 and
// lse = -inf; rows whose visible scores are all -inf get o = NaN; NaN scores give NaN.
std::tuple<at::Tensor, at::Tensor> attention_math_lse(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v, const at::Tensor& cu_q,
                                                      const at::Tensor& cu_k, const AttnOptions& opt) {
  const bool varlen = cu_q.defined();
  const float kNegInf = -std::numeric_limits<float>::infinity();
  // -> (B, H, S, D) fp32
  at::Tensor qh = varlen ? q.unsqueeze(0) : q, kh = varlen ? k.unsqueeze(0) : k,
             vh = varlen ? v.unsqueeze(0) : v;
  qh = qh.transpose(1, 2).to(at::kFloat);
  kh = kh.transpose(1, 2).to(at::kFloat);
  vh = vh.transpose(1, 2).to(at::kFloat);
  const int64_t Sq = qh.size(2), Sk = kh.size(2);
  const auto fopts = q.options().dtype(at::kFloat);
  if (Sk == 0) {  // no key at all: every row sees nothing
    at::Tensor o = at::zeros(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
    at::Tensor lse = at::full({qh.size(0), qh.size(1), Sq}, kNegInf, fopts);
    return {o, varlen ? lse.squeeze(0) : lse};
  }
  const int64_t group = qh.size(1) / kh.size(1);
  if (group > 1) {
    kh = kh.repeat_interleave(group, 1);
    vh = vh.repeat_interleave(group, 1);
  }
  at::Tensor s = at::matmul(qh, kh.transpose(-1, -2));
  if (opt.softcap != 0.0) {
    s = at::tanh(s * (opt.scale / opt.softcap)) * opt.softcap;
  } else {
    s = s * opt.scale;
  }
  const auto lopts = at::TensorOptions().dtype(at::kLong).device(q.device());
  at::Tensor iq = at::arange(Sq, lopts), jk = at::arange(Sk, lopts);
  // positions inside the sequence and the bottom-right offset diag = Sk - Sq of each query
  at::Tensor pos_q = iq, pos_k = jk, diag, allowed;
  if (varlen) {
    at::Tensor cq = cu_q.to(at::kLong), ck = cu_k.to(at::kLong);
    const int64_t nb = cq.size(0) - 1;
    // segment of each token (nb for tokens past the last sequence: they see nothing)
    at::Tensor seg_q = at::searchsorted(cq.slice(0, 1), iq, /*out_int32=*/false, /*right=*/true);
    at::Tensor seg_k = at::searchsorted(ck.slice(0, 1), jk, false, true);
    at::Tensor sq = seg_q.clamp_max(nb - 1), sk = seg_k.clamp_max(nb - 1);
    pos_q = iq - cq.index_select(0, sq);
    pos_k = jk - ck.index_select(0, sk);
    allowed = seg_q.unsqueeze(1) == seg_k.unsqueeze(0);
    allowed = allowed & (seg_q < nb).unsqueeze(1);
    diag = (ck.index_select(0, sq + 1) - ck.index_select(0, sq)) -
           (cq.index_select(0, sq + 1) - cq.index_select(0, sq));
  } else {
    diag = at::full({Sq}, Sk - Sq, lopts);
  }
  const int64_t right = opt.causal ? 0 : opt.window_right;
  at::Tensor center = (pos_q + diag).unsqueeze(1);  // key aligned with each query
  if (right >= 0) {
    at::Tensor m = pos_k.unsqueeze(0) <= center + right;
    allowed = allowed.defined() ? allowed & m : m;
  }
  if (opt.window_left >= 0) {
    at::Tensor m = pos_k.unsqueeze(0) >= center - opt.window_left;
    allowed = allowed.defined() ? allowed & m : m;
  }
  at::Tensor has_keys;  // (Sq, 1)
  if (allowed.defined()) {
    s = s.masked_fill(allowed.logical_not(), kNegInf);
    has_keys = allowed.any(-1, /*keepdim=*/true);
  }
  // lse = m + log(sum exp(s - m)) with m -> 0 where m == -inf (as the kernels)
  at::Tensor mx = std::get<0>(s.max(-1, /*keepdim=*/true));
  at::Tensor m_use = at::where(mx == kNegInf, at::zeros_like(mx), mx);
  at::Tensor e = at::exp(s - m_use);
  at::Tensor l = e.sum(-1, /*keepdim=*/true);
  at::Tensor lse = (m_use + at::log(l)).squeeze(-1);
  at::Tensor p = e / l;  // l == 0: 0/0 = NaN (a row whose visible scores are all -inf)
  if (has_keys.defined()) p = at::where(has_keys, p, at::zeros_like(p));  // rows that see no key -> 0
  at::Tensor o = at::matmul(p, vh);
  // A NaN/inf in a V row must reach only the rows that see that key; p @ v multiplies masked keys'
  // rows by 0 (0 * inf = NaN, across sequences in varlen). On the CPU (where the check is a free
  // host read) such V rows are zeroed and their exact contribution is added through indicator
  // products; on CUDA that would cost a host sync per call, so the documented exception stays.
  if (q.is_cpu() && !at::isfinite(vh).all().item<bool>()) {
    const at::Tensor vis = allowed.defined() ? allowed.to(at::kFloat) : at::ones({Sq, Sk}, fopts);
    const at::Tensor pos = (p > 0).to(at::kFloat);  // visible keys with a nonzero weight
    const float kInf = std::numeric_limits<float>::infinity();
    const at::Tensor n_nan = at::matmul(vis, at::isnan(vh).to(at::kFloat));
    const at::Tensor n_inf = at::matmul(vis, at::isinf(vh).to(at::kFloat));
    const at::Tensor n_pos = at::matmul(pos, (vh == kInf).to(at::kFloat));
    const at::Tensor n_neg = at::matmul(pos, (vh == -kInf).to(at::kFloat));
    o = at::matmul(p, at::where(at::isfinite(vh), vh, at::zeros_like(vh)));
    // NaN: a visible NaN, a visible inf times a zero (or NaN) weight, or +inf and -inf together
    const at::Tensor nan = (n_nan > 0.5) | (n_inf - n_pos - n_neg > 0.5) | ((n_pos > 0.5) & (n_neg > 0.5));
    o = at::where(n_pos > 0.5, at::full({}, kInf, fopts), o);
    o = at::where(n_neg > 0.5, at::full({}, -kInf, fopts), o);
    o = at::where(nan, at::full({}, std::numeric_limits<float>::quiet_NaN(), fopts), o);
  }
  o = o.transpose(1, 2).to(q.scalar_type());
  o = (varlen ? o.squeeze(0) : o).contiguous();
  return {o, varlen ? lse.squeeze(0).contiguous() : lse.contiguous()};
}

// The pre-window entry point (out only), kept for callers inside this file.
[[maybe_unused]] at::Tensor attention_math(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& cu_q, const at::Tensor& cu_k, double scale, bool causal) {
  AttnOptions opt;
  opt.scale = scale;
  opt.causal = causal;
  return std::get<0>(attention_math_lse(q, k, v, cu_q, cu_k, opt));
}

// Checks window_size and softcap and clamps a window bound that cannot bind to -1: left >= the
// longest key sequence (max_k) or right >= the longest query sequence (max_q) constrains nothing,
// and the kernels' index arithmetic then stays within the tensor sizes.
AttnOptions resolve_options(const char* op, double scale, bool causal, int64_t window_left,
                            int64_t window_right, double softcap, int64_t max_q, int64_t max_k) {
  HIRES_CHECK(window_left >= -1, op, "window_size", "must be (left, right) with each >= -1 (-1: unbounded), got left ",
              window_left);
  HIRES_CHECK(window_right >= -1, op, "window_size", "must be (left, right) with each >= -1 (-1: unbounded), got right ",
              window_right);
  HIRES_CHECK(std::isfinite(softcap) && softcap >= 0.0, op, "softcap",
              "must be a finite value >= 0 (0: off), got ", softcap);
  AttnOptions opt;
  opt.scale = scale;
  opt.causal = causal;
  opt.window_left = window_left >= max_k ? -1 : window_left;
  opt.window_right = causal ? 0 : (window_right >= max_q ? -1 : window_right);
  opt.softcap = softcap;
  return opt;
}

void fill_options(FlashParams& prm, const AttnOptions& opt) {
  prm.scale = static_cast<float>(opt.scale);
  prm.causal = opt.causal;
  prm.window_left = opt.window_left;
  prm.window_right = opt.window_right;
  prm.softcap = static_cast<float>(opt.softcap);
}

// The CUDA grid's y (heads) and z (batch) limits, checked before launch with the argument named.
void check_cuda_grid(const char* op, const at::Tensor& q, int64_t heads_q, int64_t batch,
                     const char* batch_arg) {
  if (q.is_cpu()) return;
  constexpr int64_t kMaxGridYZ = 65535;
  HIRES_CHECK(heads_q <= kMaxGridYZ, op, "q", "has ", heads_q, " heads; the CUDA kernel supports up to ",
              kMaxGridYZ);
  HIRES_CHECK(batch <= kMaxGridYZ, op, batch_arg, "gives a batch of ", batch,
              "; the CUDA kernel supports up to ", kMaxGridYZ);
}

// Parallel units the split-KV heuristic fills: SMs on CUDA, intra-op threads on the CPU.
int64_t compute_units(const at::Tensor& q) {
#ifdef HIRES_LMM_WITH_CUDA
  if (q.is_cuda()) return device_sm_count(q.get_device());
#endif
  (void)q;
  return at::get_num_threads();
}

void run_kernel(const char* op, FlashParams& prm, const at::Tensor& q) {
  if (q.is_cpu()) {
    flash_fwd_cpu(prm, q.scalar_type());
    return;
  }
#ifdef HIRES_LMM_WITH_CUDA
  const c10::cuda::CUDAGuard guard(q.device());
#ifdef HIRES_LMM_WITH_SM90
  // The sm_90a kernel is opt-in until a GPU session has validated it (see flash_fwd_sm90.cuh).
  const char* sm90 = std::getenv("HIRES_LMM_ATTN_SM90");
  if (sm90 != nullptr && std::string(sm90) == "1" && flash_fwd_sm90_usable(prm, q.get_device())) {
    bool launched = false;
    const std::string err90 =
        launch_flash_fwd_sm90(prm, to_dtype(q.scalar_type()), c10::cuda::getCurrentCUDAStream(), &launched);
    if (launched) {
      TORCH_CHECK(err90.empty(), op, ": CUDA launch (sm_90a) failed: ", err90);
      return;
    }
    // nothing was enqueued (e.g. cuTensorMapEncodeTiled refused these strides): the sm_80 kernel
    TORCH_WARN_ONCE(op, ": the sm_90a kernel could not launch (", err90, "); using the sm_80 kernel");
  }
#endif
  const std::string err = launch_flash_fwd(prm, to_dtype(q.scalar_type()), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err.empty(), op, ": CUDA launch failed: ", err);
#else
  TORCH_CHECK(false, op, ": this build of hires_lmm has no CUDA kernels (built CPU-only)");
#endif
}

// Split-KV (dense launches): HIRES_LMM_ATTN_SPLITS forces a split count (tests), then the fp32
// partial outputs and log-sum-exps the splits write (kept alive by the caller until the launch).
struct SplitWorkspace {
  at::Tensor o_accum, lse_accum;
};

SplitWorkspace split_workspace(FlashParams& prm, const at::Tensor& q, int64_t k_blocks) {
  if (const char* force = std::getenv("HIRES_LMM_ATTN_SPLITS")) {
    prm.num_splits = int(std::max<int64_t>(1, std::min<int64_t>(std::atoll(force), std::max<int64_t>(k_blocks, 1))));
  }
  SplitWorkspace ws;
  if (prm.num_splits > 1) {
    const auto fopts = q.options().dtype(at::kFloat);
    ws.o_accum = at::empty({prm.num_splits, prm.batch * prm.seqlen_q, prm.heads_q, prm.head_dim}, fopts);
    ws.lse_accum = at::empty({prm.num_splits, prm.batch * prm.seqlen_q, prm.heads_q}, fopts);
    prm.o_accum = ws.o_accum.data_ptr<float>();
    prm.lse_accum = ws.lse_accum.data_ptr<float>();
  }
  return ws;
}

std::tuple<at::Tensor, at::Tensor> flash_attn_func(const at::Tensor& q_in, const at::Tensor& k_in,
                                                   const at::Tensor& v_in,
                                                   c10::optional<double> softmax_scale, bool causal,
                                                   int64_t window_size_left, int64_t window_size_right,
                                                   double softcap) {
  const char* op = "flash_attn_func";
  check_qkv(op, q_in, k_in, v_in, 4);
  AttnOptions opt = resolve_options(op, resolve_scale(softmax_scale, q_in.size(-1)), causal, window_size_left,
                                    window_size_right, softcap, q_in.size(1), k_in.size(1));
  if (!use_kernel(q_in, AttnPass::kForward)) return attention_math_lse(q_in, k_in, v_in, at::Tensor(), at::Tensor(), opt);
  if (q_in.is_cpu() && !cpu_twin_forced()) {  // default CPU path (csrc/cpu/attention_fast.h)
    if (q_in.numel() > 0 && k_in.size(1) > 0 &&
        small_q_shape_ok(q_in.size(1), k_in.size(1), q_in.size(2), k_in.size(2), opt.softcap)) {
      auto fast = small_q_cpu(q_in, k_in, v_in, nullptr, opt.scale, opt.window_left, opt.window_right, true);
      if (fast.has_value()) return *fast;
    } else {
      auto fast = attention_cpu_fast(q_in, k_in, v_in, opt.scale, opt.window_left, opt.window_right, opt.softcap);
      if (fast.has_value()) return *fast;
    }
  }
  check_cuda_grid(op, q_in, q_in.size(2), q_in.size(0), "q");
  at::Tensor q = prepare(q_in);
  const at::Tensor k = prepare(k_in), v = prepare(v_in);
  at::Tensor o = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  // softmax_lse (B, Hq, Sq) fp32, natural log
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  if (o.numel() == 0) return {o, lse};
  // Decode with GQA (one query, g = Hq / Hkv > 1): the g query heads that share a kv head become
  // g query rows of one kv head (views, no copy), so each K/V tile is read once per kv head
  // instead of once per q head. Causal and a right window are moot for one query (it sees every
  // key up to the last); a left window is not, so it keeps the plain layout.
  at::Tensor o_run = o;
  int64_t lse_head_stride = lse.stride(1), lse_row_stride = lse.stride(2);
  const int64_t group = q.size(2) / k.size(2);
  if (q.size(1) == 1 && group > 1 && opt.window_left < 0) {
    const int64_t B = q.size(0), Hkv = k.size(2), D = q.size(3);
    q = q.view({B, Hkv, group, D}).transpose(1, 2);      // (B, g, Hkv, D)
    o_run = o.view({B, Hkv, group, D}).transpose(1, 2);  // written in place through the view
    opt.causal = false;
    opt.window_right = -1;
    lse_head_stride = group;  // "row" r of kv head hk is q head hk * g + r
    lse_row_stride = 1;
  }
  FlashParams prm;
  fill_strides(prm, q, k, v, o_run);
  prm.batch = q.size(0);
  prm.seqlen_q = q.size(1);
  prm.seqlen_k = k.size(1);
  fill_options(prm, opt);
  prm.lse = lse.data_ptr<float>();
  prm.lse_batch_stride = lse.stride(0);
  prm.lse_head_stride = lse_head_stride;
  prm.lse_row_stride = lse_row_stride;
  // Split-KV when the (Q block, head, batch) items do not fill the machine (decode).
  const int64_t m_blocks = (prm.seqlen_q + FlashTileShape::kBlockM - 1) / FlashTileShape::kBlockM;
  const int64_t k_blocks = (prm.seqlen_k + FlashTileShape::kBlockN - 1) / FlashTileShape::kBlockN;
  const int64_t work = m_blocks * prm.heads_q * prm.batch, units = compute_units(q);
  if (work * 2 <= units)  // splitting possible: size it from the widest tile's visible K blocks
    prm.num_splits = choose_num_splits(work, m_blocks, flash_max_tile_k_blocks(prm, prm.seqlen_q, prm.seqlen_k, m_blocks), units);
  const SplitWorkspace split_ws = split_workspace(prm, q, k_blocks);
  run_kernel(op, prm, q);
  return {o, lse};
}

void check_cu_seqlens(const char* op, const char* arg, const at::Tensor& cu, const at::Tensor& q,
                      int64_t batch_plus_1) {
  check_same_device(cu, q, op, arg, "q");
  HIRES_CHECK(cu.scalar_type() == at::kInt, op, arg, "must be int32 (flash-attn's layout), got ",
              cu.scalar_type());
  HIRES_CHECK(cu.dim() == 1 && cu.size(0) >= 1, op, arg, "must be 1-D (batch + 1,), got shape ", cu.sizes());
  if (batch_plus_1 >= 0) {
    HIRES_CHECK(cu.size(0) == batch_plus_1, op, arg, "has ", cu.size(0),
                " entries but 'cu_seqlens_q' has ", batch_plus_1, " (one more than the batch)");
  }
}

// Value checks (a device->host copy on CUDA; free on CPU, where they are always done because the
// CPU kernel reads the values directly): cu[0] == 0, nondecreasing, cu[-1] <= total tokens, every
// length <= max_seqlen.
void check_cu_values(const char* op, const char* arg, const at::Tensor& cu, int64_t total,
                     int64_t max_seqlen, const char* max_arg) {
  if (!cu.is_cpu() && (!value_checks_enabled() || cuda_stream_capturing(cu))) return;
  const at::Tensor c = cu.cpu().contiguous();
  const int* p = c.data_ptr<int>();
  const int64_t n = c.size(0);
  HIRES_CHECK(p[0] == 0, op, arg, "must start at 0, got ", p[0]);
  int64_t longest = 0;
  for (int64_t i = 1; i < n; ++i) {
    HIRES_CHECK(p[i] >= p[i - 1], op, arg, "must be nondecreasing (prefix sums of lengths), but entry ",
                i, " (", p[i], ") < entry ", i - 1, " (", p[i - 1], ")");
    longest = std::max<int64_t>(longest, p[i] - p[i - 1]);
  }
  HIRES_CHECK(p[n - 1] <= total, op, arg, "ends at ", p[n - 1], " but the packed tensor has only ",
              total, " tokens");
  HIRES_CHECK(longest <= max_seqlen, op, max_arg, "is ", max_seqlen, " but '", arg,
              "' holds a sequence of length ", longest);
}

// Default CPU varlen path: ATen's CPU flash kernel per sequence (attention_cpu_fast), when every
// sequence qualifies and every result is finite; nullopt: run the twin.
c10::optional<std::tuple<at::Tensor, at::Tensor>> varlen_cpu_fast(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, const at::Tensor& cq,
                                                                  const at::Tensor& ck, const AttnOptions& opt) {
  const int* pq = cq.data_ptr<int>();
  const int* pk = ck.data_ptr<int>();
  const int64_t batch = cq.size(0) - 1;
  if (q.numel() == 0 || k.numel() == 0) return c10::nullopt;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t sq = pq[b + 1] - pq[b], sk = pk[b + 1] - pk[b];
    if (sq > 0 && !attention_cpu_fast_shape_ok(sq, sk, opt.window_left, opt.window_right, opt.softcap))
      return c10::nullopt;
  }
  // tokens past cu_seqlens_q[-1] belong to no sequence: o = 0, lse = -inf
  at::Tensor o = at::zeros(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::full({q.size(1), q.size(0)}, -std::numeric_limits<float>::infinity(),
                            q.options().dtype(at::kFloat));
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t q0 = pq[b], sq = pq[b + 1] - q0, k0 = pk[b], sk = pk[b + 1] - k0;
    if (sq == 0) continue;
    auto r = attention_cpu_fast(q.narrow(0, q0, sq).unsqueeze(0), k.narrow(0, k0, sk).unsqueeze(0),
                                v.narrow(0, k0, sk).unsqueeze(0), opt.scale, opt.window_left, opt.window_right,
                                opt.softcap);
    if (!r.has_value()) return c10::nullopt;  // a non-finite result: the twin redoes the call
    o.narrow(0, q0, sq).copy_(std::get<0>(*r).squeeze(0));
    lse.narrow(1, q0, sq).copy_(std::get<1>(*r).squeeze(0));
  }
  return std::make_tuple(o, lse);
}

std::tuple<at::Tensor, at::Tensor> flash_attn_varlen_func(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, c10::optional<double> softmax_scale, bool causal, int64_t window_size_left,
    int64_t window_size_right, double softcap) {
  const char* op = "flash_attn_varlen_func";
  check_qkv(op, q_in, k_in, v_in, 3);
  check_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, q_in, -1);
  check_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, q_in, cu_seqlens_q.size(0));
  HIRES_CHECK(max_seqlen_q >= 0, op, "max_seqlen_q", "must be >= 0, got ", max_seqlen_q);
  HIRES_CHECK(max_seqlen_k >= 0, op, "max_seqlen_k", "must be >= 0, got ", max_seqlen_k);
  check_cu_values(op, "cu_seqlens_q", cu_seqlens_q, q_in.size(0), max_seqlen_q, "max_seqlen_q");
  check_cu_values(op, "cu_seqlens_k", cu_seqlens_k, k_in.size(0), max_seqlen_k, "max_seqlen_k");
  // max_seqlen_* are only bounds: no sequence is longer than its packed tensor, so the work (CPU
  // items, CUDA grid x) is sized by min(max_seqlen, total tokens), never by a huge bound.
  const int64_t total_q = q_in.size(0), total_k = k_in.size(0);
  const int64_t bound_q = std::min(max_seqlen_q, total_q), bound_k = std::min(max_seqlen_k, total_k);
  const AttnOptions opt = resolve_options(op, resolve_scale(softmax_scale, q_in.size(-1)), causal,
                                          window_size_left, window_size_right, softcap, total_q, total_k);
  const at::Tensor cq = cu_seqlens_q.contiguous(), ck = cu_seqlens_k.contiguous();
  if (!use_kernel(q_in, AttnPass::kForward)) return attention_math_lse(q_in, k_in, v_in, cq, ck, opt);
  if (q_in.is_cpu() && !cpu_twin_forced()) {
    auto fast = varlen_cpu_fast(q_in, k_in, v_in, cq, ck, opt);
    if (fast.has_value()) return *fast;
  }
  const int64_t batch = cq.size(0) - 1;
  check_cuda_grid(op, q_in, q_in.size(1), batch, "cu_seqlens_q");
  const at::Tensor q = prepare(q_in), k = prepare(k_in), v = prepare(v_in);
  // zeros / -inf: tokens past cu_seqlens_q[-1] belong to no sequence and are not written by the
  // kernel (they see no key)
  at::Tensor o = at::zeros(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  // softmax_lse (Hq, total_q) fp32, natural log (flash-attn's varlen layout)
  at::Tensor lse = at::full({q.size(1), total_q}, -std::numeric_limits<float>::infinity(),
                            q.options().dtype(at::kFloat));
  if (o.numel() == 0 || batch == 0 || bound_q == 0) return {o, lse};
  FlashParams prm;
  fill_strides(prm, q, k, v, o);
  prm.cu_seqlens_q = cq.data_ptr<int>();
  prm.cu_seqlens_k = ck.data_ptr<int>();
  prm.batch = batch;
  prm.seqlen_q = bound_q;
  prm.seqlen_k = bound_k;
  fill_options(prm, opt);
  prm.lse = lse.data_ptr<float>();
  prm.lse_batch_stride = 0;  // varlen rows are packed token indices
  prm.lse_head_stride = lse.stride(0);
  prm.lse_row_stride = lse.stride(1);
  run_kernel(op, prm, q);
  return {o, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hires_lmm, m) {
  m.def("flash_attn_func(Tensor q, Tensor k, Tensor v, float? softmax_scale=None, bool causal=False, "
        "int window_size_left=-1, int window_size_right=-1, float softcap=0.0) -> (Tensor out, Tensor softmax_lse)");
  m.def("flash_attn_varlen_func(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "SymInt max_seqlen_q, SymInt max_seqlen_k, float? softmax_scale=None, bool causal=False, "
        "int window_size_left=-1, int window_size_right=-1, float softcap=0.0) -> (Tensor out, Tensor softmax_lse)");
  // tests: how many calls the fused CPU prefill kernel (csrc/cpu/attention_prefill.h) has served
  m.def("_cpu_prefill_calls() -> int", []() -> int64_t { return hires::attention::prefill_calls(); });
}

HIRES_BIND_CPU_CUDA(bind_attention) {
  b.impl("flash_attn_func", &flash_attn_func)
      .impl("flash_attn_varlen_func", &flash_attn_varlen_func);
}

// ---- autograd on the CPU key -----------------------------------------------------------------------
// The ops' autograd is registered from Python (python/hires_lmm/ops/attention.py,
// torch.library.register_autograd on the Autograd alias key): every call, gradients or not, then
// runs a Python function (about 7 us on this CPU, a decode step's budget). On AutogradCPU the same
// formula is this C++ kernel: no gradient needed -> straight to the CPU kernel; otherwise a
// torch::autograd::Function that saves q, k, v, out and softmax_lse (marked non-differentiable)
// and calls hires_lmm::flash_attn_bwd / flash_attn_varlen_bwd, as the Python one does. CUDA keeps
// the Python registration.
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool needs_grad(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return c10::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
}

using FwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                  c10::optional<double>, bool, int64_t, int64_t, double);
using BwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, c10::optional<double>, bool, int64_t, int64_t, double);
using VarFwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&, c10::SymInt,
                                                     c10::SymInt, c10::optional<double>, bool, int64_t,
                                                     int64_t, double);
using VarBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymInt, c10::SymInt,
    c10::optional<double>, bool, int64_t, int64_t, double);

template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The attention options of a forward, kept for its backward (both autograd functions below).
void save_options(AutogradContext* ctx, c10::optional<double> scale, bool causal, int64_t left,
                  int64_t right, double softcap) {
  ctx->saved_data["scale"] = scale;
  ctx->saved_data["causal"] = causal;
  ctx->saved_data["left"] = left;
  ctx->saved_data["right"] = right;
  ctx->saved_data["softcap"] = softcap;
}

// (dq, dk, dv) into out[0..2] where q, k, v need a gradient.
variable_list qkv_grads(AutogradContext* ctx, variable_list out,
                        const std::tuple<at::Tensor, at::Tensor, at::Tensor>& g) {
  if (ctx->needs_input_grad(0)) out[0] = std::get<0>(g);
  if (ctx->needs_input_grad(1)) out[1] = std::get<1>(g);
  if (ctx->needs_input_grad(2)) out[2] = std::get<2>(g);
  return out;
}

struct FlashAttnFn : public torch::autograd::Function<FlashAttnFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, c10::optional<double> scale, bool causal, int64_t left,
                               int64_t right, double softcap) {
    static const auto op = typed_op<FwdSig>("hires_lmm::flash_attn_func");
    at::AutoDispatchBelowADInplaceOrView guard;
    cpu_fast_taken() = false;
    auto [o, lse] = op.call(q, k, v, scale, causal, left, right, softcap);
    // ATen's CPU kernel produced o / lse from these q, k, v (its checks passed): the backward may
    // skip re-checking them (the saved tensors cannot change: autograd's version counters)
    ctx->saved_data["cpu_fast"] = cpu_fast_taken();
    ctx->set_materialize_grads(false);  // no zeros for lse's (never used) gradient
    ctx->save_for_backward({q, k, v, o, lse});
    save_options(ctx, scale, causal, left, right, softcap);
    ctx->mark_non_differentiable({lse});
    return {o, lse};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = typed_op<BwdSig>("hires_lmm::flash_attn_bwd");
    variable_list out(8);
    const at::Tensor& go = grads[0];
    if (!go.defined() || !(ctx->needs_input_grad(0) || ctx->needs_input_grad(1) || ctx->needs_input_grad(2)))
      return out;
    const auto s = ctx->get_saved_variables();
    const c10::optional<double> scale = ctx->saved_data["scale"].toOptional<double>();
    const bool causal = ctx->saved_data["causal"].toBool();
    const int64_t left = ctx->saved_data["left"].toInt(), right = ctx->saved_data["right"].toInt();
    const double softcap = ctx->saved_data["softcap"].toDouble();
    if (ctx->saved_data["cpu_fast"].toBool() && !cpu_twin_forced()) {  // forward ran ATen's kernel
      const AttnOptions opt = resolve_options("flash_attn_func", resolve_scale(scale, s[0].size(-1)), causal, left,
                                              right, softcap, s[0].size(1), s[1].size(1));
      auto fast = attention_cpu_fast_bwd(go, s[0], s[1], s[2], s[3], s[4], opt.scale, opt.window_left,
                                         opt.window_right, opt.softcap, /*forward_checked=*/true);
      if (fast.has_value()) return qkv_grads(ctx, std::move(out), *fast);
    }
    return qkv_grads(ctx, std::move(out), op.call(go, s[0], s[1], s[2], s[3], s[4], scale, causal, left, right, softcap));
  }
};

struct FlashAttnVarlenFn : public torch::autograd::Function<FlashAttnVarlenFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
                               c10::SymInt max_q, c10::SymInt max_k, c10::optional<double> scale, bool causal,
                               int64_t left, int64_t right, double softcap) {
    static const auto op = typed_op<VarFwdSig>("hires_lmm::flash_attn_varlen_func");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [o, lse] = op.call(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, left, right, softcap);
    ctx->save_for_backward({q, k, v, cu_q, cu_k, o, lse});
    ctx->saved_data["max_q"] = max_q;
    ctx->saved_data["max_k"] = max_k;
    save_options(ctx, scale, causal, left, right, softcap);
    ctx->mark_non_differentiable({lse});
    return {o, lse};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = typed_op<VarBwdSig>("hires_lmm::flash_attn_varlen_bwd");
    variable_list out(12);
    const at::Tensor& go = grads[0];
    if (!go.defined() || !(ctx->needs_input_grad(0) || ctx->needs_input_grad(1) || ctx->needs_input_grad(2)))
      return out;
    const auto s = ctx->get_saved_variables();
    return qkv_grads(ctx, std::move(out),
                     op.call(go, s[0], s[1], s[2], s[5], s[6], s[3], s[4],
                             ctx->saved_data["max_q"].toSymInt(), ctx->saved_data["max_k"].toSymInt(),
                             ctx->saved_data["scale"].toOptional<double>(), ctx->saved_data["causal"].toBool(),
                             ctx->saved_data["left"].toInt(), ctx->saved_data["right"].toInt(),
                             ctx->saved_data["softcap"].toDouble()));
  }
};

std::tuple<at::Tensor, at::Tensor> flash_attn_func_autograd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                const at::Tensor& v, c10::optional<double> scale,
                                                                bool causal, int64_t left, int64_t right,
                                                                double softcap) {
  if (!needs_grad(q, k, v)) {
    static const auto op = typed_op<FwdSig>("hires_lmm::flash_attn_func");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(q, k, v, scale, causal, left, right, softcap);
  }
  const auto r = FlashAttnFn::apply(q, k, v, scale, causal, left, right, softcap);
  return {r[0], r[1]};
}

std::tuple<at::Tensor, at::Tensor> flash_attn_varlen_func_autograd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
    const at::Tensor& cu_k, c10::SymInt max_q, c10::SymInt max_k, c10::optional<double> scale, bool causal,
    int64_t left, int64_t right, double softcap) {
  if (!needs_grad(q, k, v)) {
    static const auto op = typed_op<VarFwdSig>("hires_lmm::flash_attn_varlen_func");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, left, right, softcap);
  }
  const auto r = FlashAttnVarlenFn::apply(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, left, right, softcap);
  return {r[0], r[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(hires_lmm, AutogradCPU, m) {
  m.impl("flash_attn_func", &flash_attn_func_autograd_cpu);
  m.impl("flash_attn_varlen_func", &flash_attn_varlen_func_autograd_cpu);
}

}  // namespace hires::attention

#ifdef HIRES_LMM_WITH_SM90
HIRES_REGISTER_KERNEL("flash_attn_func", "cuda_sm90a");
#endif

// ---- flash_attn_with_kvcache ---------------------------------------------------------------------
// Decode over a dense KV cache, with flash-attn's names and semantics:
//   k_cache/v_cache (B, S_cache, Hkv, D); new k/v (B, Snew, Hkv, D), when given, are written in
//   place at rows cache_seqlens[b] .. cache_seqlens[b] + Snew - 1 of batch b; then q (B, Sq, Hq, D)
//   attends to keys 0 .. L_b - 1, L_b = cache_seqlens[b] + Snew (cache_seqlens None: the whole
//   cache, L_b = S_cache; then k/v must be None: where to append would be undefined), causal
//   aligned bottom-right per batch element (query i sees keys j <= i + L_b - Sq).
// The append is an ATen index_put_ with device-side row indices and the kernel reads L_b on the
// device (FlashParams::seqused_k): no host sync, so a decode step can be captured in a CUDA graph.
// Never the sm_90a kernel (it has no per-batch key lengths).
namespace hires::attention {
namespace {

void check_kvcache(const char* op, const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                   const c10::optional<at::Tensor>& k_new, const c10::optional<at::Tensor>& v_new,
                   const c10::optional<at::Tensor>& cache_seqlens) {
  check_float(q, op, "q");
  HIRES_CHECK(kc.scalar_type() == q.scalar_type(), op, "k_cache", "must have the dtype of 'q' (",
              q.scalar_type(), "), got ", kc.scalar_type());
  HIRES_CHECK(vc.scalar_type() == q.scalar_type(), op, "v_cache", "must have the dtype of 'q' (",
              q.scalar_type(), "), got ", vc.scalar_type());
  check_same_device(kc, q, op, "k_cache", "q");
  check_same_device(vc, q, op, "v_cache", "q");
  HIRES_CHECK(q.dim() == 4, op, "q", "must be 4-D (batch, seqlen_q, heads, head_dim), got shape ", q.sizes());
  HIRES_CHECK(kc.dim() == 4, op, "k_cache", "must be 4-D (batch, cache_len, heads_kv, head_dim), got shape ",
              kc.sizes());
  HIRES_CHECK(vc.dim() == 4, op, "v_cache", "must be 4-D (batch, cache_len, heads_kv, head_dim), got shape ",
              vc.sizes());
  const int64_t B = q.size(0), D = q.size(3), Hkv = kc.size(2);
  HIRES_CHECK(D > 0, op, "q", "must have head_dim > 0, got shape ", q.sizes());
  HIRES_CHECK(kc.size(3) == D, op, "k_cache", "has head_dim ", kc.size(3), " but 'q' has head_dim ", D);
  HIRES_CHECK(vc.sizes() == kc.sizes(), op, "v_cache", "must have the shape of 'k_cache' (", kc.sizes(),
              "), got ", vc.sizes());
  HIRES_CHECK(kc.size(0) == B, op, "k_cache", "has batch ", kc.size(0), " but 'q' has batch ", B,
              " (one cache row per sequence; cache_batch_idx is not supported)");
  HIRES_CHECK(Hkv > 0 && q.size(2) % Hkv == 0, op, "k_cache", "has ", Hkv, " heads, which must divide the ",
              q.size(2), " heads of 'q' (GQA/MQA need heads_q % heads_kv == 0)");
  if (q.is_cpu()) {
    HIRES_CHECK(D <= kMaxHeadDimCpu, op, "q", "has head_dim ", D, "; the CPU kernel supports up to ",
                kMaxHeadDimCpu);
  }
  HIRES_CHECK(k_new.has_value() == v_new.has_value(), op, k_new.has_value() ? "v" : "k",
              "must be given together with '", k_new.has_value() ? "k" : "v", "' (new keys and values)");
  if (k_new.has_value()) {
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{*k_new, "k"},
                                  std::pair<const at::Tensor&, const char*>{*v_new, "v"}}) {
      HIRES_CHECK(t.scalar_type() == q.scalar_type(), op, name, "must have the dtype of 'q' (",
                  q.scalar_type(), "), got ", t.scalar_type());
      check_same_device(t, q, op, name, "q");
      HIRES_CHECK(t.dim() == 4 && t.size(0) == B && t.size(2) == Hkv && t.size(3) == D, op, name,
                  "must be (batch, seqlen_new, heads_kv, head_dim) = (", B, ", seqlen_new, ", Hkv, ", ", D,
                  ") like 'k_cache', got shape ", t.sizes());
    }
    HIRES_CHECK(v_new->size(1) == k_new->size(1), op, "v", "has ", v_new->size(1), " new tokens but 'k' has ",
                k_new->size(1));
    HIRES_CHECK(k_new->size(1) <= kc.size(1), op, "k", "has ", k_new->size(1),
                " new tokens, more than the cache length ", kc.size(1), " of 'k_cache'");
    HIRES_CHECK(cache_seqlens.has_value(), op, "cache_seqlens",
                "must be given with 'k' and 'v' (it says where the new tokens go), got None");
  }
  if (cache_seqlens.has_value()) {
    const at::Tensor& cs = *cache_seqlens;
    check_same_device(cs, q, op, "cache_seqlens", "q");
    HIRES_CHECK(cs.scalar_type() == at::kInt, op, "cache_seqlens", "must be int32 (flash-attn's layout), got ",
                cs.scalar_type());
    HIRES_CHECK(cs.dim() == 1 && cs.size(0) == B, op, "cache_seqlens", "must be 1-D (batch,) = (", B,
                ",), got shape ", cs.sizes());
  }
}

// 0 <= cache_seqlens[b] and cache_seqlens[b] + Snew <= S_cache. CPU: always (free); CUDA: one
// device->host copy, skipped when value checks are off or while a CUDA graph is being captured.
void check_cache_seqlens_values(const char* op, const at::Tensor& cs, int64_t snew, int64_t s_cache) {
  if (!cs.is_cpu() && (!value_checks_enabled() || cuda_stream_capturing(cs))) return;
  const at::Tensor c = cs.cpu().contiguous();
  const int* p = c.data_ptr<int>();
  for (int64_t b = 0; b < c.size(0); ++b) {
    HIRES_CHECK(p[b] >= 0, op, "cache_seqlens", "must be >= 0, got ", p[b], " for batch element ", b);
    HIRES_CHECK(p[b] + snew <= s_cache, op, "cache_seqlens", "overflows the cache: batch element ", b, " holds ",
                p[b], " tokens, + ", snew, " new tokens of 'k' = ", p[b] + snew,
                " > cache length ", s_cache, " of 'k_cache'");
  }
}

// cache[b, pos[b] + i] = rows[b, i] for i < Snew, with device-side indices (no host sync). Rows are
// clamped into the cache so that unchecked bad lengths (value checks off) never write out of bounds.
void kvcache_append(at::Tensor& cache, const at::Tensor& rows, const at::Tensor& pos) {
  const int64_t B = rows.size(0), snew = rows.size(1), s_cache = cache.size(1);
  const auto lopts = at::TensorOptions().dtype(at::kLong).device(cache.device());
  const at::Tensor at_row = (pos.unsqueeze(1) + at::arange(snew, lopts).unsqueeze(0)).clamp(0, s_cache - 1);
  c10::List<std::optional<at::Tensor>> index;
  index.push_back(at::arange(B, lopts).unsqueeze(1));
  index.push_back(at_row);
  cache.index_put_(index, rows);
}

// CPU: the same append as kvcache_append with host loops: cache[b, clamp(pos[b] + i)] = rows[b, i]
// (pos null: position i; only reached with cache_seqlens, which k/v require).
void kvcache_append_cpu(at::Tensor& cache, const at::Tensor& rows, const int* pos) {
  const int64_t B = rows.size(0), snew = rows.size(1), H = rows.size(2), D = rows.size(3);
  const int64_t s_cache = cache.size(1);
  const bool rows_ok = cache.stride(3) == 1 && rows.stride(3) == 1;
  const int64_t es = cache.element_size();
  char* dst = static_cast<char*>(cache.data_ptr());
  const char* src = static_cast<const char*>(rows.const_data_ptr());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < snew; ++i) {
      const int64_t at_row = std::min<int64_t>(std::max<int64_t>((pos != nullptr ? pos[b] : 0) + i, 0), s_cache - 1);
      if (!rows_ok) {
        cache.select(0, b).select(0, at_row).copy_(rows.select(0, b).select(0, i));
        continue;
      }
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(dst + (b * cache.stride(0) + at_row * cache.stride(1) + h * cache.stride(2)) * es,
                    src + (b * rows.stride(0) + i * rows.stride(1) + h * rows.stride(2)) * es, size_t(D * es));
    }
}

// ATen fallback (CUDA fp32, head dims without a kernel; HIRES_LMM_ATTN_MATH=1): per-batch key
// lengths `used` (B,) int64 on the device (undefined: every key), O(Sq * S_cache) memory.
at::Tensor kvcache_math(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& used,
                        double scale, bool causal) {
  at::Tensor qh = q.transpose(1, 2).to(at::kFloat), kh = kc.transpose(1, 2).to(at::kFloat),
             vh = vc.transpose(1, 2).to(at::kFloat);
  const int64_t group = qh.size(1) / kh.size(1);
  if (group > 1) {
    kh = kh.repeat_interleave(group, 1);
    vh = vh.repeat_interleave(group, 1);
  }
  at::Tensor s = at::matmul(qh, kh.transpose(-1, -2)) * scale;  // (B, Hq, Sq, S_cache)
  const int64_t B = q.size(0), Sq = q.size(1), Sk = kc.size(1);
  const auto lopts = at::TensorOptions().dtype(at::kLong).device(q.device());
  const at::Tensor len = used.defined() ? used.view({B, 1, 1}) : at::full({B, 1, 1}, Sk, lopts);
  const at::Tensor jk = at::arange(Sk, lopts).view({1, 1, Sk}), iq = at::arange(Sq, lopts).view({1, Sq, 1});
  at::Tensor allowed = jk < len;  // (B, 1, Sk)
  // stale cache rows past L_b may hold anything (NaN in a fresh torch.empty cache): 0 * NaN = NaN
  vh = vh.masked_fill(allowed.logical_not().unsqueeze(-1), 0.0);  // (B, 1, Sk, 1) over (B, Hq, Sk, D)
  if (causal) allowed = allowed & (jk <= iq + (len - Sq));  // (B, Sq, Sk)
  s = s.masked_fill(allowed.unsqueeze(1).logical_not(), -std::numeric_limits<float>::infinity());
  at::Tensor p = at::softmax(s, -1).nan_to_num(0.0);  // rows that see no key -> 0
  return at::matmul(p, vh).transpose(1, 2).to(q.scalar_type()).contiguous();
}

// Default CPU path: ATen's CPU flash kernel per batch element over its L_b keys (attention_cpu_fast),
// when every element qualifies (causal: Sq <= L_b) and every result is finite (rows past L_b are
// never read); undefined: run the twin.
at::Tensor kvcache_cpu_fast(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& used,
                            double scale, bool causal) {
  const int64_t B = q.size(0), Sq = q.size(1), s_cache = kc.size(1);
  if (q.numel() == 0) return at::Tensor();
  const int64_t right = (causal && Sq > 1) ? 0 : -1;  // one query sees every key: causal is moot
  const at::Tensor u = used.defined() ? used.contiguous() : at::Tensor();
  std::vector<int64_t> len(B, s_cache);
  for (int64_t b = 0; b < B; ++b) {
    if (u.defined()) len[b] = u.data_ptr<int64_t>()[b];
    if (!attention_cpu_fast_shape_ok(Sq, len[b], -1, right, 0.0)) return at::Tensor();
  }
  at::Tensor o = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  for (int64_t b = 0; b < B; ++b) {
    auto r = attention_cpu_fast(q.narrow(0, b, 1), kc.narrow(0, b, 1).narrow(1, 0, len[b]),
                                vc.narrow(0, b, 1).narrow(1, 0, len[b]), scale, -1, right, 0.0);
    if (!r.has_value()) return at::Tensor();  // a non-finite result: the twin redoes the call
    if (B == 1) return std::get<0>(*r);
    o.narrow(0, b, 1).copy_(std::get<0>(*r));
  }
  return o;
}

at::Tensor flash_attn_with_kvcache(const at::Tensor& q_in, at::Tensor& k_cache, at::Tensor& v_cache,
                                   const c10::optional<at::Tensor>& k_new,
                                   const c10::optional<at::Tensor>& v_new,
                                   const c10::optional<at::Tensor>& cache_seqlens,
                                   c10::optional<double> softmax_scale, bool causal) {
  const char* op = "flash_attn_with_kvcache";
  check_kvcache(op, q_in, k_cache, v_cache, k_new, v_new, cache_seqlens);
  const int64_t B = q_in.size(0), s_cache = k_cache.size(1);
  const int64_t snew = k_new.has_value() ? k_new->size(1) : 0;
  if (cache_seqlens.has_value()) check_cache_seqlens_values(op, *cache_seqlens, snew, s_cache);

  // 1. Append the new keys/values in place; `used` = L_b on the device (undefined: all S_cache).
  at::Tensor used;
  if (q_in.is_cpu()) {  // the same append and clamps with host loops (no index tensors)
    at::Tensor cs;
    if (cache_seqlens.has_value()) cs = cache_seqlens->contiguous();
    const int* pos = cs.defined() ? cs.const_data_ptr<int>() : nullptr;
    if (snew > 0 && B > 0) {
      kvcache_append_cpu(k_cache, *k_new, pos);
      kvcache_append_cpu(v_cache, *v_new, pos);
    }
    if (pos != nullptr) {
      used = at::empty({B}, at::TensorOptions().dtype(at::kLong));
      int64_t* u = used.data_ptr<int64_t>();
      for (int64_t b = 0; b < B; ++b) u[b] = std::min<int64_t>(std::max<int64_t>(int64_t(pos[b]) + snew, 0), s_cache);
    }
  } else {
    if (cache_seqlens.has_value()) used = cache_seqlens->to(at::kLong);
    if (snew > 0 && B > 0) {
      kvcache_append(k_cache, *k_new, used);
      kvcache_append(v_cache, *v_new, used);
    }
    if (used.defined()) used = (used + snew).clamp(0, s_cache);  // clamp: value checks off
  }
  const double scale = resolve_scale(softmax_scale, q_in.size(-1));
  if (!use_kernel(q_in, AttnPass::kForward)) return kvcache_math(q_in, k_cache, v_cache, used, scale, causal);

  if (q_in.is_cpu() && !cpu_twin_forced()) {
    if (q_in.numel() > 0 && s_cache > 0 &&
        small_q_shape_ok(q_in.size(1), s_cache, q_in.size(2), k_cache.size(2), 0.0)) {
      // decode: one pass over each sequence's own L_b keys, query heads grouped per kv head
      auto fast = small_q_cpu(q_in, k_cache, v_cache, used.defined() ? used.const_data_ptr<int64_t>() : nullptr,
                              scale, -1, causal ? 0 : -1, false);
      if (fast.has_value()) return std::get<0>(*fast);
    } else {
      at::Tensor o = kvcache_cpu_fast(q_in, k_cache, v_cache, used, scale, causal);
      if (o.defined()) return o;
    }
  }
  // 2. Attention through the FA2 kernel (CPU twin on the CPU) with FlashParams::seqused_k.
  at::Tensor q = prepare(q_in);
  const at::Tensor kc = prepare(k_cache), vc = prepare(v_cache);
  at::Tensor o = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (o.numel() == 0) return o;
  const at::Tensor seqused = used.defined() ? used.to(at::kInt).contiguous() : at::Tensor();
  // One query sees every key of its row (causal is moot); with GQA its g query heads that share a
  // kv head become g query rows of that kv head (views), as flash_attn_func does for decode.
  at::Tensor o_run = o;
  const int64_t group = q.size(2) / kc.size(2);
  if (q.size(1) == 1) causal = false;
  if (q.size(1) == 1 && group > 1) {
    const int64_t Hkv = kc.size(2), D = q.size(3);
    q = q.view({B, Hkv, group, D}).transpose(1, 2);      // (B, g, Hkv, D)
    o_run = o.view({B, Hkv, group, D}).transpose(1, 2);  // written in place through the view
  }
  FlashParams prm;
  fill_strides(prm, q, kc, vc, o_run);
  prm.batch = B;
  prm.seqlen_q = q.size(1);
  prm.seqlen_k = s_cache;  // the bound of every L_b: sizes the split-KV choice (graph-stable)
  prm.seqused_k = seqused.defined() ? seqused.data_ptr<int>() : nullptr;
  prm.scale = static_cast<float>(scale);
  prm.causal = causal;
  const int64_t m_blocks = (prm.seqlen_q + FlashTileShape::kBlockM - 1) / FlashTileShape::kBlockM;
  const int64_t k_blocks = (s_cache + FlashTileShape::kBlockN - 1) / FlashTileShape::kBlockN;
  // Split count from one sequence's work items, not the batch's: with per-sequence split ranges
  // (seqused_k) a sequence's result then never depends on what it is batched with (batching is
  // exact), at the cost of over-splitting large batches.
  // (the widest tile at the cache capacity: batch-independent too)
  const int64_t units = compute_units(q);
  if (m_blocks * prm.heads_q * 2 <= units)
    prm.num_splits = choose_num_splits(m_blocks * prm.heads_q, m_blocks,
                                       flash_max_tile_k_blocks(prm, prm.seqlen_q, s_cache, m_blocks), units);
  const SplitWorkspace split_ws = split_workspace(prm, q, k_blocks);
  if (q.is_cpu()) {
    flash_fwd_cpu(prm, q.scalar_type());
    return o;
  }
#ifdef HIRES_LMM_WITH_CUDA
  const c10::cuda::CUDAGuard guard(q.device());
  const std::string err = launch_flash_fwd(prm, to_dtype(q.scalar_type()), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err.empty(), op, ": CUDA launch failed: ", err);
#else
  TORCH_CHECK(false, op, ": this build of hires_lmm has no CUDA kernels (built CPU-only)");
#endif
  return o;
}

// Autograd key: the op is not differentiable (a decode-time op that writes its caches in place),
// so asking for gradients is an error rather than PyTorch's warning and silent None gradients;
// otherwise bump the caches' version counters (as ATen's in-place ops do) and redispatch.
at::Tensor flash_attn_with_kvcache_autograd(const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache,
                                            const c10::optional<at::Tensor>& k_new,
                                            const c10::optional<at::Tensor>& v_new,
                                            const c10::optional<at::Tensor>& cache_seqlens,
                                            c10::optional<double> softmax_scale, bool causal) {
  const bool wants_grad = q.requires_grad() || k_cache.requires_grad() || v_cache.requires_grad() ||
                          (k_new.has_value() && k_new->requires_grad()) ||
                          (v_new.has_value() && v_new->requires_grad());
  TORCH_CHECK(!(c10::GradMode::is_enabled() && wants_grad),
              "flash_attn_with_kvcache: not differentiable (a decode-time op that writes its caches in "
              "place); call it under torch.no_grad() or use flash_attn_func for training");
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("hires_lmm::flash_attn_with_kvcache", "")
          .typed<at::Tensor(const at::Tensor&, at::Tensor&, at::Tensor&, const c10::optional<at::Tensor>&,
                            const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                            c10::optional<double>, bool)>();
  if (k_new.has_value()) {
    k_cache.unsafeGetTensorImpl()->bump_version();
    v_cache.unsafeGetTensorImpl()->bump_version();
  }
  const at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(q, k_cache, v_cache, k_new, v_new, cache_seqlens, softmax_scale, causal);
}

}  // namespace

TORCH_LIBRARY_IMPL(hires_lmm, Autograd, m) {
  m.impl("flash_attn_with_kvcache", &flash_attn_with_kvcache_autograd);
}

TORCH_LIBRARY_FRAGMENT(hires_lmm, m) {
  m.def("flash_attn_with_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k=None, "
        "Tensor? v=None, Tensor? cache_seqlens=None, float? softmax_scale=None, bool causal=True) -> Tensor");
}

HIRES_BIND_CPU_CUDA(bind_attention_kvcache) {
  b.impl("flash_attn_with_kvcache", &flash_attn_with_kvcache);
}

}  // namespace hires::attention
