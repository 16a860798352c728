"""Build metadata, read at import before the compiled extension is loaded.

setup.py writes ``hires_lmm/_build_meta.py`` next to ``_C`` when it builds it: the version, the torch
and CUDA it was compiled against, the arch list, the commit and a dirty flag. A ``_C`` built for
another torch may not load at all (missing or mismatched ``libc10*.so`` symbols), so the torch check
runs on that file, in pure Python, first.
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any, Dict, Optional

REBUILD_COMMAND = "pip install --no-build-isolation --force-reinstall --no-deps ."
PACKAGE_DIR = Path(__file__).resolve().parent


def load_build_meta() -> Optional[Dict[str, Any]]:
    """The metadata recorded when ``_C`` was built, or None (a source tree whose ``_C`` came from
    elsewhere, or a build by an older setup.py)."""
    try:
        from ._build_meta import BUILD_META  # type: ignore[import-not-found]
    except ImportError:
        return None
    return dict(BUILD_META)


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _describe(torch_version: str, cuda: Optional[str]) -> str:
    return f"torch {torch_version} ({'CUDA ' + cuda if cuda else 'no CUDA'})"


def torch_mismatch_error(meta: Dict[str, Any], torch_version: str, torch_cuda: Optional[str]) -> Optional[str]:
    """One line when the running torch is not the one ``_C`` was built for, else None.

    A mismatch is a different torch major.minor (the C++ ABI changes between them), or, for a build
    with CUDA kernels, a running torch without CUDA or with another CUDA major version (``_C`` links
    ``libc10_cuda`` and ``libcudart.so.<major>``)."""
    built_torch = meta.get("torch") or "?"
    built_cuda = meta.get("torch_cuda") or meta.get("cuda")
    bad = _major_minor(built_torch) != _major_minor(torch_version)
    if meta.get("cuda") is not None:  # the extension holds CUDA kernels
        if torch_cuda is None or torch_cuda.split(".")[0] != str(built_cuda).split(".")[0]:
            bad = True
    if not bad:
        return None
    return (f"hires_lmm {meta.get('version', '?')} was built for {_describe(built_torch, built_cuda)} but "
            f"{_describe(torch_version, torch_cuda)} is installed; rebuild it against the installed torch, "
            f"from the hires_lmm source folder: {REBUILD_COMMAND}")


def resolve_version(meta: Optional[Dict[str, Any]], base: str, package_dir: Path = PACKAGE_DIR) -> str:
    """``__version__``: the installed distribution's version when this package is that
    distribution's, else the version recorded at build time (source tree, editable install), else
    the base version of ``_version.py``."""
    try:
        dist = importlib.metadata.distribution("hires_lmm")
        if Path(str(dist.locate_file("hires_lmm/__init__.py"))).resolve() == (package_dir / "__init__.py").resolve():
            return dist.version
    except importlib.metadata.PackageNotFoundError:
        pass
    if meta and meta.get("version"):
        return str(meta["version"])
    return base
