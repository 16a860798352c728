// Parameters and row partition of the depthwise 7x7 conv backward (torch-free; shared by the CUDA
// launcher csrc/cuda/dwconv_bwd.cu, its CPU twin csrc/cpu/dwconv_bwd.cpp and the binding
// csrc/norm_bwd.cpp). Formula in dwconv_bwd.cuh.
#pragma once
#include <cstdint>

namespace hires::convnext {

constexpr int kDwK = 7;               // kernel size (padding 3)
constexpr int kDwTaps = kDwK * kDwK;  // 49; the workspace holds kDwTaps + 1 sums (the bias last)

struct DwconvBwdParams {
  const float* dy = nullptr;     // (B, H, W, C) contiguous fp32: gradient of the conv output
  const void* x = nullptr;       // (B, H, W, C) contiguous T: the conv input
  const void* weight = nullptr;  // (C, 1, 7, 7) contiguous T
  void* dx = nullptr;            // (B, H, W, C) contiguous T
  float* partial = nullptr;      // (chunks, kDwTaps + 1, C) fp32 workspace
  void* dweight = nullptr;       // (C, 1, 7, 7) T
  void* dbias = nullptr;         // (C,) T or null
  int64_t B = 0, H = 0, W = 0, C = 0;
  int64_t rows_per_chunk = 1;    // image rows (b, h) per chunk
  int64_t chunks = 0;
};

// Deterministic two-stage reduction of dweight / dbias over the B * H image rows: `chunks` runs
// of rows_per_chunk consecutive rows, each summed in (row, column) order into its workspace slice,
// then the slices added in chunk order. Depends on the shape only. At most kMaxDwChunks slices
// (workspace <= 64 * 50 * C fp32).
constexpr int64_t kMaxDwChunks = 64;

inline void set_dw_partition(DwconvBwdParams& p) {
  const int64_t rows = p.B * p.H;
  p.rows_per_chunk = rows > kMaxDwChunks ? (rows + kMaxDwChunks - 1) / kMaxDwChunks : 1;
  p.chunks = (rows + p.rows_per_chunk - 1) / p.rows_per_chunk;
}

}  // namespace hires::convnext
