// Fused CPU prefill attention (AVX-512; bf16 on AMX); see attention_prefill.h.
//
// FlashAttention-2's forward on the CPU, fp32 / fp16 (and bf16 without AMX) in fp32:
//   1. Pack, per (batch, kv head): K as K^T blocks of 64 keys ([D][64] fp32, contiguous, keys past
//      Sk zero; 16 x 16 register transposes) and V as fp32 rows padded to Dp = D rounded up to 16
//      (zeros), in column chunks of 64 (each chunk's rows contiguous). fp16 / bf16 are converted
//      here, once. GQA / MQA: the Hq / Hkv query heads of a kv head read the same packed blocks (no
//      copies).
//   2. Per block of kBq = 48 query rows of one q head: the q rows in fp32 times scale, then for
//      each key block that some row sees
//        S = (scale q) K^T   micro-kernel of 6 rows x 64 keys: 24 zmm accumulators, per d one
//                            broadcast q per row and 4 K^T vectors;
//        online softmax      per row, over the keys it sees (masks only in blocks where some row
//                            does not see every key: bottom-right causal / window diagonal, keys
//                            past Sk): m' = max(m, max_j s), alpha = exp(m - m'), p = exp(s - m')
//                            (hidden keys: 0), l = alpha l + sum p (a row that sees no key of the
//                            block: alpha = 1, p = 0);
//        O = alpha O + P V   micro-kernel of 6 rows x 64 columns (24 accumulators), per key one
//                            broadcast p per row and 4 V vectors.
//      Finally o = O / l rounded once to q's dtype, lse = m + log l (natural log).
//   Threads: when the (batch, kv head) pairs split evenly over the threads (or there are >= 4 per
//   thread), one parallel region over them, each pair's K / V packed into the thread's own buffer
//   (still in cache for its g heads' q blocks); otherwise one packing pass into a shared buffer,
//   then (batch, q head, q block) items, the blocks of a head in the order 0, n-1, 1, n-2, ... (a
//   causal call's halves cost the same). A call below 2^19 multiply-adds runs on the calling thread.
//   Every row's arithmetic is the same in both layouts and at any thread count (bitwise).
// bf16 with AMX: the same with both GEMMs on tiles (below, amx_item).
// exp is Cephes' polynomial (about 1 ulp) with 2^n by scalef. A non-finite o or lse (a NaN / inf
// in v, an overflow) makes the call return false: the caller runs the twin, as for the ATen path.
#include "csrc/cpu/attention_prefill.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define HIRES_PREFILL_X86 1
// GCC 12 flags the _mm512_undefined_* inside its own AVX-512 intrinsics (a known false positive)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define HIRES_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#endif

namespace hires::attention {

namespace {
std::atomic<int64_t> g_calls{0};
constexpr int64_t kBq = 48;  // query rows per work item (8 strips of kMr)
constexpr int64_t kBk = 128;  // keys per block (8 panels of 16)
constexpr int kMr = 6;       // rows per micro-kernel strip
constexpr int64_t kMaxD = 512;
// packed floats (K^T + V) above which the call runs ATen's kernel (bounds the kept buffer)
constexpr int64_t kMaxPackFloats = int64_t(1) << 25;
// multiply-adds (QK^T + PV) of a call below which it runs on the calling thread
constexpr int64_t kParallelMinMacs = int64_t(1) << 19;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Packed K / V of n elements: the thread's kept buffer (re-used across calls: no page faults) up
// to 2^22 elements (16 MiB), a buffer of this call above (freed after it: no large memory kept).
template <typename E>
E* pack_buffer(std::vector<E>& kept, std::vector<E>& call, int64_t n) {
  if (n <= (int64_t(1) << 22)) {
    if (kept.size() < size_t(n)) kept.resize(size_t(n));
    return kept.data();
  }
  call.resize(size_t(n));
  return call.data();
}
}  // namespace

int64_t prefill_calls() { return g_calls.load(std::memory_order_relaxed); }

#ifdef HIRES_PREFILL_X86
bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
}

namespace {

HIRES_AVX512 inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u);
}

// the first n (<= 16, by mask m) elements at x as fp32, zeros after
HIRES_AVX512 inline __m512 load16(const float* x, __mmask16 m) { return _mm512_maskz_loadu_ps(m, x); }
HIRES_AVX512 inline __m512 load16(const c10::Half* x, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, x));
}
HIRES_AVX512 inline __m512 load16(const c10::BFloat16* x, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, x)), 16));
}

// x rounded to T (nearest even, as static_cast<T>(float); NaN stays NaN), the lanes of m stored
HIRES_AVX512 inline void store16(float* dst, __m512 x, __mmask16 m) { _mm512_mask_storeu_ps(dst, m, x); }
HIRES_AVX512 inline void store16(c10::Half* dst, __m512 x, __mmask16 m) {
  _mm256_mask_storeu_epi16(dst, m, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
HIRES_AVX512 inline void store16(c10::BFloat16* dst, __m512 x, __mmask16 m) {
  const __m512i b = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_mask_storeu_epi16(dst, m, _mm512_cvtepi32_epi16(r));
}

// exp(x) for finite x <= 0 (about 1 ulp; below -87 a value <= exp(-87) instead of 0, a negligible
// addend next to the row's exp(0) = 1): Cephes' polynomial, 2^n applied by scalef.
HIRES_AVX512 inline __m512 exp16_scalef(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, fx);
}

// the row's keys among panel p's 16 (part: some key of the block is hidden from the row)
HIRES_AVX512 inline __mmask16 visible16(bool part, int p, __m512i lov, __m512i hiv) {
  if (!part) return 0xffff;
  const __m512i idx = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                       _mm512_set1_epi32(16 * p));
  return _mm512_cmpge_epi32_mask(idx, lov) & _mm512_cmple_epi32_mask(idx, hiv);
}

