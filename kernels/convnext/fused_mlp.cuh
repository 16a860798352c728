// Fused ConvNeXt MLP (the pointwise half of a block) for C <= 384: fc1 -> erf-GELU -> fc2 ->
// layer scale -> residual in ONE kernel; the 4C-wide hidden never leaves the SM.
//
//   S[m, h]   = sum_k x[m, k] * W1[h, k]                                 (fp32, mma.sync)
//   H[m, h]   = round_T(GELU_erf(S[m, h] + b1[h]))                       (the ONE rounding)
//   out[m, n] = round_T(res[m, n] + gamma[n] * (sum_h H[m, h] * W2[n, h] + b2[n]))
//
// The rounding of H to T is the one the unfused path makes when the fc1 GEMM stores its output
// (pointwise_gemm.cuh fc1: round_T(GELU(acc + b1)) to HBM, re-read by fc2): the fused result is
// the unfused one up to fp32 summation order. GELU_erf(v) = 0.5 v (1 + erf(v / sqrt 2)) in fp32
// (the formula of cutlass::epilogue::thread::GELU<float> and of torch's exact GELU).
//
// Shapes: x, res, out (M, C) row-major T (pixels of an NHWC map); W1 (F, C), W2 (C, F) row-major
//   (nn.Linear (out, in)); b1 (F,), b2, gamma (C,) or null (0 / 0 / 1). T = half or bfloat16.
// Limits: C in kFusedMlpWidths = {96, 128, 192, 256, 384} (one instantiation each: the warp tiles
//   below need C / kWN2 % 16 == 0), F % BH == 0, 16-byte aligned x/W1/W2/res/out, 4-byte aligned
//   vectors; any M (the last block's rows past M are zero-filled and never stored).
//
// ---- Ownership --------------------------------------------------------------------------------
// A block (8 warps) owns BM pixel rows for the whole MLP and walks the hidden dimension in
// chunks of BH columns. Per chunk j:
//   GEMM 1  S (BM x BH) = X (BM x C, resident in smem) . W1[jBH:(j+1)BH, :]^T
//           warps 4 (rows) x 2 (cols); warp tile (BM/4) x (BH/2); K = C in k16 steps.
//   epilogue + b1, erf-GELU in fp32, round to T, store the warp's tile of H to smem (sH).
//   GEMM 2  O (BM x C, fp32 registers, all chunks) += H (BM x BH, sH) . W2[:, jBH:(j+1)BH]^T
//           warps (BM/32) x (8 / (BM/32)); warp tile 32 x C/kWN2; K = BH.
// H goes through shared memory (not kept in registers as FlashAttention keeps P) because GEMM 2
// splits the output columns across warps: every warp needs all BH columns of its 32 rows of H,
// which 2 (or 4) warps computed. The sH round trip is 1 STS.32 per 2 elements and the LDSM that
// GEMM 2 would do anyway for its A operand.
// W1 and W2 chunks stream through one ring of kStages slots as the tile sequence
// W1c0, W2c0, W1c1, W2c1, ... (both chunks are BH x C elements), loaded by cp.async 16 B
// (.cg: no L1 allocation; every block re-reads the weights from L2).
// One __syncthreads per tile: before tile t is read, (a) its cp.async group has landed for every
// thread, (b) every warp is done with tile t-1, whose slot is then refilled with tile t+kStages-1,
// (c) for a W2 tile, all of sH was written (by the W1 tile before it), and for a W1 tile, nobody
// still reads sH (the W2 tile before it). So sH needs one buffer and there is no other barrier.
//
// ---- Sizing (smem <= 163 KiB/block on sm_80; 8 warps; kStages = 3) ---------------------------
// Row strides are padded by one 16-byte chunk (C + 8, BH + 8 elements): an odd number of 16-byte
// chunks per row puts the 8 row addresses of an ldmatrix phase on 8 distinct bank groups
// (C % 16 == 0 makes (C + 8) / 8 odd). fp32 staging of the output row stride C + 8 = 8 mod 32
// words: the float2 stores of a half-warp (rows g..g+3, cols 2t) hit 32 distinct banks.
//   C    BM   BH  |  X tile   W slot  x3    sH    | smem B   | O regs/thr | MMA : LDSM.x4 per warp-chunk
//   96   128  64  |  26624    13824         18432 |  86528   |   48       |  96 : 44 (2.2)
//   128  128  64  |  34816    18432         18432 | 108544   |   64       | 128 : 56 (2.3)
//   192  128  64  |  51200    27648         18432 | 152576   |   96       | 192 : 80 (2.4)
//   256   64  64  |  33792    36864          9216 | 153600   |   64       | 128 : 72 (1.8)
//   384   64  32  |  50176    30720          5120 | 147456   |   96       |  96 : 64 (1.5)
// Registers: the output accumulator BM x C fp32 over 256 threads = BM*C/256 per thread (<= 96);
// plus S (GEMM 1 warp tile / 32 = 32, 16 or 8), A fragments 8, B 4, addresses, within the 255
// that __launch_bounds__(256, 1) allows. ptxas (nvcc 13.2): 186-242 registers on sm_80 (C = 192:
// 242; 96: 186-188), 180-241 on sm_90a, no spills, no stack: the fully unrolled k loop of GEMM 1
// lets ptxas load fragments of later k steps early, which takes the rest. BM = 128 for C = 256/384 would need 128-192
// accumulator registers per thread: those widths take BM = 64 (and BH = 32 at C = 384 to fit
// three stages). 1 block (8 warps) per SM on sm_80; latency is hidden by the 3-stage pipeline.
// MMA : LDSM: GEMM 1 per k16 step loads kMT1 A + kNP1 B x4 fragments for 2*kMT1*kNP1 MMAs
// (32 x 32 warp tile: 4 LDSM, 8 MMA); GEMM 2 2 + C/kWN2/16 for 4*C/kWN2/16 (C = 192: 8, 24).
// An A100 SM does one m16n8k16 in ~2 cycles and one LDSM.x4 (512 B) in ~4: break-even ~2 MMA
// per LDSM; C <= 192 is above it, C = 256/384 below (smem-bound, see "Not done").
//
// ---- Traffic -----------------------------------------------------------------------------------
// HBM saved per pixel: the hidden written and re-read, 2 * 4C * 2 B = 16C B (C = 192: 3072 B).
// L2 -> SM added per pixel: each block re-reads W1 and W2, 16 C^2 B per BM pixels = 16 C^2 / BM
// (C = 192: 4608 B, 1.5x the HBM bytes saved; C = 96: 0.75x; C = 384: 6x). At ConvLLaVA-1536
// stage 1 (384 x 384 px, C = 192): 453 MB of HBM traffic removed, 679 MB of L2 reads added (L2
// bandwidth is 2-3x HBM's), 87 GFLOP: 128 FLOP per byte of weight read, against ~60-180 FLOP/B
// of L2 bandwidth on A100/H100 for dense tensor math. Whether C = 256/384 (4-6x) win is for a
// GPU to measure.
//
// ---- erf-GELU and the MMAs -------------------------------------------------------------------
// The epilogue is ~25 instructions per element (SASS, C = 192: per element 8 FSEL, 7 FFMA,
// 4 FMUL, 3 FADD, 1 FSETP, 1 MUFU.EX2, 1/2 F2FP), BH*BM/256 = 32 elements per thread per chunk
// (C <= 192): ~780 of the 1323 instructions of a warp's chunk iteration, next to 192 HMMA and
// 80 LDSM. On A100 (one m16n8k16 per ~8 cycles per sub-partition) 2 warps x 192 HMMA = 3072
// tensor cycles against 2 x 1323 issue slots: tensor-bound if the issue overlaps. On H100 the
// mma.sync rate doubles and the same loop is issue-bound (~1.7x more issue than tensor cycles).
// They overlap across warps: 2 warps share each SM sub-partition, and the scheduler issues one
// warp's FP32 epilogue while the other's HMMAs occupy the tensor pipe; the per-tile barrier keeps
// the warps within one tile of each other, so the overlap is partial. Not done: FA3-style
// in-warp overlap (the GELU of chunk j+1 interleaved with GEMM 2 of chunk j, which needs a
// double-buffered sH and an XOR swizzle to fit in 163 KiB).
//
// ---- Final epilogue ------------------------------------------------------------------------------
// After the loop (all cp.async drained, barrier) the smem is reused as an fp32 BM x (C + 8)
// staging tile: each thread writes (O + b2) * gamma of its fragments (float2), barrier, then each
// thread takes 8 consecutive channels of a row: two LDS.128, one 16-byte residual load, the sum
// in fp32 and one 16-byte store of T (st.global.v4). No extra rounding: the staging is fp32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels/common/numeric.cuh"
#include "kernels/common/ptx_sm80.cuh"
#include "kernels/convnext/fused_mlp.h"

