// Shared helpers of the binding layer: argument checks that name the argument, the kernel
// registry behind hires_lmm.build_info(), and the switch for checks that cost a host sync.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

#include "kernels/common/dtype.h"

#include <map>
#include <optional>
#include <set>
#include <string>
#include <type_traits>
#include <utility>

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

// Arch coverage. `archs` is the build's comma-separated list ("sm_80,compute_80,sm_90a"): sm_XY
// SASS runs on capability X.Z for Z >= Y; sm_XYa only on X.Y; compute_XY PTX is JIT-compiled by
// the driver for any capability >= X.Y (compute_XYa only for X.Y). Returns "" when a device of
// capability major.minor is covered, else the text of the error (compiled arches and the rebuild
// command). Pure function; exported to Python as _C._arch_coverage_error for tests and `info`.
std::string arch_coverage_error(int major, int minor, const std::string& archs);
// Raises, naming op, device and capability, when this build has no code for CUDA device `index`.
// The answer is cached per device: after the first call it is one relaxed atomic load.
void check_cuda_arch_covered(int index, const char* op);

namespace detail {
// The device index of the first CUDA tensor among an op's arguments (-1 if none).
template <typename T>
inline void find_cuda_device(int& dev, const T&) {}
inline void find_cuda_device(int& dev, const at::Tensor& t) {
  if (dev < 0 && t.defined() && t.is_cuda()) dev = t.get_device();
}
inline void find_cuda_device(int& dev, const std::optional<at::Tensor>& t) {
  if (t.has_value()) find_cuda_device(dev, *t);
}
inline void find_cuda_device(int& dev, const at::TensorList& ts) {
  for (const auto& t : ts) find_cuda_device(dev, t);
}

// fn wrapped so that its first call on each CUDA device checks the build covers that device
// (instead of CUDA's "no kernel image is available for execution on the device" mid-op).
template <typename R, typename... Args>
auto with_arch_check(const char* name, R (*fn)(Args...)) {
  return [name, fn](Args... args) -> R {
    int dev = -1;
    (find_cuda_device(dev, args), ...);
    if (dev >= 0) check_cuda_arch_covered(dev, name);
    return fn(std::forward<Args>(args)...);
  };
}
}  // namespace detail

// Binds op functions to the CPU key and, in CUDA builds, the CUDA key (every binding function
// dispatches on its tensors' device itself), recording each (op, device) for build_info():
//   HIRES_BIND_CPU_CUDA(bind_family) { b.impl("op", &op).impl("op2", &op2); }
// On the CUDA key, function pointers are wrapped by detail::with_arch_check (name must be a
// string literal: the wrapper keeps the pointer). Other callables are registered as they are.
class Binder {
 public:
  Binder(torch::Library& m, const char* device, bool check_arch = false)
      : m_(m), device_(device), check_arch_(check_arch) {}
  template <typename F>
  Binder& impl(const char* name, F&& fn) {
    using Fn = std::decay_t<F>;
    if constexpr (std::is_pointer_v<Fn> && std::is_function_v<std::remove_pointer_t<Fn>>) {
      if (check_arch_) {
        m_.impl(name, detail::with_arch_check(name, static_cast<Fn>(fn)));
      } else {
        m_.impl(name, static_cast<Fn>(fn));
      }
    } else {
      m_.impl(name, std::forward<F>(fn));
    }
    kernel_registry()[name].insert(device_);
    return *this;
  }

 private:
  torch::Library& m_;
  const char* device_;
  bool check_arch_;
};
#ifdef HIRES_LMM_WITH_CUDA
#define HIRES_BIND_CUDA_(fn) \
  TORCH_LIBRARY_IMPL(hires_lmm, CUDA, m) { ::hires::Binder b(m, "cuda", true); fn(b); }
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