// r[i][j] <- r[j][i] for a 16 x 16 fp32 block in registers
HIRES_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);      // a0 b0 a1 b1 per 128-bit lane
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);  // a2 b2 a3 b3
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + c], lane L: rows 4i..4i+3 at column 4L + c
    const __m512d t0 = _mm512_castps_pd(t[4 * i]), t1 = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d t2 = _mm512_castps_pd(t[4 * i + 2]), t3 = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xdd);
    const __m512 w0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 w1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
    r[c] = _mm512_shuffle_f32x4(v0, w0, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(v0, w0, 0xdd);
    r[12 + c] = _mm512_shuffle_f32x4(v1, w1, 0xdd);
  }
}

// Key block kb (keys 128 kb ..) of one (batch, kv head): K^T into kt (two 64-key halves, each
// [D][64] contiguous; keys past Sk zero) and the block's V rows into vp (column chunks of 64: chunk
// c0 at vp + Sk c0, rows of min(64, Dp - c0) floats; columns past D zero).
// The keys query i sees: [lo, hi] (empty when hi < lo), bottom-right aligned (see PrefillArgs).
inline void row_range(const PrefillArgs& a, int64_t i, int64_t& lo, int64_t& hi) {
  const int64_t c = i + a.Sk - a.Sq;  // the key aligned with query i
  lo = std::max<int64_t>(0, a.window_left >= 0 ? c - a.window_left : 0);
  hi = std::min<int64_t>(a.Sk - 1, a.window_right >= 0 ? c + a.window_right : a.Sk - 1);
}

// (query, key) pairs one head sees
int64_t visible_pairs(const PrefillArgs& a) {
  int64_t pairs = 0;
  for (int64_t i = 0; i < a.Sq; ++i) {
    int64_t lo, hi;
    row_range(a, i, lo, hi);
    pairs += std::max<int64_t>(0, hi - lo + 1);
  }
  return pairs;
}

// An item's rows i0 .. i0 + n - 1: their key ranges, the online softmax's running max (-inf) and
// sum (0), and [J0, J1], the keys any of them sees.
inline void start_rows(const PrefillArgs& a, int64_t i0, int64_t n, int64_t* lo, int64_t* hi, float* m, float* l,
                       int64_t& J0, int64_t& J1) {
  J0 = a.Sk;
  J1 = -1;
  for (int64_t r = 0; r < n; ++r) {
    row_range(a, i0 + r, lo[r], hi[r]);
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.f;
    J0 = std::min(J0, lo[r]);
    J1 = std::max(J1, hi[r]);
  }
}

template <typename T>
HIRES_AVX512 void pack_block(const T* k, int64_t ks, const T* v, int64_t vs, int64_t Sk, int64_t D, int64_t Dp,
                             int64_t kb, float* kt, float* vp) {
  const int64_t j0 = kb * kBk;
  for (int p = 0; p < kBk / 16; ++p) {
    const int64_t jp = j0 + 16 * p;
    const int64_t nk = std::max<int64_t>(0, std::min<int64_t>(16, Sk - jp));
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const int64_t nd = std::min<int64_t>(16, D - d0);
      const __mmask16 dm = tail_mask(nd);
      __m512 r[16];
      for (int jj = 0; jj < 16; ++jj) r[jj] = jj < nk ? load16(k + (jp + jj) * ks + d0, dm) : _mm512_setzero_ps();
      transpose16(r);
      float* sub = kt + (p / 4) * 64 * D + 16 * (p % 4);  // the 64-key half: [D][64]
      for (int64_t dd = 0; dd < nd; ++dd) _mm512_storeu_ps(sub + (d0 + dd) * 64, r[dd]);
    }
  }
  const int64_t j1 = std::min(Sk, j0 + kBk);
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t d0 = 0; d0 < Dp; d0 += 16)
      _mm512_storeu_ps(vp + Sk * (d0 / 64 * 64) + j * std::min<int64_t>(64, Dp - d0 / 64 * 64) + d0 % 64,
                       load16(v + j * vs + d0, tail_mask(D - d0)));
}

// s[r][0 : 16 NP] = q_r . K^T[:, 0 : 16 NP] for MR rows (q rows fp32, ld D; kt: [D][64]; s: ld kBk)
template <int MR, int NP>
HIRES_AVX512 void qk_tile(const float* q, int64_t D, const float* kt, float* s) {
  __m512 c[MR][NP];
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < NP; ++p) c[r][p] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m512 kv[NP];
    for (int p = 0; p < NP; ++p) kv[p] = _mm512_loadu_ps(kt + d * 64 + 16 * p);
    for (int r = 0; r < MR; ++r) {
      const __m512 qb = _mm512_set1_ps(q[r * D + d]);
      for (int p = 0; p < NP; ++p) c[r][p] = _mm512_fmadd_ps(qb, kv[p], c[r][p]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < NP; ++p) _mm512_storeu_ps(s + r * kBk + 16 * p, c[r][p]);
}

