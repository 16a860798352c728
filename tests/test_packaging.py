"""Packaging: build metadata, the import-time torch check, arch coverage, version, the CLI."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hires_lmm
from hires_lmm import _build, cli

PKG = Path(hires_lmm.__file__).resolve().parent


# ---- arch coverage: the pure function the first CUDA call on each device uses -----------------

@pytest.mark.parametrize("cap, archs", [
    ((8, 0), ["sm_80"]),
    ((8, 6), ["sm_80"]),                      # SASS runs on a newer minor of the same major
    ((8, 9), ["sm_80", "sm_90a"]),
    ((9, 0), ["sm_90a"]),
    ((9, 0), ["sm_80", "compute_80"]),        # PTX: JIT-compiled for any newer capability
    ((12, 0), ["sm_80", "compute_80", "sm_90a"]),
    ((10, 0), ["sm_100f"]), ((10, 3), ["sm_100f"]),
])
def test_arch_covered(cap, archs):
    assert cli.arch_coverage_error(cap, archs) is None


@pytest.mark.parametrize("cap, archs, suggest", [
    ((9, 0), ["sm_80"], "9.0a"),              # SASS does not cross major versions
    ((7, 5), ["sm_80", "compute_80"], "7.5"),  # PTX does not run on an older GPU
    ((8, 6), ["sm_90a"], "8.6"),
    ((10, 0), ["sm_90a", "compute_90a"], "10.0"),  # arch-specific code runs only on exactly 9.0
    ((8, 0), ["sm_86"], "8.0"),
    ((9, 0), [], "9.0a"),
])
def test_arch_not_covered_message(cap, archs, suggest):
    msg = cli.arch_coverage_error(cap, archs)
    assert msg is not None
    assert f"compute capability {cap[0]}.{cap[1]}" in msg
    assert (", ".join(archs) if archs else "CPU-only") in msg
    assert f'TORCH_CUDA_ARCH_LIST="{suggest}" pip install --no-build-isolation' in msg
    assert "no kernel image" not in msg


# ---- the import-time torch check --------------------------------------------------------------

META = {"version": "0.1.0+cu132torch2.15", "torch": "2.15.0+cu132", "torch_cuda": "13.2", "cuda": "13.2",
        "arch_list": "8.0+PTX;9.0a", "commit": "abc", "dirty": False, "built_at": "2026-01-01T00:00:00Z"}


def test_torch_mismatch_logic():
    assert _build.torch_mismatch_error(META, "2.15.1+cu132", "13.2") is None
    assert _build.torch_mismatch_error(META, "2.15.0+cu130", "13.0") is None  # same CUDA major: same libcudart.so.13
    msg = _build.torch_mismatch_error(META, "2.13.0+cpu", None)
    assert msg == ("hires_lmm 0.1.0+cu132torch2.15 was built for torch 2.15.0+cu132 (CUDA 13.2) but torch 2.13.0+cpu "
                   "(no CUDA) is installed; rebuild it against the installed torch, from the hires_lmm source "
                   "folder: pip install --no-build-isolation --force-reinstall --no-deps .")
    assert "\n" not in msg
    assert "CUDA 12.8" in _build.torch_mismatch_error(META, "2.15.0+cu128", "12.8")
    assert "no CUDA" in _build.torch_mismatch_error(META, "2.15.0", None)  # CUDA kernels, CPU torch
    cpu = dict(META, torch_cuda=None, cuda=None, version="0.1.0+cputorch2.13", torch="2.13.0+cpu")
    assert _build.torch_mismatch_error(cpu, "2.13.0+cu132", "13.2") is None  # a CPU build runs on a CUDA torch
    assert "torch 2.13.0+cpu (no CUDA)" in _build.torch_mismatch_error(cpu, "2.14.0", None)


def test_import_with_mismatched_build_meta_says_so(tmp_path):
    """A copy of the package whose build metadata names another torch fails at import with one line
    naming both torches and the rebuild command (before _C is touched: the copy has no _C)."""
    dst = tmp_path / "hires_lmm"
    shutil.copytree(PKG, dst, ignore=shutil.ignore_patterns("_C*.so", "__pycache__", "_build_meta.py"))
    fake = dict(META, torch="2.1.0+cu121", torch_cuda="12.1", cuda="12.1", version="0.1.0+cu121torch2.1")
    (dst / "_build_meta.py").write_text(f"BUILD_META = {fake!r}\n")
    r = subprocess.run([sys.executable, "-c", "import hires_lmm"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: hires_lmm 0.1.0+cu121torch2.1 was built for torch 2.1.0+cu121 (CUDA 12.1) "
                           f"but torch {torch.__version__} ")
    assert last.endswith("pip install --no-build-isolation --force-reinstall --no-deps .")


# ---- version and build info ---------------------------------------------------------------------

def test_version_is_the_distributions(monkeypatch, tmp_path):
    import importlib.metadata as md
    info = hires_lmm.build_info()
    assert info["version"] == hires_lmm.__version__
    meta = _build.load_build_meta()
    try:
        dist = md.distribution("hires_lmm")
        installed_here = Path(str(dist.locate_file("hires_lmm/__init__.py"))).resolve() == PKG / "__init__.py"
    except md.PackageNotFoundError:
        installed_here = False
    if installed_here:
        assert hires_lmm.__version__ == md.version("hires_lmm")
    if meta is not None:  # built by setup.py: the version it computed, the one the wheel carries
        assert hires_lmm.__version__ == meta["version"]

    class FakeDist:
        version = "9.9.9+cu999torch9.9"

        def __init__(self, root):
            self.root = root

        def locate_file(self, p):
            return self.root / p

    monkeypatch.setattr(md, "distribution", lambda name: FakeDist(PKG.parent))
    assert _build.resolve_version(META, "0.0.1", PKG) == "9.9.9+cu999torch9.9"  # the installed dist is us
    monkeypatch.setattr(md, "distribution", lambda name: FakeDist(tmp_path))
    assert _build.resolve_version(META, "0.0.1", PKG) == META["version"]      # another install: not ours
    assert _build.resolve_version(None, "0.0.1", PKG) == "0.0.1"


def test_build_info_fields():
    info = hires_lmm.build_info()
    for key in ("version", "torch", "torch_cuda", "cuda", "arch_list", "cuda_archs", "ptx_archs", "sm90a_kernels", "kernels",
                "commit", "dirty", "built_at"):
        assert key in info
    if info["cuda"] is not None:
        assert info["cuda_archs"] and all(re.fullmatch(r"sm_\d+[af]?", a) for a in info["cuda_archs"])
        assert all(re.fullmatch(r"compute_\d+[af]?", a) for a in info["ptx_archs"])


def test_extension_has_no_runpath_into_the_build_environment():
    so = Path(hires_lmm._C.__file__)
    out = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout
    paths = [ln for ln in out.splitlines() if "RPATH" in ln or "RUNPATH" in ln]
    for ln in paths:
        for p in re.search(r"\[(.*)\]", ln).group(1).split(":"):
            assert p.startswith("$ORIGIN"), f"{so.name} has a RUNPATH into the build environment: {p}"


# ---- the CLI -------------------------------------------------------------------------------------

def test_cli_info_text(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    info = hires_lmm.build_info()
    assert out.startswith(f"hires_lmm {hires_lmm.__version__}\n")
    assert f"built from commit  {info['commit']}" in out
    assert f"built against      torch {info['torch']}" in out
    assert f"running with       torch {torch.__version__}" in out
    if info["cuda"]:
        assert ", ".join(info["cuda_archs"]) in out
    else:
        assert "none (CPU-only build)" in out
    for op, devs in info["kernels"].items():
        assert re.search(rf"^  {op} +{re.escape(', '.join(devs))}$", out, re.M)


def test_cli_module_info_json():
    r = subprocess.run([sys.executable, "-m", "hires_lmm", "info", "--json"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(PKG.parent)})
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout)
    assert d["build"]["version"] == hires_lmm.__version__
    assert d["running_torch"] == torch.__version__
    assert isinstance(d["devices"], list)


def test_cli_forwards_and_errors(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--only", "deepstak"])
    assert e.value.code == 2 and "hires-lmm bench: error: --only" in capsys.readouterr().err
    assert cli.main(["convert", str(Path("/nonexistent/x.bin")), "/tmp/y.safetensors"]) == 2
    monkeypatch.setattr(cli, "GENERATE_MODULE", "hires_lmm.lmm._missing_cli_generate_for_test")
    assert cli.main(["generate", "--help"]) == 2
    assert "not available in this install" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2
    capsys.readouterr()
    assert cli.main([]) == 2
    usage = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in usage


def test_public_api_has_docstrings():
    for name in hires_lmm.__all__:
        obj = getattr(hires_lmm, name)
        if callable(obj):
            assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name