namespace hires::convnext {

template <int C_>
struct FusedMlpTile {
  static constexpr int kC = C_;
  static constexpr int kBM = fused_mlp_bm(C_);  // pixel rows per block
  static constexpr int kBH = fused_mlp_bh(C_);  // hidden columns per chunk
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kStages = 3;             // weight tiles in flight (ring slots)
  // GEMM 1: S (kBM x kBH), warps kWM1 x kWN1.
  static constexpr int kWM1 = 4, kWN1 = 2;
  static constexpr int kMT1 = kBM / kWM1 / 16;  // m16 tiles per warp
  static constexpr int kNP1 = kBH / kWN1 / 16;  // n16 pairs (one B ldmatrix.x4 = 2 n8 tiles)
  // GEMM 2: O (kBM x kC), 32-row warp tiles, warps kWM2 x kWN2.
  static constexpr int kWM2 = kBM / 32, kWN2 = kWarps / kWM2;
  static constexpr int kMT2 = 2;
  static constexpr int kNP2 = kC / kWN2 / 16;
  // Shared-memory row strides in elements (padding: header, "Sizing").
  static constexpr int kLdX = kC + 8;   // X [kBM][kLdX]; a W1 chunk [kBH][kLdX]
  static constexpr int kLdH = kBH + 8;  // sH [kBM][kLdH]; a W2 chunk [kC][kLdH]
  static constexpr int kLdO = kC + 8;   // fp32 output staging [kBM][kLdO]
  static constexpr int kXElems = kBM * kLdX;
  static constexpr int kW1Elems = kBH * kLdX;
  static constexpr int kW2Elems = kC * kLdH;
  static constexpr int kSlotElems = kW1Elems > kW2Elems ? kW1Elems : kW2Elems;
  static constexpr int kHElems = kBM * kLdH;
  static constexpr int kSmemBytes = 2 * (kXElems + kStages * kSlotElems + kHElems);
  static constexpr int kSmemLimit = 166912;     // sm_80 opt-in maximum per block (163 KiB)
  // 16-byte copies per tile, all multiples of the block size (no tail in the copy loops).
  static constexpr int kXCopies = kBM * kC / 8;
  static constexpr int kW1Copies = kBH * kC / 8;
  static constexpr int kW2Copies = kC * kBH / 8;
  static constexpr int kOutChunks = kBM * kC / 8;