// o[r][0 : 16 NV] = alpha_r o[r][...] + sum_{j < nk} p[r][j] v[j][...] for MR rows (p: ld kBk;
// v: ld ldv; o: ld ldo)
template <int MR, int NV>
HIRES_AVX512 void pv_tile(const float* p, const float* v, int64_t ldv, int64_t nk, float* o, int64_t ldo,
                          const float* alpha) {
  __m512 c[MR][NV];
  for (int r = 0; r < MR; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int x = 0; x < NV; ++x) c[r][x] = _mm512_mul_ps(_mm512_loadu_ps(o + r * ldo + 16 * x), a);
  }
  for (int64_t j = 0; j < nk; ++j) {
    __m512 vv[NV];
    for (int x = 0; x < NV; ++x) vv[x] = _mm512_loadu_ps(v + j * ldv + 16 * x);
    for (int r = 0; r < MR; ++r) {
      const __m512 pb = _mm512_set1_ps(p[r * kBk + j]);
      for (int x = 0; x < NV; ++x) c[r][x] = _mm512_fmadd_ps(pb, vv[x], c[r][x]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int x = 0; x < NV; ++x) _mm512_storeu_ps(o + r * ldo + 16 * x, c[r][x]);
}

using QkFn = void (*)(const float*, int64_t, const float*, float*);
using PvFn = void (*)(const float*, const float*, int64_t, int64_t, float*, int64_t, const float*);
#define HIRES_ROW4(F, R) {F<R, 1>, F<R, 2>, F<R, 3>, F<R, 4>}
const QkFn kQk[kMr][4] = {HIRES_ROW4(qk_tile, 1), HIRES_ROW4(qk_tile, 2), HIRES_ROW4(qk_tile, 3),
                          HIRES_ROW4(qk_tile, 4), HIRES_ROW4(qk_tile, 5), HIRES_ROW4(qk_tile, 6)};
const PvFn kPv[kMr][4] = {HIRES_ROW4(pv_tile, 1), HIRES_ROW4(pv_tile, 2), HIRES_ROW4(pv_tile, 3),
                          HIRES_ROW4(pv_tile, 4), HIRES_ROW4(pv_tile, 5), HIRES_ROW4(pv_tile, 6)};
#undef HIRES_ROW4

HIRES_AVX512 inline float hmax16(__m512 x) { return _mm512_reduce_max_ps(x); }
HIRES_AVX512 inline float hsum16(__m512 x) { return _mm512_reduce_add_ps(x); }

// One work item: rows i0 .. i0 + n - 1 (n <= kBq) of query head h of batch element b, against the
// packed K^T (kt) / V (vp) of its kv head. ws: kBq (D + kBk + Dp) floats. Returns false when an
// output is not finite.
template <typename T>
HIRES_AVX512 bool prefill_item(const PrefillArgs& a, const float* kt, const float* vp, int64_t b, int64_t h,
                               int64_t i0, int64_t n, float* ws) {
  const int64_t D = a.D, Dp = round_up(D, 16), Sk = a.Sk, Sq = a.Sq;
  float* qf = ws;              // (kBq, D) scale * q
  float* s = qf + kBq * D;     // (kBq, kBk) scores, then p
  float* acc = s + kBq * kBk;  // (kBq, Dp) unnormalised O
  float m[kBq], l[kBq], alpha[kBq];
  int64_t lo[kBq], hi[kBq];
  const T* q = static_cast<const T*>(a.q) + b * a.q_s[0] + h * a.q_s[2];
  const __m512 sv = _mm512_set1_ps(static_cast<float>(a.scale));
  for (int64_t r = 0; r < n; ++r) {
    const T* qr = q + (i0 + r) * a.q_s[1];
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const __mmask16 dm = tail_mask(D - d0);
      _mm512_mask_storeu_ps(qf + r * D + d0, dm, _mm512_mul_ps(load16(qr + d0, dm), sv));
    }
  }
  std::memset(acc, 0, sizeof(float) * size_t(n * Dp));
  int64_t J0, J1;
  start_rows(a, i0, n, lo, hi, m, l, J0, J1);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j0 = J0 / kBk * kBk; j0 <= J1; j0 += kBk) {
    const int np = int(std::min<int64_t>(kBk, J1 + 1 - j0) + 15) / 16;  // panels holding keys <= J1
    const int64_t jend = j0 + 16 * np;
    const float* ktb = kt + j0 * D;  // block j0 / kBk: two [D][64] halves
    for (int64_t r0 = 0; r0 < n; r0 += kMr)
      for (int half = 0; 4 * half < np; ++half)  // 64 keys (4 panels) per micro-kernel call
        kQk[std::min<int64_t>(kMr, n - r0) - 1][std::min(4, np - 4 * half) - 1](
            qf + r0 * D, D, ktb + 64 * D * half, s + r0 * kBk + 64 * half);
    for (int64_t r = 0; r < n; ++r) {
      float* sr = s + r * kBk;
      const bool part = lo[r] > j0 || hi[r] < jend - 1;  // some key of the block hidden from this row
      const __m512i lov = _mm512_set1_epi32(int(std::max<int64_t>(lo[r] - j0, -1)));
      const __m512i hiv = _mm512_set1_epi32(int(std::min<int64_t>(hi[r] - j0, kBk)));
      __m512 mx = ninf;
      for (int p = 0; p < np; ++p)
        mx = _mm512_mask_max_ps(mx, visible16(part, p, lov, hiv), mx, _mm512_loadu_ps(sr + 16 * p));
      const float bm = hmax16(mx);
      if (bm == -std::numeric_limits<float>::infinity()) {  // the row sees no key of this block
        alpha[r] = 1.f;
        std::memset(sr, 0, sizeof(float) * size_t(16 * np));
        continue;
      }
      const float mn = std::max(m[r], bm);
      alpha[r] = m[r] == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(m[r] - mn);
      m[r] = mn;
      const __m512 mv = _mm512_set1_ps(mn);
      __m512 sum = _mm512_setzero_ps();
      for (int p = 0; p < np; ++p) {  // hidden keys: p = 0
        const __m512 e = _mm512_maskz_mov_ps(visible16(part, p, lov, hiv),
                                             exp16_scalef(_mm512_sub_ps(_mm512_loadu_ps(sr + 16 * p), mv)));
        _mm512_storeu_ps(sr + 16 * p, e);
        sum = _mm512_add_ps(sum, e);
      }
      l[r] = l[r] * alpha[r] + hsum16(sum);
    }
    const int64_t nk = std::min(jend, Sk) - j0;  // real keys of the block (V rows)
    for (int64_t r0 = 0; r0 < n; r0 += kMr) {
      const int64_t mr = std::min<int64_t>(kMr, n - r0);
      for (int64_t c0 = 0; c0 < Dp; c0 += 64) {
        const int64_t cw = std::min<int64_t>(64, Dp - c0);  // the column chunk's width
        kPv[mr - 1][cw / 16 - 1](s + r0 * kBk, vp + Sk * c0 + j0 * cw, cw, nk, acc + r0 * Dp + c0, Dp, alpha + r0);
      }
    }
  }
  // o = O / l in T, lse = m + log l; finite check on what is stored
  T* o = static_cast<T*>(a.o) + ((b * Sq + i0) * a.Hq + h) * D;
  float* lse = a.lse + (b * a.Hq + h) * Sq + i0;
  __m512 bad = _mm512_setzero_ps();
  bool ok = true;
  for (int64_t r = 0; r < n; ++r) {
    const __m512 inv = _mm512_set1_ps(1.f / l[r]);
    T* orow = o + r * a.Hq * D;
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const __mmask16 dm = tail_mask(D - d0);
      const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(acc + r * Dp + d0), inv);
      bad = _mm512_add_ps(bad, _mm512_maskz_sub_ps(dm, x, x));  // NaN once a stored x is inf / NaN
      store16(orow + d0, x, dm);
    }
    lse[r] = m[r] + std::log(l[r]);
    ok &= std::isfinite(lse[r]);
  }
  return ok && _mm512_cmp_ps_mask(bad, bad, _CMP_UNORD_Q) == 0;
}

