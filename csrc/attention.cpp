// Binding of the attention family: schemas, argument checks, CPU and CUDA dispatch.
//   flash_attn_func, flash_attn_varlen_func
// Kernel: kernels/attention/flash_fwd.cuh (launcher csrc/cuda/flash_attn.cu); CPU twin:
// csrc/cpu/attention.cpp. On CUDA the tensor-core kernel covers fp16/bf16 with head_dim 64 or
// 128; other CUDA cases (fp32, other head dims) run `attention_math` below: ATen ops, the same
// semantics, O(S^2) memory (a correctness fallback, not a fast path). With HIRES_LMM_ATTN_SM90=1
// on an sm_90 device, dense unsplit fp16/bf16 calls run the sm_90a kernel (flash_fwd_sm90.cuh).
#include <torch/library.h>
#include <ATen/ATen.h>

#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>

#include "csrc/common.h"
#include "csrc/cpu/attention.h"
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

double resolve_scale(const c10::optional<double>& softmax_scale, int64_t D) {
  return softmax_scale.has_value() ? *softmax_scale : 1.0 / std::sqrt(double(D));
}

bool use_kernel(const at::Tensor& q) {
  // HIRES_LMM_ATTN_MATH=1 forces the ATen fallback on any device (lets CPU tests cover it).
  const char* math = std::getenv("HIRES_LMM_ATTN_MATH");
  if (math != nullptr && std::string(math) == "1") return false;
  if (q.is_cpu()) return true;
#ifdef HIRES_LMM_WITH_CUDA
  return (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16) &&
         flash_fwd_supported_head_dim(q.size(-1));
#else
  return false;
#endif
}

// Same semantics with ATen ops (any device, any dtype, any head dim), O(S^2) memory: the CUDA
// fallback for fp32 and head dims without a kernel. Varlen builds a block-diagonal mask on the
// device from cu_seqlens (no host sync).
at::Tensor attention_math(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& cu_q, const at::Tensor& cu_k, double scale, bool causal) {
  const bool varlen = cu_q.defined();
  // -> (B, H, S, D) fp32
  at::Tensor qh = varlen ? q.unsqueeze(0) : q, kh = varlen ? k.unsqueeze(0) : k,
             vh = varlen ? v.unsqueeze(0) : v;
  qh = qh.transpose(1, 2).to(at::kFloat);
  kh = kh.transpose(1, 2).to(at::kFloat);
  vh = vh.transpose(1, 2).to(at::kFloat);
  const int64_t group = qh.size(1) / kh.size(1);
  if (group > 1) {
    kh = kh.repeat_interleave(group, 1);
    vh = vh.repeat_interleave(group, 1);
  }
  at::Tensor s = at::matmul(qh, kh.transpose(-1, -2)) * scale;
  const int64_t Sq = qh.size(2), Sk = kh.size(2);
  const auto lopts = at::TensorOptions().dtype(at::kLong).device(q.device());
  at::Tensor iq = at::arange(Sq, lopts), jk = at::arange(Sk, lopts);
  at::Tensor allowed;
  if (varlen) {
    at::Tensor cq = cu_q.to(at::kLong), ck = cu_k.to(at::kLong);
    const int64_t nb = cq.size(0) - 1;
    // segment of each token (nb for tokens past the last sequence: they see nothing)
    at::Tensor seg_q = at::searchsorted(cq.slice(0, 1), iq, /*out_int32=*/false, /*right=*/true);
    at::Tensor seg_k = at::searchsorted(ck.slice(0, 1), jk, false, true);
    at::Tensor sq = seg_q.clamp_max(nb - 1), sk = seg_k.clamp_max(nb - 1);
    at::Tensor pos_q = iq - cq.index_select(0, sq), pos_k = jk - ck.index_select(0, sk);
    allowed = seg_q.unsqueeze(1) == seg_k.unsqueeze(0);
    allowed = allowed & (seg_q < nb).unsqueeze(1);
    if (causal) {
      at::Tensor diag = (ck.index_select(0, sq + 1) - ck.index_select(0, sq)) -
                        (cq.index_select(0, sq + 1) - cq.index_select(0, sq));
      allowed = allowed & (pos_k.unsqueeze(0) <= (pos_q + diag).unsqueeze(1));
    }
  } else if (causal) {
    allowed = jk.unsqueeze(0) <= (iq + (Sk - Sq)).unsqueeze(1);
  }
  if (allowed.defined()) s = s.masked_fill(allowed.logical_not(), -std::numeric_limits<float>::infinity());
  at::Tensor p = at::softmax(s, -1).nan_to_num(0.0);  // rows that see no key -> 0
  at::Tensor o = at::matmul(p, vh).transpose(1, 2).to(q.scalar_type());
  return (varlen ? o.squeeze(0) : o).contiguous();
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
    const std::string err90 = launch_flash_fwd_sm90(prm, to_dtype(q.scalar_type()), c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err90.empty(), op, ": CUDA launch (sm_90a) failed: ", err90);
    return;
  }
