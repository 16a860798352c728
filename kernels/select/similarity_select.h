// Parameters and the shared selection rules of SliME's text-guided token selection (torch-free;
// used by the CUDA kernels in similarity_select.cuh and by the CPU twin csrc/cpu/select.cpp).
//
// Ranking rule shared by both sides: a value v at index i gets the 64-bit key
//   key(v, i) = ordered_bits(v) << 32 | (0xffffffff - i)
// so that sorting keys descending sorts values descending with ties to the lower index, and the
// key 0 (padding) ranks below every real key. -0.0 is folded into +0.0 so the two tie.
#pragma once
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
  float p = 1.f;                      // kTopP: 0 < p <= 1
  float temperature = 1.f;            // kTopP: softmax(s / temperature)
  bool presoftmax = true;             // kTopP: s = softmax(scores / presoftmax_temperature) first
  float presoftmax_temperature = 0.5f;
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

}  // namespace hires::select