// The work layout shared by the AVX-512 and the AMX kernels. Kern (a policy, below) gives the
// packed word type W, kQ query rows per item, `per` words of packed K / V per (batch, kv head) with
// V at v_off, pack(b, hk, kb, base) for key block kb, item(...) for kQ rows of one query head, and
// begin() / end() around a thread's items (AMX: the tile configuration).
//   heads % threads == 0 or heads >= 4 threads: one parallel region over (batch, kv head), its K / V
//     packed into the thread's own buffer (kept in cache), then every q block of its g query heads;
//   else (fewer pairs than threads): pack in one region, then (batch, q head, q block) items, the
//     q blocks in the order 0, n-1, 1, n-2, ... (causal blocks' costs alternate).
template <typename Kern>
bool run_layout(const PrefillArgs& a, const Kern& kern) {
  using W = typename Kern::W;
  const int64_t g = a.Hq / a.Hkv, nkb = kern.nkb, per = kern.per, kQ = Kern::kQ;
  // work: visible (query, key) pairs x D x 2 (QK^T and PV)
  const bool one_thread = visible_pairs(a) * a.B * a.Hq * a.D * 2 < kParallelMinMacs;
  const int64_t nqb = (a.Sq + kQ - 1) / kQ, items = a.B * a.Hq * nqb;
  const int64_t heads = a.B * a.Hkv, threads = one_thread ? 1 : at::get_num_threads();
  std::atomic<bool> ok{true};
  if (heads % threads == 0 || heads >= 4 * threads) {
    at::parallel_for(0, heads, one_thread ? heads : 1, [&](int64_t h0, int64_t h1) {
      thread_local std::vector<W> kept;
      thread_local std::vector<float> ws;
      std::vector<W> call;
      W* own = pack_buffer(kept, call, per);
      if (ws.size() < size_t(kern.ws_n)) ws.resize(size_t(kern.ws_n));
      kern.begin();
      for (int64_t bh = h0; bh < h1 && ok.load(std::memory_order_relaxed); ++bh) {
        const int64_t b = bh / a.Hkv, hk = bh % a.Hkv;
        for (int64_t kb = 0; kb < nkb; ++kb) kern.pack(b, hk, kb, own);
        for (int64_t h = hk * g; h < (hk + 1) * g; ++h)
          for (int64_t i0 = 0; i0 < a.Sq; i0 += kQ)
            if (!kern.item(own, b, h, i0, std::min(kQ, a.Sq - i0), ws.data())) ok = false;
      }
      kern.end();
    });
    return ok.load();
  }
  thread_local std::vector<W> kept;
  std::vector<W> call;
  W* pk = pack_buffer(kept, call, heads * per);
  at::parallel_for(0, heads * nkb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nkb;
      kern.pack(bh / a.Hkv, bh % a.Hkv, t % nkb, pk + bh * per);
    }
  });
  at::parallel_for(0, items, 1, [&](int64_t u0, int64_t u1) {
    thread_local std::vector<float> ws;
    if (ws.size() < size_t(kern.ws_n)) ws.resize(size_t(kern.ws_n));
    kern.begin();
    for (int64_t u = u0; u < u1 && ok.load(std::memory_order_relaxed); ++u) {
      const int64_t bh = u / nqb, t = u % nqb, b = bh / a.Hq, h = bh % a.Hq;
      const int64_t qb = t % 2 == 0 ? t / 2 : nqb - 1 - t / 2;  // 0, n-1, 1, n-2, ...
      const int64_t i0 = qb * kQ, n = std::min(kQ, a.Sq - i0);
      if (!kern.item(pk + (b * a.Hkv + h / g) * per, b, h, i0, n, ws.data())) ok = false;
    }
    kern.end();
  });
  return ok.load();
}

