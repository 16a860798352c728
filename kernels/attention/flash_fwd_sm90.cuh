// Flash attention forward for sm_90a (FlashAttention-3's techniques: TMA, mbarrier rings, warp
// specialization, warpgroup MMA, setmaxnreg, softmax/GEMM overlap inside a warpgroup, ping-pong of
// the two consumer warpgroups). Opt-in (HIRES_LMM_ATTN_SM90=1) until a GPU session validates it:
// this code has NEVER RUN ON A GPU. The sm_80 kernel (flash_fwd.cuh) is the default and this
// one's reference; tests/test_flash_attn.py::test_flash_attn_sm90 forces this path on sm_90.
//
// Formula: as flash_fwd.cuh (softmax(scale q k^T) v, bottom-right causal, GQA by kv-head map,
//   online softmax in fp32 log2 units, P rounded to T for the P.V MMA, rows with no key -> 0),
//   with the scale folded into the exponent's FFMA: c = scale log2 e, the running max m is
//   max(m, c * max_j s_j) (= max_j of c s_j bit for bit: rounding is monotonic, c > 0), and
//   p = exp2(fma(s, c, -m)): one FFMA + MUFU.EX2 per score (flash_fwd.cuh rounds s c, then
//   subtracts). Needs 0 < scale, c finite: flash_fwd_sm90_usable sends other scales to the sm_80
//   kernel. O's update order is flash_fwd.cuh's (O *= alpha_j, then O += P_j V_j); only the
//   point in time of the rescale moves. tests/test_flash_sm90_pipeline.py models both.
// Shapes: dense only, q (B,Sq,Hq,D), k/v (B,Sk,Hkv,D), o (B,Sq,Hq,D); every stride but the last
//   a multiple of 16 bytes, base pointers 16-byte aligned (TMA), D in {64, 128}, T fp16/bf16.
// Ownership: block = (Q block of kBlockM = 128 rows, q head, batch); 3 warpgroups:
//   - warpgroup 0 = producer: gives registers away (setmaxnreg.dec); one thread issues TMA loads
//     of the Q tile (once), then of K and V tiles into two kStages-deep rings in the order the
//     consumers need them: K0, K1, V0, K2, V1, ..., K(n-1), V(n-2), V(n-1).
//   - warpgroups 1, 2 = consumers w = 0, 1 (setmaxnreg.inc), each owning 64 Q rows: S = Q K^T with
//     wgmma (A = Q, B = K, both from shared memory), masking and online softmax on the S
//     registers (thread: rows g, g+8 of its warp's 16, as in flash_fwd.cuh), P converted in
//     registers to the A operand of O += P V (wgmma, A from registers, B = V MN-major).
// Consumer schedule (block j lives in stage j % S of each ring, phase (j / S) & 1; n blocks):
//   prologue  wait full_k[0] | sched_sync | issue S_0 = Q K_0^T | sched_arrive | wait<0> |
//             release K_0 | softmax(S_0) -> alpha_0, P_0 (fp32) | pack P_0 to T (A registers)
//   j=1..n-1  wait full_k[j] | sched_sync | issue S_j (group A) | O *= alpha_{j-1} |
//             wait full_v[j-1] | issue O += P_{j-1} V_{j-1} (group B) | sched_arrive |
//             wait<1> (A done) | release K_j | softmax(S_j) -> alpha_j, P_j (fp32, S registers)
//             | anchor | wait<0> (B done) | release V_{j-1} | pack P_j to T
//   tail      O *= alpha_{n-1} | wait full_v[n-1] | issue O += P_{n-1} V_{n-1} | wait<0> |
//             release V_{n-1} | epilogue (n = 0: no main loop; o = 0, lse = -inf)
//   (a) a warpgroup's softmax(S_j) runs while the tensor cores do its P_{j-1} V_{j-1}, its O
//   rescale while they do its S_j. (b) the sections between sched_sync and sched_arrive (GEMM
//   issue) alternate between the consumers, so one's softmax overlaps the other's GEMMs:
//     w0: [S_j PV_j-1] softmax_j .......... [S_j+1 PV_j] softmax_j+1 ........ [S_j+2 ...
//     w1:   (waits)    [S_j PV_j-1] softmax_j .......... [S_j+1 PV_j] softmax_j+1 ...
//     TC:  S_j PV_j-1 (w0)  S_j PV_j-1 (w1)  S_j+1 PV_j (w0)  S_j+1 PV_j (w1) ...
//   (c) K_j's stage is released as soon as S_j completed, V_j's after P_j V_j: the producer can
//   load K_j+S while P_j V_j still reads V.
// Barrier protocol:
//   mbarriers: bar_q (count 1: the producer's arrive.expect_tx + the Q bytes; consumers wait
//   parity 0); full_k[s], full_v[s] (count 1 + one tile's bytes; consumers wait parity
//   (j / S) & 1 for block j); empty_k[s], empty_v[s] (count 8: lane 0 of each consumer warp
//   after its wgmma.wait_group saw the GEMM that read the stage complete; the producer waits
//   parity ((j / S) & 1) ^ 1 before loading block j, which passes at once on the first pass).
//   Named barriers (ids 0 = __syncthreads, 1 + w = warpgroup w alone before its epilogue writes
//   O into its Q rows, 128 threads): id kSchedBar + w, 256 threads = warpgroup w's bar.sync
//   (sched_sync) + the other warpgroup's bar.arrive (sched_arrive, after its section).
//   Warpgroup 1 arrives once on kSchedBar + 0 before its first section (warpgroup 0 goes first)
//   and skips its arrive after its last section: each id sees n syncs and n arrives, no phase
//   is left open. One warpgroup's arrivals on an id never pile up: between two of them it
//   passes its own bar.sync, which needs the other's arrive, which follows the other's bar.sync
//   on the first id. tests/test_flash_sm90_pipeline.py simulates this protocol (producer + 2
//   consumers, mbarrier phases, named barriers, random interleavings, n = 0..9 blocks): no
//   deadlock, no read of a stage before its bytes landed, no overwrite before every reader
//   released it, and the output of the tiles it read matches the reference.
// Register budget: the launch gives 384 threads x 168 (kLaunchRegs) = 64512 registers; setmaxnreg
//   moves them: producer 128 x 40 + consumers 2 x 128 x 232 = 64512. A consumer thread holds
//   O (D/2 fp32), S or P (BN/2 = 64 fp32), the packed P the in-flight P.V reads (BN/4 = 32) and
//   the row statistics (m, l, alpha: 6): 166 (D=128) + addresses; cuda_check.py -v: no spill.
// Shared memory: every tile is stored as 64-element (128-byte) column panels, rows of 128 B,
//   the 16-byte chunk c of row r at c ^ (r % 8) (TMA SWIZZLE_128B; the wgmma descriptors use
//   the same 128B-swizzle layout type); panels 1024-byte aligned.
// Limits: Hq, B <= 65535 (grid); any Sq, Sk: TMA zero-fills rows past the tensor end, tails and
//   causal keys are masked in registers; block skipping as flash_fwd.cuh. No sliding window, no
//   softcap, scale > 0 (flash_fwd_sm90_usable refuses the rest: the sm_80 kernel runs); writes
//   lse when asked.
#pragma once
#include <cuda.h>
#include <cstdint>
#include <math_constants.h>

