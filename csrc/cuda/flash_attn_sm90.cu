// Launcher of kernels/attention/flash_fwd_sm90.cuh (built only for sm_90a; the binding sees
// HIRES_LMM_WITH_SM90). Builds the TMA tensor maps on the host (driver entry point fetched through
// the runtime, no libcuda link), then launches on `stream`. Instantiations: {fp16, bf16} x {64, 128}.
#include <cudaTypedefs.h>

#include <atomic>
#include <cmath>

#include "csrc/cuda/flash_attn.h"
#include "csrc/cuda/func_attr.h"
#include "kernels/attention/flash_fwd_sm90.cuh"

namespace hires::attention {
namespace {

using EncodeFn = PFN_cuTensorMapEncodeTiled_v12000;

EncodeFn encode_fn() {
  static EncodeFn fn = []() -> EncodeFn {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) !=
            cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    return reinterpret_cast<EncodeFn>(f);
  }();
  return fn;
}

// (D, rows, heads, batch) view of a (B, S, H, D) tensor with element strides; box (64, box_rows, 1, 1).
std::string make_map(CUtensorMap* map, CUtensorMapDataType dt, const void* ptr, int64_t D, int64_t rows,
                     int64_t heads, int64_t batch, int64_t row_stride, int64_t head_stride,
                     int64_t batch_stride, int box_rows) {
  EncodeFn encode = encode_fn();
  if (encode == nullptr) return "cuTensorMapEncodeTiled is not available from the driver";
  const cuuint64_t dims[4] = {cuuint64_t(D), cuuint64_t(rows), cuuint64_t(heads), cuuint64_t(batch)};
  const cuuint64_t strides[3] = {cuuint64_t(row_stride) * 2, cuuint64_t(head_stride) * 2,
                                 cuuint64_t(batch_stride) * 2};  // bytes, 16-byte multiples
  const cuuint32_t box[4] = {64, cuuint32_t(box_rows), 1, 1};
  const cuuint32_t elem[4] = {1, 1, 1, 1};
  const CUresult r = encode(map, dt, 4, const_cast<void*>(ptr), dims, strides, box, elem,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? std::string() : "cuTensorMapEncodeTiled failed (code " + std::to_string(int(r)) + ")";
}

template <typename T, int D>
std::string launch(const FlashParams& p, CUtensorMapDataType dt, cudaStream_t stream, bool* launched) {
  using Tile = sm90::FlashFwdSm90Tile<D>;
  const int64_t m_blocks = (p.seqlen_q + Tile::kBlockM - 1) / Tile::kBlockM;
  if (m_blocks == 0 || p.batch == 0 || p.heads_q == 0) return std::string();
  if (p.heads_q > 65535 || p.batch > 65535 || m_blocks > 0x7fffffff) return "grid too large";
  CUtensorMap tq, tk, tv;
  std::string err = make_map(&tq, dt, p.q, D, p.seqlen_q, p.heads_q, p.batch, p.q_row_stride, p.q_head_stride,
                             p.q_batch_stride, Tile::kBlockM);
  if (err.empty())
    err = make_map(&tk, dt, p.k, D, p.seqlen_k, p.heads_kv, p.batch, p.k_row_stride, p.k_head_stride,
                   p.k_batch_stride, Tile::kBlockN);
  if (err.empty())
    err = make_map(&tv, dt, p.v, D, p.seqlen_k, p.heads_kv, p.batch, p.v_row_stride, p.v_head_stride,
                   p.v_batch_stride, Tile::kBlockN);
  if (!err.empty()) return err;
  auto kernel = sm90::flash_fwd_sm90_kernel<T, D>;
  // setmaxnreg only moves the registers the block got at launch (threads x registers per thread
  // of the compiled kernel): the kernel's static_assert budgets kLaunchRegs per thread, the cap
  // __launch_bounds__ gives ptxas. Had ptxas allocated fewer, setmaxnreg.inc would wait forever:
  // check the compiled value once and refuse (nothing enqueued: the sm_80 kernel runs).
  static std::atomic<int> compiled_regs{0};  // per instantiation; 0: not queried yet
  int regs = compiled_regs.load(std::memory_order_relaxed);
  if (regs == 0) {
    cudaFuncAttributes a{};
    if (cudaFuncGetAttributes(&a, kernel) == cudaSuccess) {
      regs = a.numRegs;
      compiled_regs.store(regs, std::memory_order_relaxed);
    } else {
      const cudaError_t e = cudaGetLastError();
      return std::string("cudaFuncGetAttributes: ") + cudaGetErrorString(e);
    }
  }
  if (regs != Tile::kLaunchRegs)
    return "the sm_90a kernel was compiled with " + std::to_string(regs) + " registers per thread, not " +
           std::to_string(Tile::kLaunchRegs) + " (setmaxnreg budget)";
  err = cuda_util::ensure_dynamic_smem<sm90::flash_fwd_sm90_kernel<T, D>>(Tile::kSmemBytes);
  if (!err.empty()) return err;
  cudaError_t e;
  const dim3 grid(unsigned(m_blocks), unsigned(p.heads_q), unsigned(p.batch));
  kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(tq, tk, tv, p);
  *launched = true;
  e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e));
}

template <typename T>
std::string pick_dim(const FlashParams& p, CUtensorMapDataType dt, cudaStream_t stream, bool* launched) {
  switch (p.head_dim) {
    case 64: return launch<T, 64>(p, dt, stream, launched);
    case 128: return launch<T, 128>(p, dt, stream, launched);
    default: return "head_dim " + std::to_string(p.head_dim) + " has no sm_90a kernel (64, 128)";
  }
}

}  // namespace

bool flash_fwd_sm90_usable(const FlashParams& p, int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  // no sliding window, no softcap (the sm_80 kernel runs those); causal alone is window_right 0
  const bool plain_mask = p.window_left < 0 && (p.causal || p.window_right < 0) && p.softcap == 0.f;
  // the kernel folds scale log2(e) into the exponent's FFMA after a max over the raw scores:
  // that max is the max of the scaled scores only for a positive, finite scale log2(e)
  const float c = p.scale * 1.4426950408889634f;
  const bool fold_ok = p.scale > 0.f && std::isfinite(c);
  return major == 9 && minor == 0 && p.cu_seqlens_q == nullptr && p.num_splits <= 1 && plain_mask && fold_ok &&
         p.seqused_k == nullptr &&  // no per-batch KV cache lengths in the sm_90a kernel
         (p.head_dim == 64 || p.head_dim == 128) && p.seqlen_q > 0 && p.seqlen_k > 0;
}

std::string launch_flash_fwd_sm90(const FlashParams& p, DType t, cudaStream_t stream, bool* launched) {
  *launched = false;
  switch (t) {
    case DType::kF16: return pick_dim<__half>(p, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, stream, launched);
    case DType::kBF16: return pick_dim<__nv_bfloat16>(p, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, stream, launched);
    case DType::kF32: return "float32 has no sm_90a kernel";
  }
  return "unknown dtype";
}

}  // namespace hires::attention
