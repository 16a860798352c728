// Parameters of the DeepStack injection + normalization kernel (torch-free; shared by the CUDA
// launcher and the C++ binding). See inject_norm.cuh for the formula.
#pragma once
#include <cstdint>

namespace hires::deepstack {

enum class Norm : int { kNone = 0, kRms = 1, kLayer = 2 };

struct InjectNormParams {
  const void* hidden = nullptr;     // (rows, dim) of T, row stride hidden_stride, unit column stride
  int64_t hidden_stride = 0;        // elements between rows
  const void* embeds = nullptr;     // (num_visual, dim) of E, row stride embeds_stride
  int64_t embeds_stride = 0;
  const int64_t* index = nullptr;   // (num_visual,) strictly increasing rows of hidden
  int64_t num_visual = 0;
  const void* weight = nullptr;     // (dim,) of T; null for Norm::kNone
  const void* bias = nullptr;       // (dim,) of T or null (Norm::kLayer only)
  void* normed = nullptr;           // (rows, dim) contiguous T, or null: not written
  void* injected = nullptr;         // (rows, dim) contiguous T, or null: not written
  int64_t rows = 0;
  int64_t dim = 0;
  float eps = 1e-6f;
};

}  // namespace hires::deepstack
