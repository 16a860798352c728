// Parameters and row partition of the fused RMSNorm / LayerNorm backward (torch-free; shared by
// the CUDA launcher csrc/cuda/norm_bwd.cu, its CPU twin csrc/cpu/norm_bwd.cpp and the binding
// csrc/norm_bwd.cpp). Formula in norm_bwd.cuh.
#pragma once
#include <cstdint>

namespace hires::deepstack {

struct NormBwdParams {
  const void* dy = nullptr;      // (rows, dim) contiguous T: gradient of the normalized output
  const void* x = nullptr;       // (rows, dim) contiguous T: the norm's input (injected rows included)
  const void* dres = nullptr;    // (rows, dim) contiguous T or null: extra gradient added to dx
                                 // (the gradient of the `injected` output of deepstack_inject_*_norm)
  const void* weight = nullptr;  // (dim,) T
  void* dx = nullptr;            // (rows, dim) contiguous T
  float* partial = nullptr;      // (chunks, 2, dim) fp32 workspace: per-chunk sums of dweight, dbias
  void* dweight = nullptr;       // (dim,) T
  void* dbias = nullptr;         // (dim,) T or null
  int64_t rows = 0;
  int64_t dim = 0;
  int64_t rows_per_chunk = 1;
  int64_t chunks = 0;
  float eps = 1e-6f;
  bool layer = false;            // LayerNorm (mean removed) or RMSNorm
};

// Deterministic two-stage reduction of dweight/dbias: the rows are cut into `chunks` runs of
// rows_per_chunk consecutive rows (the last may be shorter); stage 1 sums each run in row order
// into its own fp32 workspace row, stage 2 adds the workspace rows in chunk order. The partition
// depends on `rows` only (not on the device or thread count), so CPU and CUDA and every run sum
// in the same order. At most kMaxChunks runs: the workspace is <= 2 * 256 * dim fp32.
constexpr int64_t kMaxChunks = 256;
constexpr int64_t kMinRowsPerChunk = 8;

inline void set_partition(NormBwdParams& p) {
  const int64_t by_max = (p.rows + kMaxChunks - 1) / kMaxChunks;
  p.rows_per_chunk = by_max > kMinRowsPerChunk ? by_max : kMinRowsPerChunk;
  p.chunks = (p.rows + p.rows_per_chunk - 1) / p.rows_per_chunk;
}

}  // namespace hires::deepstack