// The AVX-512 kernel's policy: K^T packed in blocks of kBk keys, then V, fp32.
template <typename T>
struct Avx512Kernel {
  using W = float;
  static constexpr int64_t kQ = kBq;
  const PrefillArgs& a;
  int64_t Dp, nkb, kt_n, per, ws_n;
  explicit Avx512Kernel(const PrefillArgs& args)
      : a(args), Dp(round_up(args.D, 16)), nkb(round_up(args.Sk, kBk) / kBk), kt_n(nkb * kBk * args.D),
        per(kt_n + args.Sk * Dp), ws_n(kBq * (args.D + kBk + Dp)) {}
  void pack(int64_t b, int64_t hk, int64_t kb, float* base) const {
    const T* k = static_cast<const T*>(a.k) + b * a.k_s[0] + hk * a.k_s[2];
    const T* v = static_cast<const T*>(a.v) + b * a.v_s[0] + hk * a.v_s[2];
    pack_block<T>(k, a.k_s[1], v, a.v_s[1], a.Sk, a.D, Dp, kb, base + kb * kBk * a.D, base + kt_n);
  }
  bool item(const float* base, int64_t b, int64_t h, int64_t i0, int64_t n, float* ws) const {
    return prefill_item<T>(a, base, base + kt_n, b, h, i0, n, ws);
  }
  void begin() const {}
  void end() const {}
};

template <typename T>
bool prefill_run(const PrefillArgs& a) {
  return run_layout(a, Avx512Kernel<T>(a));
}

// ---- bf16 on AMX ------------------------------------------------------------------------------
// The same algorithm with both GEMMs on AMX tiles (TDPBF16PS: 16 x 16 fp32 += 16 x 32 bf16 . 32 x
// 16 bf16): scores from the bf16 inputs in fp32 (scale applied in the softmax passes), softmax in
// fp32, P rounded to bf16 for P V (l sums the fp32 p, as ATen's bf16 kernel: lse stays within fp32
// rounding), O in fp32 (tiles loaded from / stored to the accumulator once per key block). Blocks
// of kAq = 32 query rows (2 row tiles) and kAk = 256 keys. Packed per (batch, kv head): K as
// 16-key x 32-d tiles in AMX's pair layout (row = d pair, 16 keys of 2 bf16; D padded to 32 with
// zeros, keys to 256), V as 32-key x 16-column tiles (row = key pair, 16 columns of 2 bf16;
// columns padded to 16, keys to 256).
constexpr int64_t kAq = 32, kAk = 256;
#define HIRES_AMX \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c,amx-tile,amx-bf16")))

bool cpu_has_amx_bf16() {
  static const bool ok = [] {
    if (!cpu_has_avx512()) return false;
    unsigned a, b, c, d;
    __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    if (!((d >> 22) & 1) || !((d >> 24) & 1)) return false;  // AMX-BF16, AMX-TILE
    __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(1));
    if (!((a >> 5) & 1)) return false;  // AVX512_BF16 (the rounding of p)
    // Linux: ask for the tile data state (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ok;
}

