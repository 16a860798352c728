// Shared helpers of the binding layer: argument checks that name the argument, the kernel
// registry behind hires_lmm.build_info(), and the switch for checks that cost a host sync.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

#include "kernels/common/dtype.h"

#include <map>
#include <set>
#include <string>

namespace hires {

// HIRES_CHECK(cond, op, arg, message...) -> RuntimeError "op: argument 'arg' message".
#define HIRES_CHECK(cond, op, arg, ...) \
  TORCH_CHECK((cond), op, ": argument '", arg, "' ", __VA_ARGS__)

inline const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

// torch dtype -> the kernels' torch-free tag (callers have checked is_float_dtype).
inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kF32;
    case at::kHalf: return DType::kF16;
    case at::kBFloat16: return DType::kBF16;
    default: TORCH_CHECK(false, "hires_lmm: unsupported dtype ", t);
  }
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_float(const at::Tensor& t, const char* op, const char* arg) {
  HIRES_CHECK(is_float_dtype(t.scalar_type()), op, arg,
              "must be float32, float16 or bfloat16, got ", dtype_name(t.scalar_type()));
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* arg, const char* ref) {
  HIRES_CHECK(a.device() == b.device(), op, arg, "is on ", a.device(), " but '", ref,
              "' is on ", b.device(), "; all tensors must be on one device");
}

// The tensor lives where a kernel can read it (a meta tensor reaches a binding only through an
// explicit redispatch; it has no data).
inline void check_device_kind(const at::Tensor& t, const char* op, const char* arg) {
  HIRES_CHECK(t.is_cpu() || t.is_cuda(), op, arg, "must be a CPU or CUDA tensor, got one on ",
              t.device());
}

// Registry of which kernels exist for which device ("cpu", "cuda", "cuda_sm90a"), filled by
// static registrars in each family's binding file; read by build_info().
std::map<std::string, std::set<std::string>>& kernel_registry();
struct KernelRegistrar {
  KernelRegistrar(const char* op, const char* device) { kernel_registry()[op].insert(device); }
};

// Binds op functions to the CPU key and, in CUDA builds, the CUDA key (every binding function
// dispatches on its tensors' device itself), recording each (op, device) for build_info():
//   HIRES_BIND_CPU_CUDA(bind_family) { b.impl("op", &op).impl("op2", &op2); }
class Binder {
 public:
  Binder(torch::Library& m, const char* device) : m_(m), device_(device) {}
  template <typename F>
  Binder& impl(const char* name, F&& fn) {
    m_.impl(name, std::forward<F>(fn));
    kernel_registry()[name].insert(device_);
    return *this;
  }

 private:
  torch::Library& m_;
  const char* device_;
};
#ifdef HIRES_LMM_WITH_CUDA
#define HIRES_BIND_CUDA_(fn) \
  TORCH_LIBRARY_IMPL(hires_lmm, CUDA, m) { ::hires::Binder b(m, "cuda"); fn(b); }
#else
#define HIRES_BIND_CUDA_(fn)
#endif
#define HIRES_BIND_CPU_CUDA(fn)                                                  \
  static void fn(::hires::Binder& b);                                            \
  TORCH_LIBRARY_IMPL(hires_lmm, CPU, m) { ::hires::Binder b(m, "cpu"); fn(b); }  \
  HIRES_BIND_CUDA_(fn)                                                           \
  static void fn(::hires::Binder& b)

#define HIRES_CONCAT_(a, b) a##b
#define HIRES_CONCAT(a, b) HIRES_CONCAT_(a, b)
#define HIRES_REGISTER_KERNEL(op, device) \
  static ::hires::KernelRegistrar HIRES_CONCAT(hires_kernel_reg_, __LINE__)(op, device)

// Value checks that need a device->host copy (index ranges, sortedness). On by default;
// hires_lmm.set_value_checks(False) turns them off. They are skipped by themselves while a
// CUDA stream is being captured into a graph (a sync is illegal there).
bool value_checks_enabled();
bool cuda_stream_capturing(const at::Tensor& on);

}  // namespace hires