#endif
  const std::string err = launch_flash_fwd(prm, to_dtype(q.scalar_type()), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err.empty(), op, ": CUDA launch failed: ", err);
#else
  TORCH_CHECK(false, op, ": this build of hires_lmm has no CUDA kernels (built CPU-only)");
#endif
}

void fill_strides(FlashParams& prm, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& o) {
  const int64_t r = q.dim() - 3;  // token dim
  prm.q = q.data_ptr(); prm.k = k.data_ptr(); prm.v = v.data_ptr(); prm.o = o.data_ptr();
  prm.q_row_stride = q.stride(r); prm.q_head_stride = q.stride(r + 1);
  prm.k_row_stride = k.stride(r); prm.k_head_stride = k.stride(r + 1);
  prm.v_row_stride = v.stride(r); prm.v_head_stride = v.stride(r + 1);
  prm.o_row_stride = o.stride(r); prm.o_head_stride = o.stride(r + 1);
  if (r == 1) {
    prm.q_batch_stride = q.stride(0); prm.k_batch_stride = k.stride(0);
    prm.v_batch_stride = v.stride(0); prm.o_batch_stride = o.stride(0);
  }
  prm.heads_q = q.size(-2);
  prm.heads_kv = k.size(-2);
  prm.head_dim = q.size(-1);
}