// AMX for bf16 where the CPU and OS have it, unless HIRES_LMM_CPU_PREFILL_AMX=0 (read per call)
bool use_amx_bf16() {
  const char* env = std::getenv("HIRES_LMM_CPU_PREFILL_AMX");
  return cpu_has_amx_bf16() && !(env != nullptr && std::strcmp(env, "0") == 0);
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// every tile 16 rows x 64 bytes (tmm0-3: fp32 accumulators, tmm4-5: A, tmm6-7: B)
HIRES_AMX void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  // GCC's ldtilecfg asm declares an 8-byte input: keep the whole 64-byte config's stores before it
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

HIRES_AMX void amx_release() { _tile_release(); }

// a compiler barrier before tile loads (GCC's tileloadd asm declares no memory input)
#define HIRES_TLOAD(t, p, s)          \
  do {                                \
    __asm__ volatile("" ::: "memory"); \
    _tile_loadd(t, p, s);             \
  } while (0)

// Key block kb (64 keys) of one (batch, kv head): K tiles into kp (4 key tiles x D32 / 32 d steps,
// 256 32-bit pairs each: kp[(kt * nds + ds) * 256 + dpair * 16 + key]) and V tiles into vp (2 key
// groups x Dp / 16 column tiles: vp[(kg * nct + ct) * 256 + keypair * 16 + col]).
HIRES_AMX void amx_pack_block(const c10::BFloat16* k, int64_t ks, const c10::BFloat16* v, int64_t vs, int64_t Sk,
                              int64_t D, int64_t D32, int64_t Dp, int64_t kb, uint32_t* kp, uint32_t* vp) {
  const int64_t nds = D32 / 32, nct = Dp / 16;
  for (int kt = 0; kt < kAk / 16; ++kt) {
    const int64_t jt = kb * kAk + 16 * kt;
    const int64_t nk = std::max<int64_t>(0, std::min<int64_t>(16, Sk - jt));
    for (int64_t ds = 0; ds < nds; ++ds) {
      const int64_t d0 = 32 * ds;
      const __mmask32 dm = D - d0 >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << (D - d0)) - 1u);
      __m512 r[16];
      for (int jj = 0; jj < 16; ++jj)
        r[jj] = jj < nk ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(dm, k + (jt + jj) * ks + d0))
                        : _mm512_setzero_ps();
      transpose16(r);  // row = d pair, lane = key
      uint32_t* dst = kp + ((kb * (kAk / 16) + kt) * nds + ds) * 256;
      for (int p = 0; p < 16; ++p) _mm512_storeu_ps(reinterpret_cast<float*>(dst + p * 16), r[p]);
    }
  }
  for (int kg = 0; kg < kAk / 32; ++kg)
    for (int64_t ct = 0; ct < nct; ++ct) {
      const int64_t c0 = 16 * ct;
      const __mmask16 cm = tail_mask(D - c0);
      uint32_t* dst = vp + ((kb * (kAk / 32) + kg) * nct + ct) * 256;
      for (int t = 0; t < 16; ++t) {
        const int64_t j = kb * kAk + 32 * kg + 2 * t;
        const __m512i lo = j < Sk ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(cm, v + j * vs + c0))
                                  : _mm512_setzero_si512();
        const __m512i hi = j + 1 < Sk ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(cm, v + (j + 1) * vs + c0))
                                      : _mm512_setzero_si512();
        _mm512_storeu_si512(dst + t * 16, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
}

