// Parameters and the shared selection rules of SliME's text-guided token selection (torch-free;
// used by the CUDA kernels in similarity_select.cuh and by the CPU twin csrc/cpu/select.cpp).
//
// Ranking rule shared by both sides: a value v at index i gets the 64-bit key
//   key(v, i) = ordered_bits(v) << 32 | (0xffffffff - i)
// so that sorting keys descending sorts values descending with ties to the lower index, and the
// key 0 (padding) ranks below every real key. -0.0 is folded into +0.0 so the two tie. Every NaN
// gets ordered bits 0: it ranks after every other value, -inf included (ties among NaNs to the
// lower index), and before the padding (README "Non-finite values").
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define HIRES_HD __host__ __device__ __forceinline__
#else
#define HIRES_HD inline
#endif

namespace hires::select {

constexpr float kCosEps = 1e-8f;  // F.cosine_similarity's eps: each norm is clamped to >= eps

enum class SelectMode : int { kTopK = 0, kTopP = 1 };

struct SimilaritySelectParams {
  // inputs; the last dimension is contiguous, the others have element strides
  const void* local = nullptr;        // (batch, n, dim) of TL
  int64_t local_stride_b = 0, local_stride_n = 0;
  const void* text = nullptr;         // (batch, t, dim) of TT
  int64_t text_stride_b = 0, text_stride_t = 0;
  const bool* mask = nullptr;         // (batch, t) contiguous, or null: every text token counts
  int64_t batch = 0, n = 0, t = 0, dim = 0;
  // selection
  SelectMode mode = SelectMode::kTopK;
  int64_t k = 0;                      // kTopK: 1 <= k <= n
  double p = 1.0;                     // kTopP: 0 < p <= 1 (the test is float(cum) <= float(p))
  double temperature = 1.0;           // kTopP: softmax(s / temperature), fp64
  bool presoftmax = true;             // kTopP: s = softmax(scores / presoftmax_temperature) first
  double presoftmax_temperature = 0.5;
  // outputs (contiguous)
  float* scores = nullptr;            // (batch, n) fp32
  int64_t* indices = nullptr;         // (batch, out_cols): kTopK out_cols = k; kTopP out_cols = n
  int64_t out_cols = 0;
  int64_t* lengths = nullptr;         // (batch,) kTopP only
  // workspace (CUDA only): per-text-token weights, the text direction, one counter per row
  float* text_weight = nullptr;       // (batch, t): mask / max(|text|, eps)
  float* text_dir = nullptr;          // (batch, dim): sum_t text_weight * text
  unsigned int* counters = nullptr;   // (batch,)
};

struct GatherParams {
  const void* tokens = nullptr;       // (batch, n, dim), last dim contiguous
  int64_t tokens_stride_b = 0, tokens_stride_n = 0;
  const int64_t* indices = nullptr;   // (batch, k) contiguous, values in [0, n) or -1
  void* out = nullptr;                // (batch, k, dim) contiguous; zeros where index < 0
  int64_t batch = 0, n = 0, k = 0, dim = 0;
};

HIRES_HD uint32_t ordered_bits(float v) {
  if (v != v) return 0u;  // NaN: below -inf (ordered 0x007fffff), above only the padding key
  if (v == 0.f) v = 0.f;  // -0 -> +0
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

HIRES_HD float from_ordered_bits(uint32_t o) {
  const uint32_t u = (o & 0x80000000u) ? (o & 0x7fffffffu) : ~o;
  float v;
  memcpy(&v, &u, sizeof(v));
  return v;
}

HIRES_HD uint64_t rank_key(float v, int64_t i) {
  return (uint64_t(ordered_bits(v)) << 32) | uint64_t(0xffffffffu - uint32_t(i));
}

HIRES_HD int64_t key_index(uint64_t key) { return int64_t(0xffffffffu - uint32_t(key & 0xffffffffu)); }

HIRES_HD float key_value(uint64_t key) { return from_ordered_bits(uint32_t(key >> 32)); }

// The rare fp64 paths of the scores (README "Non-finite values": never a finite wrong value).
// Text weight 1 / max(|x|, eps) from the fp64 sum of squares; NaN (not 0) when x is not finite.
HIRES_HD float text_weight_f64(double ss) {
  const double n = sqrt(ss);
  if (!(n < INFINITY)) return NAN;  // inf or NaN norm: x/|x| is NaN
  return float(1.0 / (n > double(kCosEps) ? n : double(kCosEps)));
}
// Score dot / max(|l|, eps) from fp64 sums (NaN when l or dir is not finite).
HIRES_HD double local_score_f64(double dot, double ll) {
  const double n = sqrt(ll);
  return dot / (n > double(kCosEps) ? n : double(kCosEps));
}

// Top-p probabilities in fp64 from the fp32 scores, shared by the CPU twin and the kernel
// (README "Non-finite values": a NaN score has probability 0 in both softmaxes):
//   v      = score / t0 - m / t0                 (m = the largest non-NaN score)
//   a      = exp(v) / s0, s0 = sum over non-NaN of exp(v)           (presoftmax only; else a = score)
//   q      = exp(a / t1 - a_max / t1) / s1, s1 = sum over non-NaN of exp(a / t1 - a_max / t1)
// with a_max = 1 / s0 (presoftmax) or m. The caller computes m, s0 and s1 with these functions.
struct TopPProbs {
  bool presoftmax = true;
  double t0 = 0.5, t1 = 1.0;
  double m0 = 0.0;      // m / t0 (presoftmax) ; unused otherwise
  double s0 = 1.0;      // presoftmax sum
  double a_max1 = 0.0;  // a_max / t1
  double s1 = 1.0;
  bool none = false;    // every score is NaN: every probability is 0
};

// exp(v) of the first softmax for a non-NaN score.
HIRES_HD double topp_exp0(const TopPProbs& q, float score) { return exp(double(score) / q.t0 - q.m0); }

// the unnormalized second-softmax term of a non-NaN score (needs s0 when presoftmax)
HIRES_HD double topp_exp1(const TopPProbs& q, float score) {
  const double a = q.presoftmax ? topp_exp0(q, score) / q.s0 : double(score);
  return exp(a / q.t1 - q.a_max1);
}

// the probability of a score (0 for NaN and when every score is NaN)
HIRES_HD double topp_prob(const TopPProbs& q, float score) {
  if (q.none || score != score) return 0.0;
  return topp_exp1(q, score) / q.s1;
}

}  // namespace hires::select
