"""Build hires_lmm: setuptools hands the one extension, hires_lmm._C, to CMake.

    pip install --no-build-isolation .        # next to the torch that will import it
    pip install -v --no-build-isolation .     # the same, showing the compile ([n/m] lines)

Environment:
  HIRES_LMM_CUDA=0        CPU-only build even when torch and nvcc have CUDA.
  TORCH_CUDA_ARCH_LIST    arches, e.g. "8.0+PTX;9.0a" (the default when no GPU is visible) or "8.6+PTX".
  CUDA_HOME               the toolkit; else site-packages/nvidia/cu13 (pip's cuda-toolkit), else torch's guess.
  MAX_JOBS                parallel compile jobs (default: CPU count).
  HIRES_LMM_CUTLASS_DIR   CUTLASS include folder; default: the nvidia-cutlass package (third_party/README.md).
  HIRES_LMM_COMMIT        the commit to record when the source tree is not a git checkout.
  HIRES_LMM_PROGRESS=0    do not echo the compile progress to the terminal (/dev/tty).

What the build records (python/hires_lmm/_build_meta.py, next to _C; read by hires_lmm at import
without loading _C): version, the torch and CUDA it was built against, the arch list, the commit and
whether the tree had uncommitted changes.
"""
import datetime
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
BASE_VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "python/hires_lmm/_version.py").read_text()).group(1)
MIN_CMAKE = (3, 26)
DEFAULT_ARCHS = "8.0+PTX;9.0a"  # sm_80 SASS + compute_80 PTX (runs on newer GPUs by JIT) + Hopper
REBUILD = "pip install --no-build-isolation --force-reinstall --no-deps ."


def _fail(msg):
    sys.exit(f"hires_lmm build: {msg}")


def _torch():
    try:
        import torch
    except ImportError:
        _fail("torch is not installed in this environment. Install the torch you will run with "
              "(e.g. `pip install torch==2.15.0`), then build next to it: `pip install --no-build-isolation .`")
    return torch


def torch_major_minor():
    return ".".join(_torch().__version__.split("+")[0].split(".")[:2])


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
    cuda = torch.version.cuda
    _fail(f"torch {torch.__version__} has CUDA {cuda} but no nvcc was found. Install a matching one "
          f"(`pip install \"cuda-toolkit[nvcc,cccl]=={cuda}.*\"`), set CUDA_HOME, or build CPU-only with HIRES_LMM_CUDA=0")