// One work item: rows i0 .. i0 + n - 1 (n <= kAq) of query head h of batch element b. ws: qb (kAq x
// D32 bf16), s (kAq x kAk fp32), p (kAq x kAk bf16), acc (kAq x Dp fp32).
HIRES_AMX bool amx_item(const PrefillArgs& a, const uint32_t* kp, const uint32_t* vp, int64_t b, int64_t h,
                        int64_t i0, int64_t n, float* ws) {
  const int64_t D = a.D, D32 = round_up(D, 32), Dp = round_up(D, 16), Sq = a.Sq;
  const int64_t nds = D32 / 32, nct = Dp / 16;
  uint16_t* qb = reinterpret_cast<uint16_t*>(ws);               // (kAq, D32)
  float* s = ws + kAq * D32 / 2;                                // (kAq, kAk)
  uint16_t* pb = reinterpret_cast<uint16_t*>(s + kAq * kAk);   // (kAq, kAk)
  float* acc = s + kAq * kAk + kAq * kAk / 2;                   // (kAq, Dp)
  float m[kAq], l[kAq], alpha[kAq];
  int64_t lo[kAq], hi[kAq];
  const c10::BFloat16* q = static_cast<const c10::BFloat16*>(a.q) + b * a.q_s[0] + h * a.q_s[2];
  for (int64_t r = 0; r < kAq; ++r)
    for (int64_t d0 = 0; d0 < D32; d0 += 32) {
      const int64_t nd = r < n ? std::max<int64_t>(0, std::min<int64_t>(32, D - d0)) : 0;
      const __mmask32 dm = nd >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << nd) - 1u);
      _mm512_storeu_si512(qb + r * D32 + d0, _mm512_maskz_loadu_epi16(dm, q + (i0 + r) * a.q_s[1] + d0));
    }
  std::memset(acc, 0, sizeof(float) * size_t(kAq * Dp));
  int64_t J0, J1;
  start_rows(a, i0, n, lo, hi, m, l, J0, J1);
  std::memset(pb + n * kAk, 0, sizeof(uint16_t) * size_t((kAq - n) * kAk));  // padding rows: p = 0
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 sv = _mm512_set1_ps(static_cast<float>(a.scale));
  const int64_t qs = D32 * 2, ss = kAk * 4, ps = kAk * 2, os = Dp * 4;
  for (int64_t j0 = J0 / kAk * kAk; j0 <= J1; j0 += kAk) {
    const int64_t kb = j0 / kAk;
    const int nkp = int(std::min<int64_t>(kAk, J1 + 1 - j0) + 31) / 32;  // 32-key pairs of tiles needed
    // S = Q K^T: tiles (row tile 0/1) x (key tile 2kp / 2kp + 1)
    for (int kpi = 0; kpi < nkp; ++kpi) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const uint32_t* k0 = kp + (kb * (kAk / 16) + 2 * kpi) * nds * 256;
      const uint32_t* k1 = k0 + nds * 256;
      for (int64_t ds = 0; ds < nds; ++ds) {
        HIRES_TLOAD(4, qb + ds * 32, qs);
        HIRES_TLOAD(5, qb + 16 * D32 + ds * 32, qs);
        HIRES_TLOAD(6, k0 + ds * 256, 64);
        HIRES_TLOAD(7, k1 + ds * 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      float* sp = s + 32 * kpi;
      _tile_stored(0, sp, ss);
      _tile_stored(1, sp + 16, ss);
      _tile_stored(2, sp + 16 * kAk, ss);
      _tile_stored(3, sp + 16 * kAk + 16, ss);
    }
    const int np = 2 * nkp;  // 16-key panels of the block
    const int64_t jend = j0 + 16 * np;
    bool rescale = false;
    for (int64_t r = 0; r < n; ++r) {
      float* sr = s + r * kAk;
      uint16_t* pr = pb + r * kAk;
      const bool part = lo[r] > j0 || hi[r] < jend - 1;
      const __m512i lov = _mm512_set1_epi32(int(std::max<int64_t>(lo[r] - j0, -1)));
      const __m512i hiv = _mm512_set1_epi32(int(std::min<int64_t>(hi[r] - j0, kAk)));
      // two passes over the raw scores (scale applied in each, nothing stored): max, then exp
      __m512 mx = ninf;
      for (int p = 0; p < np; ++p)
        mx = _mm512_mask_max_ps(mx, visible16(part, p, lov, hiv), mx,
                                _mm512_mul_ps(_mm512_loadu_ps(sr + 16 * p), sv));
      const float bm = _mm512_reduce_max_ps(mx);
      if (bm == -std::numeric_limits<float>::infinity()) {
        alpha[r] = 1.f;
        std::memset(pr, 0, sizeof(uint16_t) * size_t(16 * np));
        continue;
      }
      const float mn = std::max(m[r], bm);
      alpha[r] = m[r] == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(m[r] - mn);
      rescale |= alpha[r] != 1.f;
      m[r] = mn;
      const __m512 mv = _mm512_set1_ps(mn);
      __m512 sum = _mm512_setzero_ps();
      for (int p = 0; p < np; ++p) {
        const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(sr + 16 * p), sv, mv);
        const __m512 e = _mm512_maskz_mov_ps(visible16(part, p, lov, hiv), exp16_scalef(x));
        // p rounded to bf16 (nearest even, one instruction)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + 16 * p), (__m256i)_mm512_cvtneps_pbh(e));
        sum = _mm512_add_ps(sum, e);
      }
      l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);
    }
    if (rescale)
      for (int64_t r = 0; r < n; ++r)
        if (alpha[r] != 1.f) {
          const __m512 av = _mm512_set1_ps(alpha[r]);
          for (int64_t c0 = 0; c0 < Dp; c0 += 16)
            _mm512_storeu_ps(acc + r * Dp + c0, _mm512_mul_ps(_mm512_loadu_ps(acc + r * Dp + c0), av));
        }
    // O += P V: tiles (row tile 0/1) x (column tile ct / ct + 1) over the block's 32-key groups
    for (int64_t ct = 0; ct < nct; ct += 2) {
      const bool two = ct + 1 < nct;
      float* o0 = acc + 16 * ct;
      HIRES_TLOAD(0, o0, os);
      HIRES_TLOAD(2, o0 + 16 * Dp, os);
      if (two) {
        HIRES_TLOAD(1, o0 + 16, os);
        HIRES_TLOAD(3, o0 + 16 * Dp + 16, os);
      }
      for (int kg = 0; kg < nkp; ++kg) {
        const uint32_t* v0 = vp + ((kb * (kAk / 32) + kg) * nct + ct) * 256;
        HIRES_TLOAD(4, pb + 32 * kg, ps);
        HIRES_TLOAD(5, pb + 16 * kAk + 32 * kg, ps);
        HIRES_TLOAD(6, v0, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if (two) {
          HIRES_TLOAD(7, v0 + 256, 64);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, o0, os);
      _tile_stored(2, o0 + 16 * Dp, os);
      if (two) {
        _tile_stored(1, o0 + 16, os);
        _tile_stored(3, o0 + 16 * Dp + 16, os);
      }
    }
  }
  c10::BFloat16* o = static_cast<c10::BFloat16*>(a.o) + ((b * Sq + i0) * a.Hq + h) * D;
  float* lse = a.lse + (b * a.Hq + h) * Sq + i0;
  __m512 bad = _mm512_setzero_ps();
  bool ok = true;
  for (int64_t r = 0; r < n; ++r) {
    const __m512 inv = _mm512_set1_ps(1.f / l[r]);
    c10::BFloat16* orow = o + r * a.Hq * D;
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const __mmask16 dm = tail_mask(D - d0);
      const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(acc + r * Dp + d0), inv);
      bad = _mm512_add_ps(bad, _mm512_maskz_sub_ps(dm, x, x));
      store16(orow + d0, x, dm);
    }
    lse[r] = m[r] + std::log(l[r]);
    ok &= std::isfinite(lse[r]);
  }
  return ok && _mm512_cmp_ps_mask(bad, bad, _CMP_UNORD_Q) == 0;
}
#undef HIRES_TLOAD