#include "kernels/attention/flash_params.h"
#include "kernels/attention/flash_row.cuh"
#include "kernels/attention/wgmma_sm90.cuh"
#include "kernels/common/numeric.cuh"
#include "kernels/common/ptx_sm80.cuh"

namespace hires::attention::sm90 {

template <int kHeadDim_>
struct FlashFwdSm90Tile {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kConsumers = 2;               // consumer warpgroups
  static constexpr int kWgRows = 64;                 // wgmma M: Q rows per consumer
  static constexpr int kBlockM = kConsumers * kWgRows;
  static constexpr int kBlockN = 128;                // keys per K/V tile (wgmma N of Q K^T)
  static constexpr int kStages = 2;                  // depth of the K ring and of the V ring
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kPanel = 64;                  // elements per 128-byte swizzled row
  static constexpr int kPanels = kHeadDim / kPanel;
  static constexpr int kRowBytes = kPanel * 2;       // 128
  static constexpr int kQPanelBytes = kBlockM * kRowBytes;
  static constexpr int kKVPanelBytes = kBlockN * kRowBytes;
  static constexpr int kQBytes = kPanels * kQPanelBytes;
  static constexpr int kKVBytes = kPanels * kKVPanelBytes;  // one K (or V) tile
  static constexpr int kBarrierBytes = 8 * (1 + 4 * kStages);  // bar_q, full_k, full_v, empty_k, empty_v
  static constexpr int kSmemBytes = 1024 /* alignment slack */ + kQBytes + 2 * kStages * kKVBytes + kBarrierBytes;
  static constexpr int kProducerRegs = 40;
  static constexpr int kConsumerRegs = 232;
  static constexpr int kEpilogueBar = 1;             // named barrier ids kEpilogueBar + w (128 threads)
  static constexpr int kSchedBar = 3;                // named barrier ids kSchedBar + w (256 threads)
  static_assert(kHeadDim % kPanel == 0, "D is a whole number of 128-byte panels");
  static_assert(kQPanelBytes % 1024 == 0 && kKVPanelBytes % 1024 == 0,
                "128B-swizzle atoms (8 rows x 128 B) must stay 1024-byte aligned");
  // Registers per thread at launch: __launch_bounds__(kThreads, 1) caps ptxas at the register
  // file over kThreads rounded down to the allocation granule of 8 (384 threads: 170 -> 168;
  // cuda_check.py -v shows "Used 168 registers" for every instantiation). The block owns
  // kThreads x kLaunchRegs registers (384 x 168 = 64512, not 65536) and setmaxnreg only moves
  // them between its warpgroups: a split that asks for more makes setmaxnreg.inc wait forever.
  static constexpr int kLaunchRegs = (65536 / kThreads) / 8 * 8;
  static_assert(kProducerRegs * 128 + kConsumerRegs * 128 * kConsumers <= kThreads * kLaunchRegs,
                "setmaxnreg budget: the warpgroups' registers must fit what the block gets at launch");
  static_assert(kProducerRegs % 8 == 0 && kConsumerRegs % 8 == 0 && kProducerRegs >= 24 &&
                    kConsumerRegs <= 256, "setmaxnreg takes multiples of 8 in [24, 256]");
  static_assert(kProducerRegs <= kLaunchRegs && kConsumerRegs >= kLaunchRegs,
                "the producer gives registers away (dec), the consumers take them (inc)");
  static_assert(kConsumers == 2, "the ping-pong protocol pairs exactly two consumer warpgroups");
  static_assert(kSchedBar >= kEpilogueBar + kConsumers && kSchedBar + kConsumers <= 16,
                "named barrier ids: 0 is __syncthreads, 16 per block");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "wgmma N and TMA box limits");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per block on sm_90");
};