  static_assert(kC % 16 == 0 && kBH % 16 == 0, "k16 steps of mma.m16n8k16");
  static_assert(kMT1 >= 1 && kBM == kWM1 * kMT1 * 16, "GEMM 1 rows split over kWM1 warps in m16 tiles");
  static_assert(kNP1 >= 1 && kBH == kWN1 * kNP1 * 16, "GEMM 1 cols split over kWN1 warps in n16 pairs");
  static_assert(kWM2 * kWN2 == kWarps && kBM == kWM2 * kMT2 * 16, "GEMM 2 rows: 32 per warp");
  static_assert(kNP2 >= 1 && kC == kWN2 * kNP2 * 16, "GEMM 2 cols split over kWN2 warps in n16 pairs");
  static_assert(kWM1 * kWN1 == kWarps, "GEMM 1 warp grid");
  static_assert(((kLdX / 8) & 1) == 1 && ((kLdH / 8) & 1) == 1,
                "odd 16-byte chunks per smem row: conflict-free ldmatrix phases");
  static_assert(kLdO % 32 == 8, "fp32 staging: float2 stores of a half-warp on distinct banks");
  static_assert(kSmemBytes <= kSmemLimit, "shared memory per block (sm_80 opt-in limit)");
  static_assert(kBM * kLdO * 4 <= kSmemBytes, "fp32 output staging fits in the (reused) smem");
  static_assert(kXCopies % kThreads == 0 && kW1Copies % kThreads == 0 &&
                kW2Copies % kThreads == 0 && kOutChunks % kThreads == 0,
                "copy loops without tails");
  static_assert(kMT2 * 2 * kNP2 * 4 <= 96, "output accumulator <= 96 fp32 registers per thread");
};

namespace fused_mlp_detail {

using hires::ptx::ldsm_x4;   // kernels/common/ptx_sm80.cuh
using hires::ptx::mma16816;
using hires::ptx::smem_u32;

// 16-byte cp.async, L2 -> smem, bypassing L1; src_bytes = 0 zero-fills (rows past M). Unlike the
// common wrappers these carry "memory" clobbers (the kernel was compiled and checked with them).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Two consecutive T (4-byte aligned) -> float2; a null vector reads as `dflt`.
template <typename T>
__device__ __forceinline__ float2 load_pair(const T* p, int64_t i, float dflt) {
  if (p == nullptr) return make_float2(dflt, dflt);
  const uint32_t u = __ldg(reinterpret_cast<const unsigned int*>(p + i));
  if constexpr (std::is_same_v<T, __half>) {
    return __half22float2(*reinterpret_cast<const __half2*>(&u));
  } else {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u));
  }
}