// The AMX kernel's policy: K and V packed in AMX's bf16 pair layout (32-bit words), blocks of kAk
// keys; the tiles configured around a thread's items.
struct AmxKernel {
  using W = uint32_t;
  static constexpr int64_t kQ = kAq;
  const PrefillArgs& a;
  int64_t D32, Dp, nkb, kp_n, per, ws_n;
  explicit AmxKernel(const PrefillArgs& args)
      : a(args), D32(round_up(args.D, 32)), Dp(round_up(args.D, 16)), nkb(round_up(args.Sk, kAk) / kAk),
        kp_n(nkb * kAk * D32 / 2), per(kp_n + nkb * kAk * Dp / 2),
        ws_n(kAq * D32 / 2 + kAq * kAk + kAq * kAk / 2 + kAq * Dp) {}
  void pack(int64_t b, int64_t hk, int64_t kb, uint32_t* base) const {
    const auto* k = static_cast<const c10::BFloat16*>(a.k) + b * a.k_s[0] + hk * a.k_s[2];
    const auto* v = static_cast<const c10::BFloat16*>(a.v) + b * a.v_s[0] + hk * a.v_s[2];
    amx_pack_block(k, a.k_s[1], v, a.v_s[1], a.Sk, a.D, D32, Dp, kb, base, base + kp_n);
  }
  bool item(const uint32_t* base, int64_t b, int64_t h, int64_t i0, int64_t n, float* ws) const {
    return amx_item(a, base, base + kp_n, b, h, i0, n, ws);
  }
  void begin() const { amx_configure(); }
  void end() const { amx_release(); }
};

bool prefill_run_amx(const PrefillArgs& a) { return run_layout(a, AmxKernel(a)); }

}  // namespace

bool attention_cpu_prefill(const PrefillArgs& a, at::ScalarType dtype) {
  if (!cpu_has_avx512() || a.D > kMaxD || a.D <= 0 || a.Hkv <= 0 || a.Hq % a.Hkv != 0) return false;
  bool ok = false;
  switch (dtype) {
    case at::kFloat: ok = prefill_run<float>(a); break;
    case at::kHalf: ok = prefill_run<c10::Half>(a); break;
    case at::kBFloat16:
      ok = use_amx_bf16() ? prefill_run_amx(a) : prefill_run<c10::BFloat16>(a);
      break;
    default: return false;
  }
  if (ok) g_calls.fetch_add(1, std::memory_order_relaxed);
  return ok;
}
#else
namespace {
bool use_amx_bf16() { return false; }
}  // namespace
bool cpu_has_avx512() { return false; }
bool attention_cpu_prefill(const PrefillArgs&, at::ScalarType) { return false; }
#endif

bool prefill_route(int64_t B, int64_t Sq, int64_t Sk, int64_t Hq, int64_t Hkv, int64_t D, bool masked,
                   at::ScalarType dtype) {
  const char* env = std::getenv("HIRES_LMM_CPU_PREFILL");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  if (dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16) return false;
  if (D <= 0 || D > kMaxD || Hkv <= 0 || Hq % Hkv != 0 || !cpu_has_avx512()) return false;
  if (B * Hkv * (round_up(Sk, kBk) * D + Sk * round_up(D, 16)) > kMaxPackFloats) return false;
  if (env != nullptr && std::strcmp(env, "1") == 0) return true;
  // Measured side by side against plain SDPA, 1 thread (README "CPU paths"; this shared machine is
  // noisy). fp16 (ATen's fp16 kernel is slower than its fp32 one): ours 1.2 - 4x, parity unmasked at
  // S = 1024. bf16 on AMX (ATen's bf16 kernel: ~2.5x its fp32 one here): 1.1 - 1.6x causal up to
  // S = 2048, unmasked 1.0 - 1.5x at S = 128 - 256 (thread-time minima), parity at 384 - 2048; without AMX ATen's bf16 beats
  // our fp32-math kernel: bf16 stays there. fp32: 1.2 - 1.9x causal up to S = 2048; unmasked (MKL
  // sgemm blocks; thread-time minima) 1.02 - 1.08x at S = 128 - 768, CLIP-L (B=8, S=577, 16 heads,
  // D=64) 1.2x, 0.94 - 1.01x at 1024.
  if (dtype == at::kHalf) return true;
  if (dtype == at::kBFloat16)
    return use_amx_bf16() && Sq * Sk <= (masked ? int64_t(2048) * 2048 : int64_t(1) << 17);
  return Sq * Sk <= (masked ? int64_t(2048) * 2048 : int64_t(768) * 768);
}

}  // namespace hires::attention