// ---- PTX wrappers ------------------------------------------------------------------------------
using hires::ptx::smem_u32;  // kernels/common/ptx_sm80.cuh
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Spins until the phase with this parity has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
// 4-D TMA tile load (coordinates innermost first), completion counted on `bar`.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1,
                                            int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Pins accumulator registers around asynchronous MMAs (no read or write moves across).
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int R>
__device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R)); }
template <int R>
__device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R)); }

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// wgmma shared-memory descriptor, 128-byte swizzle (layout type 1 in bits 62-63).
//   K-major operand (Q, K): rows of 128 B, SBO = 1024 B between 8-row groups, LBO unused (1).
//   MN-major operand (V):   8 K-rows of 128 B per group, SBO = 1024 B between 8-row groups of K,
//                           LBO = bytes between 64-element panels along N.
__device__ __forceinline__ uint64_t make_desc(uint32_t smem_byte_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  uint64_t d = 0;
  d |= uint64_t((smem_byte_addr & 0x3FFFF) >> 4);
  d |= uint64_t((lbo_bytes >> 4) & 0x3FFF) << 16;
  d |= uint64_t((sbo_bytes >> 4) & 0x3FFF) << 32;
  d |= uint64_t(1) << 62;
  return d;
}

template <typename T> struct Tag;
template <> struct Tag<__nv_bfloat16> { using type = bf16_tag; };
template <> struct Tag<__half> { using type = f16_tag; };


