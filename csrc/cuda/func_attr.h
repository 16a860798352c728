// Host helper of the CUDA launchers: raise a kernel's dynamic shared-memory limit once per
// (kernel, device) instead of calling cudaFuncSetAttribute before every launch.
#pragma once
#include <cuda_runtime.h>

#include <atomic>
#include <mutex>
#include <string>

namespace hires::cuda_util {

// Makes sure `Kernel` may launch with `bytes` of dynamic shared memory on the current device.
// The first call per (Kernel, device) with a new maximum sets cudaFuncAttributeMaxDynamicSharedMemorySize
// (under a per-kernel mutex, so the limit recorded is the one the driver holds and only ever
// grows); later calls with bytes <= the recorded limit return after one atomic load and a
// cudaGetDevice. Thread-safe. Returns "" or the CUDA error text (the sticky-free error is cleared).
// Devices past kMaxDevices are set on every call. A cudaDeviceReset would drop the driver's
// attribute but not this cache (nothing in torch resets a device).
template <auto Kernel>
std::string ensure_dynamic_smem(int bytes) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> limit[kMaxDevices] = {};  // bytes already allowed, per device
  static std::mutex mu;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    const cudaError_t e = cudaGetLastError();
    return std::string("cudaGetDevice: ") + cudaGetErrorString(e);
  }
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached && limit[device].load(std::memory_order_acquire) >= bytes) return std::string();
  std::lock_guard<std::mutex> lock(mu);
  if (cached && limit[device].load(std::memory_order_relaxed) >= bytes) return std::string();
  const cudaError_t e = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return std::string("cudaFuncSetAttribute: ") + cudaGetErrorString(e);
  }
  if (cached) limit[device].store(bytes, std::memory_order_release);
  return std::string();
}

}  // namespace hires::cuda_util
