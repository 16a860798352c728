// The pybind11 module hires_lmm._C and the op library. Schemas of each family live in its own
// csrc/<family>.cpp (TORCH_LIBRARY_FRAGMENT); this file opens the library and exports build info.
#include <torch/extension.h>
#include <array>
#include <atomic>
#include <sstream>
#include <vector>

#include "csrc/common.h"

#ifdef HIRES_LMM_WITH_CUDA
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <cuda_runtime_api.h>
#endif

#ifndef HIRES_LMM_CUDA_ARCHS
#define HIRES_LMM_CUDA_ARCHS ""  // SASS, e.g. "sm_80,sm_90a"
#endif
#ifndef HIRES_LMM_PTX_ARCHS
#define HIRES_LMM_PTX_ARCHS ""   // PTX, e.g. "compute_80"
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

namespace {

std::vector<std::string> split_archs(const std::string& s) {
  std::vector<std::string> out;
  std::string item;
  std::istringstream in(s);
  while (std::getline(in, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

// "sm_90a" -> {9, 0, 'a'}; "compute_120" -> {12, 0, 0}; false when not of that form.
bool parse_arch(const std::string& a, int& major, int& minor, char& suffix, bool& ptx) {
  std::string rest;
  if (a.rfind("sm_", 0) == 0) {
    ptx = false;
    rest = a.substr(3);
  } else if (a.rfind("compute_", 0) == 0) {
    ptx = true;
    rest = a.substr(8);
  } else {
    return false;
  }
  suffix = 0;
  if (!rest.empty() && (rest.back() == 'a' || rest.back() == 'f')) {
    suffix = rest.back();
    rest.pop_back();
  }
  if (rest.size() < 2) return false;
  for (char c : rest) {
    if (c < '0' || c > '9') return false;
  }
  major = std::stoi(rest.substr(0, rest.size() - 1));
  minor = rest.back() - '0';
  return true;
}

}  // namespace

std::string arch_coverage_error(int major, int minor, const std::string& archs) {
  auto list = split_archs(archs);
  for (const auto& a : list) {
    int M = 0, m = 0;
    char suffix = 0;
    bool ptx = false;
    if (!parse_arch(a, M, m, suffix, ptx)) continue;
    if (suffix == 'a') {
      if (major == M && minor == m) return "";  // arch-specific code runs on exactly X.Y
    } else if (suffix == 'f' || !ptx) {
      if (major == M && minor >= m) return "";  // SASS: same major, equal or newer minor
    } else if (major > M || (major == M && minor >= m)) {
      return "";  // PTX: the driver JIT-compiles it for any newer capability
    }
  }
  std::string joined;
  for (const auto& a : list) joined += (joined.empty() ? "" : ", ") + a;
  std::ostringstream msg;
  std::string mine = std::to_string(major) + "." + std::to_string(minor) + (major == 9 && minor == 0 ? "a" : "");
  msg << "has compute capability " << major << "." << minor
      << ", which this build of hires_lmm has no code for (compiled for: "
      << (list.empty() ? std::string("no CUDA arches, a CPU-only build") : joined)
      << "); rebuild for it: TORCH_CUDA_ARCH_LIST=\"" << mine
      << "\" pip install --no-build-isolation --force-reinstall --no-deps .";
  return msg.str();
}

void check_cuda_arch_covered(int index, const char* op) {
#ifdef HIRES_LMM_WITH_CUDA
  // 0: not checked yet, 1: covered, 2: not covered. A race only repeats the (pure) check.
  static std::array<std::atomic<int8_t>, 64> state{};
  if (index >= 0 && index < static_cast<int>(state.size()) &&
      state[index].load(std::memory_order_relaxed) == 1) {
    return;
  }
  cudaDeviceProp prop;
  cudaError_t rc = cudaGetDeviceProperties(&prop, index);
  TORCH_CHECK(rc == cudaSuccess, op, ": cannot query CUDA device ", index, ": ", cudaGetErrorString(rc));
  std::string err = arch_coverage_error(prop.major, prop.minor,
                                        std::string(HIRES_LMM_CUDA_ARCHS) + "," + HIRES_LMM_PTX_ARCHS);
  if (index >= 0 && index < static_cast<int>(state.size())) {
    state[index].store(err.empty() ? 1 : 2, std::memory_order_relaxed);
  }
  TORCH_CHECK(err.empty(), op, ": CUDA device ", index, " (", prop.name, ") ", err);
#else
  (void)index;
  (void)op;
#endif
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
    py::list archs, ptx;
    for (const auto& a : hires::split_archs(HIRES_LMM_CUDA_ARCHS)) archs.append(a);
    for (const auto& a : hires::split_archs(HIRES_LMM_PTX_ARCHS)) ptx.append(a);
    d["cuda_archs"] = archs;  // SASS
    d["ptx_archs"] = ptx;     // PTX the driver can JIT for newer GPUs
#else
    d["cuda"] = py::none();
    d["cuda_archs"] = py::list();
    d["ptx_archs"] = py::list();
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
  m.def("_arch_coverage_error", [](int major, int minor, const std::string& archs) {
    return hires::arch_coverage_error(major, minor, archs);
  }, "'' if a device of this capability is covered by the comma-separated arch list, else the error text");
  m.def("set_value_checks", [](bool on) { hires::g_value_checks.store(on); });
  m.def("value_checks", []() { return hires::value_checks_enabled(); });
}
