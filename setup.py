"""Build hires_lmm: setuptools hands the one extension, hires_lmm._C, to CMake.

Environment:
  HIRES_LMM_CUDA=0        CPU-only build even when torch and nvcc have CUDA.
  TORCH_CUDA_ARCH_LIST    arches, e.g. "8.0;9.0a" (default when no GPU is visible) or "8.6+PTX".
  CUDA_HOME               the toolkit; else site-packages/nvidia/cu13 (pip's cuda-toolkit), else torch's guess.
  MAX_JOBS                parallel compile jobs (default: CPU count).
  HIRES_LMM_CUTLASS_DIR   CUTLASS include folder; default: the nvidia-cutlass package (third_party/README.md).
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
BASE_VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "python/hires_lmm/_version.py").read_text()).group(1)


def _torch():
    try:
        import torch
    except ImportError:
        sys.exit("hires_lmm: install torch first, then `pip install --no-build-isolation .`")
    return torch


def _site_cuda_home():
    for p in map(Path, sys.path):
        cand = p / "nvidia" / "cu13"
        if (cand / "bin" / "nvcc").exists():
            return str(cand)
    return None


def cuda_home():
    """The toolkit to build with, or None for a CPU-only build."""
    torch = _torch()
    if os.environ.get("HIRES_LMM_CUDA", "1") == "0" or torch.version.cuda is None:
        return None
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), _site_cuda_home()):
        if cand and Path(cand, "bin", "nvcc").exists():
            return cand
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME and Path(CUDA_HOME, "bin", "nvcc").exists():
        return CUDA_HOME
    nvcc = shutil.which("nvcc")
    if nvcc:
        return str(Path(nvcc).resolve().parent.parent)
    sys.exit("hires_lmm: torch has CUDA but no nvcc was found; set CUDA_HOME, "
             "`pip install cuda-toolkit[nvcc,cccl]`, or build CPU-only with HIRES_LMM_CUDA=0")


def cuda_arch_list():
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env.replace(" ", ";")
    torch = _torch()
    if torch.cuda.is_available():
        archs = set()
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            archs.add(f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else ""))
        return ";".join(sorted(archs))
    return "8.0;9.0a"


def cutlass_include_dirs():
    env = os.environ.get("HIRES_LMM_CUTLASS_DIR")
    if env:
        return [env]
    try:
        import cutlass_library
    except ImportError:
        return []
    src = Path(cutlass_library.__file__).parent / "source"
    return [str(src / "include"), str(src / "tools" / "util" / "include")]


def local_version():
    torch = _torch()
    tv = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if cuda_home() is None:
        return f"cputorch{tv}"
    cv = torch.version.cuda.replace(".", "")
    return f"cu{cv}torch{tv}"


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        torch = _torch()
        from torch.utils import cpp_extension

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        home = cuda_home()
        cutlass = cutlass_include_dirs()
        args = [
            f"-DHIRES_VERSION={BASE_VERSION}",
            f"-DHIRES_TORCH_VERSION={torch.__version__}",
            "-DHIRES_TORCH_INCLUDE_DIRS=" + ";".join(cpp_extension.include_paths()),
            f"-DHIRES_TORCH_LIBRARY_DIR={Path(torch.__file__).parent / 'lib'}",
            f"-DHIRES_TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DHIRES_PYTHON_INCLUDE_DIR={sysconfig.get_paths()['include']}",
            f"-DHIRES_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
            f"-DHIRES_OUTPUT_DIR={out.parent}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        if shutil.which("ccache"):
            args += ["-DCMAKE_CXX_COMPILER_LAUNCHER=ccache", "-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"]
        if home is not None:
            if not cutlass:
                sys.exit("hires_lmm: CUDA build needs CUTLASS headers: `pip install nvidia-cutlass==4.2.0.0` "
                         "or set HIRES_LMM_CUTLASS_DIR (third_party/README.md)")
            archs = cuda_arch_list()
            args += [
                "-DHIRES_WITH_CUDA=ON",
                f"-DCMAKE_CUDA_COMPILER={Path(home, 'bin', 'nvcc')}",
                f"-DCUDAToolkit_ROOT={home}",
                f"-DHIRES_CUDA_ARCHS={archs}",
                "-DHIRES_CUTLASS_INCLUDE_DIRS=" + ";".join(cutlass),
            ]
            print(f"hires_lmm: CUDA build, toolkit {home}, arches {archs}")
        else:
            args.append("-DHIRES_WITH_CUDA=OFF")
            print("hires_lmm: CPU-only build")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call(["cmake", str(ROOT)] + args, cwd=build_dir)
        subprocess.check_call(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir)


setup(
    version=f"{BASE_VERSION}+{local_version()}",
    ext_modules=[CMakeExtension("hires_lmm._C")],
    cmdclass={"build_ext": CMakeBuild},
)