// Tensor maps (built by the launcher): q over (D, Sq, Hq, B), k/v over (D, Sk, Hkv, B), boxes of
// (64, kBlockM or kBlockN, 1, 1) with SWIZZLE_128B; out-of-range rows are zero-filled.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(FlashFwdSm90Tile<kHeadDim>::kThreads, 1)
flash_fwd_sm90_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                      const __grid_constant__ CUtensorMap tm_v, const FlashParams p) {
  using Tile = FlashFwdSm90Tile<kHeadDim>;
  using TagT = typename Tag<T>::type;
  constexpr int BM = Tile::kBlockM, BN = Tile::kBlockN, S = Tile::kStages;
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ unsigned char smem_raw[];
  // 1024-byte alignment for the 128B-swizzle atoms (the launcher adds the slack).
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sQ = base;
  const uint32_t sK = sQ + Tile::kQBytes;             // [S][kPanels][BN rows x 128 B]
  const uint32_t sV = sK + S * Tile::kKVBytes;
  const uint32_t bar_q = sV + S * Tile::kKVBytes;     // then full_k[S], full_v[S], empty_k[S], empty_v[S]
  auto full_k = [&](int s) { return bar_q + 8u * (1 + s); };
  auto full_v = [&](int s) { return bar_q + 8u * (1 + S + s); };
  auto empty_k = [&](int s) { return bar_q + 8u * (1 + 2 * S + s); };
  auto empty_v = [&](int s) { return bar_q + 8u * (1 + 3 * S + s); };

  const int wg = threadIdx.x / 128;
  const int b = blockIdx.z, h = blockIdx.y;
  const int mb = p.causal ? int(gridDim.x) - 1 - int(blockIdx.x) : int(blockIdx.x);
  const int64_t Sq = p.seqlen_q, Sk = p.seqlen_k;
  const int64_t m0 = int64_t(mb) * BM;
  const int hk = int(h / (p.heads_q / p.heads_kv));
  const int64_t diag = Sk - Sq;
  const int64_t n_end = p.causal ? max(int64_t(0), min(Sk, m0 + BM + diag)) : Sk;
  const int n_blocks = int((n_end + BN - 1) / BN);  // the same for all three warpgroups

  if (threadIdx.x == 0) {
    mbar_init(bar_q, 1);
    for (int s = 0; s < S; ++s) {
      mbar_init(full_k(s), 1);                     // the producer's arrive.expect_tx
      mbar_init(full_v(s), 1);
      mbar_init(empty_k(s), Tile::kConsumers * 4);  // lane 0 of every consumer warp
      mbar_init(empty_v(s), Tile::kConsumers * 4);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // visible to the async proxy
  }
  __syncthreads();  // the only block-wide barrier: afterwards the roles never meet again

  if (wg == 0) {
    // ---- producer: one thread, loads in the order the consumers wait for them ----
    setmaxnreg_dec<Tile::kProducerRegs>();
    if (threadIdx.x == 0) {
      mbar_expect_tx(bar_q, Tile::kQBytes);
      for (int pn = 0; pn < Tile::kPanels; ++pn)
        tma_load_4d(sQ + pn * Tile::kQPanelBytes, &tm_q, bar_q, pn * Tile::kPanel, int(m0), h, b);
      // block j of tensor map tm into stage j % S of the ring at `ring` (full / empty barriers)
      auto load = [&](const CUtensorMap* tm, uint32_t ring, uint32_t full, uint32_t empty, int j) {
        mbar_wait(empty, ((j / S) & 1) ^ 1);  // first pass: the "previous phase" counts as done
        mbar_expect_tx(full, Tile::kKVBytes);
        for (int pn = 0; pn < Tile::kPanels; ++pn)
          tma_load_4d(ring + (j % S) * Tile::kKVBytes + pn * Tile::kKVPanelBytes, tm, full, pn * Tile::kPanel,
                      j * BN, hk, b);
      };
      if (n_blocks > 0) load(&tm_k, sK, full_k(0), empty_k(0), 0);
      for (int j = 0; j < n_blocks; ++j) {
        if (j + 1 < n_blocks) load(&tm_k, sK, full_k((j + 1) % S), empty_k((j + 1) % S), j + 1);
        load(&tm_v, sV, full_v(j % S), empty_v(j % S), j);
      }
    }
    return;
  }

  // ---- consumers ----
  setmaxnreg_inc<Tile::kConsumerRegs>();
  const int cw = wg - 1;                     // consumer index: Q rows [64 cw, 64 cw + 64)
  const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t row_g = m0 + cw * Tile::kWgRows + warp * 16 + g;  // rows row_g, row_g + 8
  const float scale_log2 = p.scale * kLog2e;  // > 0 and finite (flash_fwd_sm90_usable)

  float acc[kHeadDim / 2];  // O: 64 x D per warpgroup
#pragma unroll
  for (int i = 0; i < kHeadDim / 2; ++i) acc[i] = 0.f;
  float m_run[2] = {-CUDART_INF_F, -CUDART_INF_F};  // running max, log2 units (scaled)
  float l_run[2] = {0.f, 0.f};
  float alpha[2] = {0.f, 0.f};  // rescale of O owed by the last softmax
  // S of the block being computed; after the softmax, its P in fp32. Zeroed once so the asm
  // inputs are defined (the first k16 step overwrites: scale_d = 0).
  float sc[BN / 2];
#pragma unroll
  for (int j = 0; j < BN / 2; ++j) sc[j] = 0.f;
  uint32_t pa[BN / 16][4];  // P rounded to T: the A operand of O += P V (read by the async wgmma)

  mbar_wait(bar_q, 0);
  __syncwarp();  // reconverge after the spin loop: the wgmma instructions are .sync.aligned
  const uint32_t q_rows = sQ + cw * Tile::kWgRows * Tile::kRowBytes;  // this consumer's 64 rows

  // Ping-pong: warpgroup cw waits its turn on id kSchedBar + cw, hands the turn over on the other's.
  auto sched_sync = [&]() { asm volatile("bar.sync %0, 256;\n" ::"r"(Tile::kSchedBar + cw) : "memory"); };
  auto sched_arrive = [&]() { asm volatile("bar.arrive %0, 256;\n" ::"r"(Tile::kSchedBar + 1 - cw) : "memory"); };

  // S = Q K^T over D in k16 steps (a step advances 32 B inside a 128-byte swizzled row); one group.
  auto issue_s = [&](int s) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      const uint32_t koff = (kk % 4) * 32;
      const uint64_t da = make_desc(q_rows + (kk / 4) * Tile::kQPanelBytes + koff, 16, 1024);
      const uint64_t db = make_desc(sK + s * Tile::kKVBytes + (kk / 4) * Tile::kKVPanelBytes + koff, 16, 1024);
      wgmma_ss<TagT, BN>(sc, da, db, kk > 0 ? 1 : 0);
    }
    wgmma_commit();
  };
  // O += P V: key slice kk = n8 tiles 2kk, 2kk+1 of P; V stage: panels of (BN keys x 64 d),
  // 16 keys = 2 groups of 8 rows = 2048 B further. One group.
  auto issue_pv = [&](int s) {
    fence_regs(acc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint64_t db = make_desc(sV + s * Tile::kKVBytes + kk * 16 * Tile::kRowBytes, Tile::kKVPanelBytes, 1024);
      wgmma_rs<TagT, kHeadDim>(acc, pa[kk], db);
    }
    wgmma_commit();
  };
  // O *= alpha (the previous P.V has completed: its wait_group preceded this).
  auto rescale_o = [&]() {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
      for (int j = 0; j < kHeadDim / 8; ++j) {
        acc[4 * j + 2 * half] *= alpha[half];
        acc[4 * j + 2 * half + 1] *= alpha[half];
      }
    }
  };
  // Mask, online softmax of block i (rows g and g+8 of this warp; quad reduce) with the scale in
  // the exponent's FFMA; sc becomes P (fp32), alpha the rescale O owes, l_run gets it already.
  auto softmax = [&](int i) {
    const int64_t n0 = int64_t(i) * BN;
    const bool need_mask = (n0 + BN > Sk) || (p.causal && n0 + BN - 1 > m0 + diag);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t row = row_g + half * 8;
      const int64_t last_abs = p.causal ? min(row + diag, Sk - 1) : Sk - 1;
      const int last_key = int(max(int64_t(-1), min(int64_t(BN), last_abs - n0)));
      float mx = -CUDART_INF_F;  // max of the raw scores
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float x = sc[4 * j + 2 * half + e];
          if (need_mask && (8 * j + 2 * t + e) > last_key) x = -CUDART_INF_F;
          sc[4 * j + 2 * half + e] = x;
          mx = fmaxf(mx, x);
        }
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[half], mx * scale_log2);
      const float m_use = m_new == -CUDART_INF_F ? 0.f : m_new;
      alpha[half] = fast_exp2(m_run[half] - m_use);
      m_run[half] = m_new;
      const float neg_m = -m_use;
      float rs = 0.f;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pe = fast_exp2(fmaf(sc[4 * j + 2 * half + e], scale_log2, neg_m));
          sc[4 * j + 2 * half + e] = pe;
          rs += pe;
        }
      }
      l_run[half] = l_run[half] * alpha[half] + rs;
    }
  };
  auto fence_stats = [&]() {
    asm volatile("" : "+f"(m_run[0]), "+f"(m_run[1]), "+f"(l_run[0]), "+f"(l_run[1]), "+f"(alpha[0]),
                 "+f"(alpha[1])::"memory");
  };
  // P (fp32) -> T pairs in the A-fragment order of wgmma m64k16 (= mma.m16n8k16's A).
  auto pack_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      pa[kk][0] = pack2<T>(sc[8 * kk + 0], sc[8 * kk + 1]);  // row g,   keys 16kk + 2t..
      pa[kk][1] = pack2<T>(sc[8 * kk + 2], sc[8 * kk + 3]);  // row g+8, keys 16kk + 2t..
      pa[kk][2] = pack2<T>(sc[8 * kk + 4], sc[8 * kk + 5]);  // row g,   keys 16kk + 8 + 2t..
      pa[kk][3] = pack2<T>(sc[8 * kk + 6], sc[8 * kk + 7]);  // row g+8, keys 16kk + 8 + 2t..
    }
  };
  // For the front end: P's registers stay unchanged until the P.V reading them has been waited
  // for (an empty asm emits no PTX; ptxas tracks the wgmma's register reads itself and reports
  // C7514 "wgmma serialized" when code touches them early: cuda_check.py -v shows none).
  auto fence_pa = [&]() {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
      for (int r = 0; r < 4; ++r) asm volatile("" : "+r"(pa[kk][r])::"memory");
  };

  if (n_blocks > 0) {
    if (cw == 1) sched_arrive();  // warpgroup 0 takes the first turn
    // prologue: block 0
    mbar_wait(full_k(0), 0);
    __syncwarp();
    sched_sync();
    issue_s(0);
    if (!(cw == 1 && n_blocks == 1)) sched_arrive();  // warpgroup 1's last section: no arrive
    wgmma_wait<0>();
    fence_regs(sc);
    if (lane == 0) mbar_arrive(empty_k(0));
    softmax(0);
    pack_p();
    for (int i = 1; i < n_blocks; ++i) {
      const int s = i % S, sp = (i - 1) % S;
      mbar_wait(full_k(s), (i / S) & 1);
      __syncwarp();
      sched_sync();
      issue_s(s);                                  // group A: S_i
      rescale_o();                                 // O *= alpha_{i-1} while the tensor cores do S_i
      mbar_wait(full_v(sp), ((i - 1) / S) & 1);
      __syncwarp();
      issue_pv(sp);                                // group B: O += P_{i-1} V_{i-1}
      if (!(cw == 1 && i == n_blocks - 1)) sched_arrive();
      wgmma_wait<1>();                             // A done (B may still run)
      fence_regs(sc);
      if (lane == 0) mbar_arrive(empty_k(s));      // K_i consumed
      softmax(i);                                  // overlaps P_{i-1} V_{i-1}
      fence_regs(sc);                              // the softmax's results exist before the wait
      fence_stats();
      // Scheduling anchor. ptxas keeps WARPGROUP.DEPBAR in order with SYNCS (mbarrier)
      // instructions but moves it freely across arithmetic: without this line it hoisted the
      // wait below (B done) above the whole softmax (seen in the SASS: DEPBAR.LE gsb0, 0x0 right
      // after the K release, every MUFU.EX2 after it), which serializes softmax and P.V. A
      // predicated mbarrier arrive that reads the softmax's l keeps the wait after the softmax.
      // It never runs (l >= 0 or NaN), and would be harmless: nobody waits on bar_q again, and
      // every consumer warp passed its bar_q wait before any leaves its first sched_sync.
      if (l_run[0] + l_run[1] < 0.f) mbar_arrive(bar_q);
      wgmma_wait<0>();                             // B done
      fence_regs(acc);
      fence_pa();
      if (lane == 0) mbar_arrive(empty_v(sp));     // V_{i-1} consumed
      pack_p();                                    // P_i to T: the registers B has just read
    }
    // tail: O *= alpha_{n-1}; O += P_{n-1} V_{n-1}
    const int last = n_blocks - 1;
    rescale_o();
    mbar_wait(full_v(last % S), (last / S) & 1);
    __syncwarp();
    issue_pv(last % S);
    wgmma_wait<0>();
    fence_regs(acc);
    fence_pa();
    if (lane == 0) mbar_arrive(empty_v(last % S));  // no load waits for it; keeps the phases whole
  }

  // 5. Epilogue: o = acc / l and lse (natural log) with flash_fwd.cuh's rule (flash_finish_row:
  //    rows that see no key get 0 and -inf). o is staged in this consumer's own 64 Q rows of
  //    shared memory (same 128B swizzle: chunk c of row r at c ^ (r % 8), so a quad's 4-byte
  //    writes hit 32 distinct banks) and leaves as 16-byte stores of whole row chunks. A named
  //    barrier of the warpgroup first: no warp overwrites Q rows a wgmma of its group may read.
  T* gO = static_cast<T*>(p.o) + int64_t(b) * p.o_batch_stride + int64_t(h) * p.o_head_stride;
  asm volatile("bar.sync %0, 128;\n" ::"r"(Tile::kEpilogueBar + cw) : "memory");
  // shared address of (local row lr of this consumer, column col multiple of 8)
  auto q_chunk = [&](int lr, int col) -> uint32_t {
    return q_rows + (col / Tile::kPanel) * Tile::kQPanelBytes + lr * Tile::kRowBytes +
           ((((col % Tile::kPanel) / 8) ^ (lr % 8)) * 16);
  };
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float l = l_run[half];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int64_t row = row_g + half * 8;
    if (row >= Sq) continue;
    const FlashKeyRange kr = flash_key_range(p, row, Sq, Sk);
    const FlashRowFinish f = flash_finish_row(m_run[half], l, kr.lo <= kr.hi);
    if (p.lse != nullptr && t == 0)
      p.lse[int64_t(b) * p.lse_batch_stride + int64_t(h) * p.lse_head_stride + row * p.lse_row_stride] = f.lse;
    const int lr = warp * 16 + g + half * 8;