__device__ __forceinline__ float gelu_erf(float v) {
  return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
}

}  // namespace fused_mlp_detail

template <typename T, int C>
__global__ void __launch_bounds__(FusedMlpTile<C>::kThreads, 1) fused_mlp_kernel(FusedMlpParams p) {
  using Tile = FusedMlpTile<C>;
  using namespace fused_mlp_detail;
  constexpr int BM = Tile::kBM, BH = Tile::kBH, S = Tile::kStages;
  constexpr int LdX = Tile::kLdX, LdH = Tile::kLdH, LdO = Tile::kLdO;

  extern __shared__ __align__(16) unsigned char smem[];
  T* sX = reinterpret_cast<T*>(smem);
  T* sW = sX + Tile::kXElems;           // S slots of kSlotElems
  T* sH = sW + S * Tile::kSlotElems;
  float* sO = reinterpret_cast<float*>(smem);  // after the main loop only

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w1 = static_cast<const T*>(p.w1);
  const T* __restrict__ w2 = static_cast<const T*>(p.w2);
  const T* b1 = static_cast<const T*>(p.b1);
  const T* b2 = static_cast<const T*>(p.b2);
  const T* gamma = static_cast<const T*>(p.gamma);
  const T* __restrict__ res = static_cast<const T*>(p.residual);
  T* __restrict__ out = static_cast<T*>(p.out);
  const int64_t M = p.M, F = p.F;
  const int64_t m0 = int64_t(blockIdx.x) * BM;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;  // mma fragment row group / column pair
  const int ntiles = int(F / BH) * 2;     // W1c0, W2c0, W1c1, W2c1, ...

  // ---- loads (cp.async, 16 B per copy) ----
  auto load_x = [&]() {
    constexpr int kCpr = C / 8;  // 16-byte chunks per row
#pragma unroll
    for (int it = 0; it < Tile::kXCopies / Tile::kThreads; ++it) {
      const int i = it * Tile::kThreads + tid, r = i / kCpr, c = (i % kCpr) * 8;
      const bool in = m0 + r < M;
      // a row past M is zero-filled from a valid address (row m0, always < M)
      cp_async16(sX + r * LdX + c, x + (in ? m0 + r : m0) * C + c, in ? 16 : 0);
    }
  };
  auto load_tile = [&](int t) {  // tile t -> slot t % S
    T* dst = sW + (t % S) * Tile::kSlotElems;
    const int64_t h0 = int64_t(t / 2) * BH;
    if ((t & 1) == 0) {  // W1[h0 : h0+BH, :] -> [BH][LdX]
      constexpr int kCpr = C / 8;
#pragma unroll
      for (int it = 0; it < Tile::kW1Copies / Tile::kThreads; ++it) {
        const int i = it * Tile::kThreads + tid, r = i / kCpr, c = (i % kCpr) * 8;
        cp_async16(dst + r * LdX + c, w1 + (h0 + r) * C + c, 16);
      }
    } else {  // W2[:, h0 : h0+BH] -> [C][LdH]
      constexpr int kCpr = BH / 8;
#pragma unroll
      for (int it = 0; it < Tile::kW2Copies / Tile::kThreads; ++it) {
        const int i = it * Tile::kThreads + tid, r = i / kCpr, c = (i % kCpr) * 8;
        cp_async16(dst + r * LdH + c, w2 + int64_t(r) * F + h0 + c, 16);
      }
    }
  };
  // Start of tile t: wait for its group, barrier (header, "Ownership"), prefetch t + S - 1.
  // Group accounting: before tile t, (S - 1) + t groups are committed (group i holds tile i, group
  // 0 also X); wait_group(S - 2) leaves at most the S - 2 newest pending, so group t has landed.
  // Empty groups are committed past the last tile to keep the count.
  auto begin_tile = [&](int t) {
    cp_async_wait<S - 2>();
    __syncthreads();
    if (t + S - 1 < ntiles) load_tile(t + S - 1);
    cp_async_commit();
  };

  // ---- prologue: X and tiles 0 .. S-2 ----
  load_x();
  load_tile(0);
  cp_async_commit();
#pragma unroll
  for (int s = 1; s < S - 1; ++s) {
    if (s < ntiles) load_tile(s);
    cp_async_commit();
  }

  // warp coordinates of the two GEMMs
  const int r1 = (warp / Tile::kWN1) * (Tile::kMT1 * 16);  // GEMM 1 warp tile: rows
  const int c1 = (warp % Tile::kWN1) * (Tile::kNP1 * 16);  //                   hidden cols
  const int r2 = (warp / Tile::kWN2) * (Tile::kMT2 * 16);  // GEMM 2 warp tile: rows
  const int c2 = (warp % Tile::kWN2) * (Tile::kNP2 * 16);  //                   output cols
  // ldmatrix lane offsets: A (row-major, k contiguous): rows lane%16, k half lane/16;
  // B (stored n x k, k contiguous), two n8 tiles: n = lane%8 + 8*(lane/16), k half (lane/8)%2.
  const int a_row = lane % 16, a_col = (lane / 16) * 8;
  const int b_row = lane % 8 + ((lane / 8) >> 1) * 8, b_col = ((lane / 8) & 1) * 8;

  float acc[Tile::kMT2][2 * Tile::kNP2][4];
#pragma unroll
  for (int i = 0; i < Tile::kMT2; ++i)
#pragma unroll
    for (int j = 0; j < 2 * Tile::kNP2; ++j)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[i][j][k] = 0.f;

  for (int t = 0; t < ntiles; t += 2) {
    // ---- GEMM 1 on tile t (W1 chunk): S = X . W1c^T ----
    begin_tile(t);
    const int64_t h0 = int64_t(t / 2) * BH;
    float2 bias1[2 * Tile::kNP1];  // issued before the MMAs: the loads' latency hides behind them
#pragma unroll
    for (int nt = 0; nt < 2 * Tile::kNP1; ++nt) bias1[nt] = load_pair(b1, h0 + c1 + nt * 8 + 2 * t4, 0.f);
    {
      const T* sW1 = sW + (t % S) * Tile::kSlotElems;
      float s[Tile::kMT1][2 * Tile::kNP1][4];
#pragma unroll
      for (int i = 0; i < Tile::kMT1; ++i)
#pragma unroll
        for (int j = 0; j < 2 * Tile::kNP1; ++j)
#pragma unroll
          for (int k = 0; k < 4; ++k) s[i][j][k] = 0.f;
#pragma unroll  // C/16 <= 24 steps: full unroll lets ptxas issue the next step's LDSM under the MMAs
      for (int kk = 0; kk < C; kk += 16) {
        uint32_t a[Tile::kMT1][4];
#pragma unroll
        for (int mt = 0; mt < Tile::kMT1; ++mt) ldsm_x4(a[mt], sX + (r1 + mt * 16 + a_row) * LdX + kk + a_col);
#pragma unroll
        for (int np = 0; np < Tile::kNP1; ++np) {
          uint32_t b[4];
          ldsm_x4(b, sW1 + (c1 + np * 16 + b_row) * LdX + kk + b_col);
#pragma unroll
          for (int mt = 0; mt < Tile::kMT1; ++mt) {
            mma16816<T>(s[mt][2 * np], a[mt], b[0], b[1]);
            mma16816<T>(s[mt][2 * np + 1], a[mt], b[2], b[3]);
          }
        }
      }
      // epilogue: + b1, erf-GELU (fp32), one rounding to T, to sH as 4-byte stores. Conflict-free:
      // the row stride is LdH/2 words (36 = 4 mod 32 for BH = 64, 20 for BH = 32), so rows g = 0..7
      // and column pairs t4 = 0..3 give 32 distinct banks.
#pragma unroll
      for (int mt = 0; mt < Tile::kMT1; ++mt)
#pragma unroll
        for (int nt = 0; nt < 2 * Tile::kNP1; ++nt)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const float v0 = gelu_erf(s[mt][nt][2 * hf] + bias1[nt].x);
            const float v1 = gelu_erf(s[mt][nt][2 * hf + 1] + bias1[nt].y);
            *reinterpret_cast<uint32_t*>(sH + (r1 + mt * 16 + g + 8 * hf) * LdH + c1 + nt * 8 + 2 * t4) =
                pack2<T>(v0, v1);
          }
    }

    // ---- GEMM 2 on tile t + 1 (W2 chunk): O += H . W2c^T ----
    begin_tile(t + 1);
    {
      const T* sW2 = sW + ((t + 1) % S) * Tile::kSlotElems;
#pragma unroll
      for (int kk = 0; kk < BH; kk += 16) {
        uint32_t a[Tile::kMT2][4];
#pragma unroll
        for (int mt = 0; mt < Tile::kMT2; ++mt) ldsm_x4(a[mt], sH + (r2 + mt * 16 + a_row) * LdH + kk + a_col);
#pragma unroll
        for (int np = 0; np < Tile::kNP2; ++np) {
          uint32_t b[4];
          ldsm_x4(b, sW2 + (c2 + np * 16 + b_row) * LdH + kk + b_col);
#pragma unroll
          for (int mt = 0; mt < Tile::kMT2; ++mt) {
            mma16816<T>(acc[mt][2 * np], a[mt], b[0], b[1]);
            mma16816<T>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
          }
        }
      }
    }
  }

  // ---- final epilogue: (O + b2) * gamma staged as fp32 in smem, then + res, 16-byte stores ----
  cp_async_wait<0>();  // only empty groups can be pending; drained before the smem is reused
  __syncthreads();     // every warp is done with sX / sW / sH
