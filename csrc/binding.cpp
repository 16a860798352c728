// The pybind11 module hires_lmm._C and the op library. Schemas of each family live in its own
// csrc/<family>.cpp (TORCH_LIBRARY_FRAGMENT); this file opens the library and exports build info.
#include <torch/extension.h>
#include <atomic>

#include "csrc/common.h"

#ifdef HIRES_LMM_WITH_CUDA
#include <c10/cuda/CUDAGraphsC10Utils.h>
#endif

namespace hires {

std::map<std::string, std::set<std::string>>& kernel_registry() {
  static std::map<std::string, std::set<std::string>> registry;
  return registry;
}

static std::atomic<bool> g_value_checks{true};
bool value_checks_enabled() { return g_value_checks.load(); }

bool cuda_stream_capturing(const at::Tensor& on) {
#ifdef HIRES_LMM_WITH_CUDA
  if (on.is_cuda()) {
    return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  }
#endif
  (void)on;
  return false;
}

}  // namespace hires

TORCH_LIBRARY(hires_lmm, m) {}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hires_lmm compiled kernels; use hires_lmm.ops";
  m.def("build_info", []() {
    py::dict d;
    d["version"] = HIRES_LMM_VERSION;
    d["torch"] = HIRES_LMM_TORCH_VERSION;
#ifdef HIRES_LMM_WITH_CUDA
    d["cuda"] = HIRES_LMM_CUDA_VERSION;
    py::list archs;
    std::string s = HIRES_LMM_CUDA_ARCHS;
    size_t start = 0;
    while (start <= s.size()) {
      size_t end = s.find(',', start);
      if (end == std::string::npos) end = s.size();
      if (end > start) archs.append(s.substr(start, end - start));
      start = end + 1;
    }
    d["cuda_archs"] = archs;
#else
    d["cuda"] = py::none();
    d["cuda_archs"] = py::list();
#endif
#ifdef HIRES_LMM_WITH_SM90
    d["sm90a_kernels"] = true;
#else
    d["sm90a_kernels"] = false;
#endif
    py::dict kernels;
    for (auto& kv : hires::kernel_registry()) {
      py::list devs;
      for (auto& dev : kv.second) devs.append(dev);
      kernels[py::str(kv.first)] = devs;
    }
    d["kernels"] = kernels;
    return d;
  });
  m.def("set_value_checks", [](bool on) { hires::g_value_checks.store(on); });
  m.def("value_checks", []() { return hires::value_checks_enabled(); });
}