#pragma unroll
    for (int j = 0; j < kHeadDim / 8; ++j) {
      const uint32_t v = pack2<T>(l > 0.f ? acc[4 * j + 2 * half] * f.inv : f.inv,
                                  l > 0.f ? acc[4 * j + 2 * half + 1] * f.inv : f.inv);
      asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(q_chunk(lr, 8 * j) + 4 * t), "r"(v) : "memory");
    }
  }
  __syncwarp();
  // this warp's 16 rows x D/8 chunks; o strides are multiples of 8 elements and o is 16-byte
  // aligned (the binding copies otherwise)
#pragma unroll
  for (int i = 0; i < 16 * (kHeadDim / 8) / 32; ++i) {
    const int c = lane + i * 32;
    const int lr = warp * 16 + c / (kHeadDim / 8);
    const int col = (c % (kHeadDim / 8)) * 8;
    const int64_t row = m0 + cw * Tile::kWgRows + lr;
    if (row < Sq) {
      uint4 v;
      asm volatile("ld.shared.v4.b32 {%0,%1,%2,%3}, [%4];\n"
                   : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                   : "r"(q_chunk(lr, col))
                   : "memory");
      // explicit v4 store: NVVM split the plain uint4 store into 4 x st.global.u32 here
      asm volatile("st.global.v4.b32 [%0], {%1,%2,%3,%4};\n" ::"l"(gO + row * p.o_row_stride + col), "r"(v.x),
                   "r"(v.y), "r"(v.z), "r"(v.w)
                   : "memory");
    }
  }
}

}  // namespace hires::attention::sm90