at::Tensor flash_attn_func(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                           c10::optional<double> softmax_scale, bool causal) {
  const char* op = "flash_attn_func";
  check_qkv(op, q_in, k_in, v_in, 4);
  const double scale = resolve_scale(softmax_scale, q_in.size(-1));
  if (!use_kernel(q_in)) return attention_math(q_in, k_in, v_in, at::Tensor(), at::Tensor(), scale, causal);
  at::Tensor q = prepare(q_in);
  const at::Tensor k = prepare(k_in), v = prepare(v_in);
  at::Tensor o = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (o.numel() == 0) return o;
  // Decode with GQA (one query, g = Hq / Hkv > 1): the g query heads that share a kv head become
  // g query rows of one kv head (views, no copy), so each K/V tile is read once per kv head
  // instead of once per q head. Causal is moot for one query (it sees every key).
  at::Tensor o_run = o;
  const int64_t group = q.size(2) / k.size(2);
  if (q.size(1) == 1 && group > 1) {
    const int64_t B = q.size(0), Hkv = k.size(2), D = q.size(3);
    q = q.view({B, Hkv, group, D}).transpose(1, 2);      // (B, g, Hkv, D)
    o_run = o.view({B, Hkv, group, D}).transpose(1, 2);  // written in place through the view
    causal = false;
  }
  FlashParams prm;
  fill_strides(prm, q, k, v, o_run);
  prm.batch = q.size(0);
  prm.seqlen_q = q.size(1);
  prm.seqlen_k = k.size(1);
  prm.scale = static_cast<float>(scale);
  prm.causal = causal;
  // Split-KV when the (Q block, head, batch) items do not fill the machine (decode).
  const int64_t m_blocks = (prm.seqlen_q + FlashTileShape::kBlockM - 1) / FlashTileShape::kBlockM;
  const int64_t k_blocks = (prm.seqlen_k + FlashTileShape::kBlockN - 1) / FlashTileShape::kBlockN;
  prm.num_splits = choose_num_splits(m_blocks * prm.heads_q * prm.batch, k_blocks, compute_units(q));
  if (const char* force = std::getenv("HIRES_LMM_ATTN_SPLITS")) {  // testing: force a split count
    prm.num_splits = int(std::max<int64_t>(1, std::min<int64_t>(std::atoll(force), std::max<int64_t>(k_blocks, 1))));
  }
  at::Tensor o_accum, lse_accum;
  if (prm.num_splits > 1) {
    const auto fopts = q.options().dtype(at::kFloat);
    o_accum = at::empty({prm.num_splits, prm.batch * prm.seqlen_q, prm.heads_q, prm.head_dim}, fopts);
    lse_accum = at::empty({prm.num_splits, prm.batch * prm.seqlen_q, prm.heads_q}, fopts);
    prm.o_accum = o_accum.data_ptr<float>();
    prm.lse_accum = lse_accum.data_ptr<float>();
  }
  run_kernel(op, prm, q);
  return o;
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

at::Tensor flash_attn_varlen_func(const at::Tensor& q_in, const at::Tensor& k_in,
                                  const at::Tensor& v_in, const at::Tensor& cu_seqlens_q,
                                  const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                  int64_t max_seqlen_k, c10::optional<double> softmax_scale,
                                  bool causal) {
  const char* op = "flash_attn_varlen_func";
  check_qkv(op, q_in, k_in, v_in, 3);
  check_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, q_in, -1);
  check_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, q_in, cu_seqlens_q.size(0));
  HIRES_CHECK(max_seqlen_q >= 0, op, "max_seqlen_q", "must be >= 0, got ", max_seqlen_q);
  HIRES_CHECK(max_seqlen_k >= 0, op, "max_seqlen_k", "must be >= 0, got ", max_seqlen_k);
  check_cu_values(op, "cu_seqlens_q", cu_seqlens_q, q_in.size(0), max_seqlen_q, "max_seqlen_q");
  check_cu_values(op, "cu_seqlens_k", cu_seqlens_k, k_in.size(0), max_seqlen_k, "max_seqlen_k");
  const double scale = resolve_scale(softmax_scale, q_in.size(-1));
  const at::Tensor cq = cu_seqlens_q.contiguous(), ck = cu_seqlens_k.contiguous();
  if (!use_kernel(q_in)) return attention_math(q_in, k_in, v_in, cq, ck, scale, causal);
  const at::Tensor q = prepare(q_in), k = prepare(k_in), v = prepare(v_in);
  // zeros: tokens past cu_seqlens_q[-1] belong to no sequence and are not written by the kernel
  at::Tensor o = at::zeros(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t batch = cq.size(0) - 1;
  if (o.numel() == 0 || batch == 0 || max_seqlen_q == 0) return o;
  FlashParams prm;
  fill_strides(prm, q, k, v, o);
  prm.cu_seqlens_q = cq.data_ptr<int>();
  prm.cu_seqlens_k = ck.data_ptr<int>();
  prm.batch = batch;
  prm.seqlen_q = max_seqlen_q;
  prm.seqlen_k = max_seqlen_k;
  prm.scale = static_cast<float>(scale);
  prm.causal = causal;
  run_kernel(op, prm, q);
  return o;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hires_lmm, m) {
  m.def("flash_attn_func(Tensor q, Tensor k, Tensor v, float? softmax_scale=None, bool causal=False) -> Tensor");
  m.def("flash_attn_varlen_func(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "SymInt max_seqlen_q, SymInt max_seqlen_k, float? softmax_scale=None, bool causal=False) -> Tensor");
}

HIRES_BIND_CPU_CUDA(bind_attention) {
  b.impl("flash_attn_func", &flash_attn_func)
      .impl("flash_attn_varlen_func", &flash_attn_varlen_func);
}

}  // namespace hires::attention

#ifdef HIRES_LMM_WITH_SM90
HIRES_REGISTER_KERNEL("flash_attn_func", "cuda_sm90a");
#endif
