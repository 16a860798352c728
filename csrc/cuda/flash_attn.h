// Torch-free launcher of the flash attention forward (csrc/cuda/flash_attn.cu,
// kernels/attention/flash_fwd.cuh).
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>
#include <string>

#include "kernels/attention/flash_params.h"
#include "kernels/common/dtype.h"

namespace hires::attention {

// Head dims with a tensor-core kernel (the binding falls back to ATen math for others).
bool flash_fwd_supported_head_dim(int64_t head_dim);

// Multiprocessor count of a device (cached per device; the split-KV heuristic's input).
int device_sm_count(int device);

// Launches on `stream` (fp16/bf16 only); returns an empty string or the reason it could not
// launch. Never synchronizes; varlen reads cu_seqlens on the device.
std::string launch_flash_fwd(const FlashParams& p, DType t, cudaStream_t stream);

// sm_90a path (csrc/cuda/flash_attn_sm90.cu, built only when 9.0a is among the arches; the
// binding calls it only under HIRES_LMM_WITH_SM90 and HIRES_LMM_ATTN_SM90=1): dense, no split,
// fp16/bf16, D in {64, 128}, no sliding window, no softcap, on a compute capability 9.0 device;
// writes p.lse when it is set. *launched tells whether the kernel was enqueued: false with an
// error (e.g. cuTensorMapEncodeTiled refused a tensor map) means nothing ran and the caller falls
// back to launch_flash_fwd.
bool flash_fwd_sm90_usable(const FlashParams& p, int device);
std::string launch_flash_fwd_sm90(const FlashParams& p, DType t, cudaStream_t stream, bool* launched);

}  // namespace hires::attention