def nvcc_version(home):
    out = subprocess.run([str(Path(home, "bin", "nvcc")), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


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
    return DEFAULT_ARCHS


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
    if cuda_home() is None:
        return f"cputorch{torch_major_minor()}"
    return f"cu{torch.version.cuda.replace('.', '')}torch{torch_major_minor()}"


def install_requires():
    """Run-time dependencies. torch is pinned to the major.minor this build compiles against: the
    extension uses torch's C++ ABI, which changes between minor versions."""
    tv = torch_major_minor()
    major, minor = (int(x) for x in tv.split("."))
    return [f"torch>={tv},<{major}.{minor + 1}", "numpy", "safetensors", "pillow", "tokenizers",
            "sentencepiece", "tqdm"]


# ---- build tools: the build environment's own, checked up front ---------------------------------

def _tool_candidates(name, module_dir_attr):
    """`name` from its Python package (cmake.CMAKE_BIN_DIR, ninja.BIN_DIR), then next to this
    Python (a venv's bin/ even when the venv is not activated), then PATH."""
    cands = []
    mod, attr = module_dir_attr
    try:
        d = getattr(__import__(mod), attr)
        cands.append(Path(d) / name)
    except Exception:
        pass
    cands.append(Path(sys.executable).parent / name)
    which = shutil.which(name)
    if which:
        cands.append(Path(which))
    seen, out = set(), []
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK) and str(c) not in seen:
            seen.add(str(c))
            out.append(str(c))
    return out


def _cmake_version(exe):
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60).stdout
    except Exception:
        return None
    m = re.search(r"version (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def find_cmake():
    found = []
    for exe in _tool_candidates("cmake", ("cmake", "CMAKE_BIN_DIR")):
        v = _cmake_version(exe)
        found.append(f"{exe} {'.'.join(map(str, v)) if v else '(unknown version)'}")
        if v and v >= MIN_CMAKE:
            return exe
    _fail(f"CMake >= {'.'.join(map(str, MIN_CMAKE))} is needed (found: {', '.join(found) or 'none'}); "
          f"`{sys.executable} -m pip install \"cmake>=3.26\"` into this environment")


def find_ninja():
    cands = _tool_candidates("ninja", ("ninja", "BIN_DIR"))
    if not cands:
        _fail(f"ninja is needed; `{sys.executable} -m pip install ninja` into this environment")
    return cands[0]


def check_requirements(home):
    """Everything the build needs, checked before CMake runs, each with what to install."""
    torch = _torch()
    from torch.utils import cpp_extension
    if not any(Path(p, "pybind11", "pybind11.h").exists() for p in cpp_extension.include_paths()):
        try:
            import pybind11  # noqa: F401
        except ImportError:
            _fail("pybind11 headers are needed (torch's include folder has none): `pip install pybind11`")
    cmake, ninja = find_cmake(), find_ninja()
    if home is None:
        return cmake, ninja
    nv = nvcc_version(home)
    want = int(torch.version.cuda.split(".")[0])
    if nv is None or nv[0] != want:
        _fail(f"torch {torch.__version__} is built with CUDA {torch.version.cuda} but nvcc at {home}/bin is "
              f"CUDA {'.'.join(map(str, nv)) if nv else '(unknown)'}; the major versions must match. "
              f"`pip install \"cuda-toolkit[nvcc,cccl]=={torch.version.cuda}.*\"`, set CUDA_HOME to a CUDA {want} "
              f"toolkit, or build CPU-only with HIRES_LMM_CUDA=0")
    cutlass = cutlass_include_dirs()
    if not cutlass or not any(Path(d, "cutlass", "cutlass.h").exists() for d in cutlass):
        _fail("the CUDA build needs the CUTLASS headers: `pip install nvidia-cutlass==4.2.0.0`, or set "
              "HIRES_LMM_CUTLASS_DIR to a CUTLASS include folder (third_party/README.md), or build CPU-only "
              "with HIRES_LMM_CUDA=0")
    return cmake, ninja


# ---- provenance ---------------------------------------------------------------------------------

def git_commit():
    """(commit, dirty) of the source tree at build time; dirty means tracked files differ from it."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        top = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, check=True).stdout.strip()
        if Path(top).resolve() != ROOT:  # some enclosing repository, not ours
            raise RuntimeError
        status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True).stdout
        return commit, bool(status.strip())
    except Exception:
        return os.environ.get("HIRES_LMM_COMMIT", "unknown"), None


def write_build_meta(pkg_dir, home, archs):
    torch = _torch()
    commit, dirty = git_commit()
    nv = nvcc_version(home) if home else None
    meta = {
        "version": f"{BASE_VERSION}+{local_version()}",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,          # CUDA of the torch built against (None: CPU torch)
        "cuda": ".".join(map(str, nv)) if nv else None,  # nvcc used; None for a CPU-only build
        "arch_list": archs,                        # TORCH_CUDA_ARCH_LIST as built (None: CPU-only)
        "commit": commit,
        "dirty": dirty,                            # None when unknown (no git checkout)
        "built_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    text = ('"""Written by setup.py when _C was built; read by hires_lmm at import (without loading _C)."""\n'
            f"BUILD_META = {meta!r}\n")
    Path(pkg_dir).mkdir(parents=True, exist_ok=True)
    Path(pkg_dir, "_build_meta.py").write_text(text)
    return meta


# ---- progress -------------------------------------------------------------------------------------

def _tty():
    """The terminal, when the build's own output is captured (pip without -v) and one exists."""
    if os.environ.get("HIRES_LMM_PROGRESS", "1") == "0" or sys.stderr.isatty():
        return None
    try:
        return open("/dev/tty", "w")
    except OSError:
        return None


def run_build(cmd, cwd):
    """Run the build, passing its output through and echoing ninja's [n/m] lines to stderr and, when
    pip captures both (no -v), to the terminal."""
    tty = _tty()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in proc.stdout:
        m = re.match(r"\[(\d+)/(\d+)\] (.*)", line)
        if m:
            el = int(time.monotonic() - t0)
            what = re.sub(r"^(Building \w+ object|Linking \w+ \w+ library) ", "", m.group(3)).replace("CMakeFiles/", "")
            msg = f"hires_lmm build [{m.group(1)}/{m.group(2)}] {el // 60}m{el % 60:02d}s {what}"
            print(msg, file=sys.stderr, flush=True)
            if tty is not None:
                try:
                    tty.write("\r" + msg[:160] + "\n")  # \r: over pip's spinner
                    tty.flush()
                except OSError:
                    tty = None
        else:
            sys.stdout.write(line)
            sys.stdout.flush()
    rc = proc.wait()
    if rc:
        raise subprocess.CalledProcessError(rc, cmd)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        torch = _torch()
        from torch.utils import cpp_extension

        home = cuda_home()
        cmake, ninja = check_requirements(home)
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DHIRES_VERSION={BASE_VERSION}+{local_version()}",
            f"-DHIRES_TORCH_VERSION={torch.__version__}",
            "-DHIRES_TORCH_INCLUDE_DIRS=" + ";".join(cpp_extension.include_paths()),
            f"-DHIRES_TORCH_LIBRARY_DIR={Path(torch.__file__).parent / 'lib'}",
            f"-DHIRES_TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DHIRES_PYTHON_INCLUDE_DIR={sysconfig.get_paths()['include']}",
            f"-DHIRES_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
            f"-DHIRES_OUTPUT_DIR={out.parent}",
            "-DCMAKE_BUILD_TYPE=Release",
            "-GNinja",
        ]
        # A build folder keeps the ninja it was configured with (another ninja would rebuild everything).
        cache = build_dir / "CMakeCache.txt"
        cached = re.search(r"^CMAKE_MAKE_PROGRAM:\w+=(.*)$", cache.read_text(), re.M) if cache.exists() else None
        if not (cached and Path(cached.group(1).strip()).is_file()):
            args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        if shutil.which("ccache"):
            args += ["-DCMAKE_CXX_COMPILER_LAUNCHER=ccache", "-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"]
        archs = None
        if home is not None:
            archs = cuda_arch_list()
            args += [
                "-DHIRES_WITH_CUDA=ON",
                f"-DCMAKE_CUDA_COMPILER={Path(home, 'bin', 'nvcc')}",
                f"-DCUDAToolkit_ROOT={home}",
                f"-DHIRES_CUDA_ARCHS={archs}",
                "-DHIRES_CUTLASS_INCLUDE_DIRS=" + ";".join(cutlass_include_dirs()),
            ]
            print(f"hires_lmm: CUDA build, toolkit {home}, arches {archs}; cmake {cmake}", file=sys.stderr)
        else:
            args.append("-DHIRES_WITH_CUDA=OFF")
            print(f"hires_lmm: CPU-only build; cmake {cmake}", file=sys.stderr)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call([cmake, str(ROOT)] + args, cwd=build_dir)
        run_build([cmake, "--build", ".", "--parallel", jobs], cwd=build_dir)
        write_build_meta(out.parent, home, archs)
        self._meta_dir = out.parent

    def copy_extensions_to_source(self):
        # --inplace / editable: setuptools builds into build/lib* and copies only _C into the source
        # tree; the build metadata must travel with it.
        super().copy_extensions_to_source()
        src = getattr(self, "_meta_dir", None)
        if src is not None:
            shutil.copyfile(Path(src, "_build_meta.py"), ROOT / "python" / "hires_lmm" / "_build_meta.py")


setup(
    version=f"{BASE_VERSION}+{local_version()}",
    install_requires=install_requires(),
    ext_modules=[CMakeExtension("hires_lmm._C")],
    cmdclass={"build_ext": CMakeBuild},
)