#pragma unroll
  for (int nt = 0; nt < 2 * Tile::kNP2; ++nt) {
    const int n = c2 + nt * 8 + 2 * t4;
    const float2 bb = load_pair(b2, n, 0.f), gg = load_pair(gamma, n, 1.f);
#pragma unroll
    for (int mt = 0; mt < Tile::kMT2; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float2 v;
        v.x = (acc[mt][nt][2 * hf] + bb.x) * gg.x;
        v.y = (acc[mt][nt][2 * hf + 1] + bb.y) * gg.y;
        *reinterpret_cast<float2*>(sO + (r2 + mt * 16 + g + 8 * hf) * LdO + n) = v;
      }
  }
  __syncthreads();
  constexpr int kCpr = C / 8;
#pragma unroll 2
  for (int it = 0; it < Tile::kOutChunks / Tile::kThreads; ++it) {
    const int i = it * Tile::kThreads + tid, r = i / kCpr, c = (i % kCpr) * 8;
    const int64_t m = m0 + r;
    if (m >= M) continue;
    const uint4 rv = __ldg(reinterpret_cast<const uint4*>(res + m * C + c));
    const float4 o0 = *reinterpret_cast<const float4*>(sO + r * LdO + c);
    const float4 o1 = *reinterpret_cast<const float4*>(sO + r * LdO + c + 4);
    const uint32_t rw[4] = {rv.x, rv.y, rv.z, rv.w};
    float rf[8];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      float2 f;
      if constexpr (std::is_same_v<T, __half>) f = __half22float2(*reinterpret_cast<const __half2*>(&rw[k]));
      else f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&rw[k]));
      rf[2 * k] = f.x;
      rf[2 * k + 1] = f.y;
    }
    const float v[8] = {rf[0] + o0.x, rf[1] + o0.y, rf[2] + o0.z, rf[3] + o0.w,
                        rf[4] + o1.x, rf[5] + o1.y, rf[6] + o1.z, rf[7] + o1.w};
    store_pack<T, 8>(out + m * C + c, v);
  }
}

}  // namespace hires::convnext
