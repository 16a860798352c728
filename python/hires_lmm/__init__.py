"""hires_lmm: hand-written CUDA kernels behind a thin PyTorch API for high-resolution LMMs.

    import hires_lmm
    hires_lmm.build_info()               # version, torch, CUDA, arches, commit, kernels per device
    hires_lmm.ops.deepstack_inject_rms_norm(hidden, embeds, index, weight, 1e-6)
    hires_lmm.set_backend("reference")   # every op -> its PyTorch reference (hires_lmm.reference)
    hires_lmm.accelerate(hf_model)       # our kernels inside a Hugging Face transformers model

Command line: ``hires-lmm info | bench | convert | generate`` (or ``python -m hires_lmm``).
"""
import logging
from typing import Any, Dict

import torch  # loads libtorch, libc10(_cuda) and cudart: _C has no RUNPATH and relies on them

from . import _build
from ._version import __version__ as _base_version

logging.getLogger(__name__).addHandler(logging.NullHandler())

_BUILD_META = _build.load_build_meta()
if _BUILD_META is not None:
    _mismatch = _build.torch_mismatch_error(_BUILD_META, torch.__version__, torch.version.cuda)
    if _mismatch:
        raise ImportError(_mismatch)

try:
    from . import _C
except ImportError as _e:  # no build metadata to compare with, or a broken build
    raise ImportError(f"hires_lmm: the compiled extension hires_lmm._C does not load ({_e}); build it against the "
                      f"installed torch {torch.__version__}, from the hires_lmm source folder: "
                      f"{_build.REBUILD_COMMAND}") from _e

__version__: str = _build.resolve_version(_BUILD_META, _base_version)

from ._backend import get_backend, set_backend, use_backend  # noqa: E402
from . import reference, ops  # noqa: E402
from .accelerate import accelerate  # noqa: E402
from .checkpoint import CheckpointError  # noqa: E402
from .lmm import load  # noqa: E402  (HiResLMM.from_pretrained, shorter)
from .accelerate import register_attention_with_transformers as _reg; _reg()  # noqa: E702


def build_info() -> Dict[str, Any]:
    """What this build holds.

    Returns a dict: ``version`` (== ``hires_lmm.__version__``), ``torch`` (the torch it was built
    against), ``torch_cuda`` (that torch's CUDA, None for a CPU torch), ``cuda`` (the nvcc version of
    the CUDA kernels; None for a CPU-only build), ``arch_list`` (``TORCH_CUDA_ARCH_LIST`` as built),
    ``cuda_archs`` (machine code: ``sm_XY``), ``ptx_archs`` (``compute_XY`` PTX the driver can JIT for
    newer GPUs), ``sm90a_kernels``,
    ``kernels`` ({op: [devices]}), and the provenance recorded at build time: ``commit``, ``dirty``
    (tracked files differed from the commit; None if unknown) and ``built_at`` (UTC).
    """
    info: Dict[str, Any] = dict(_C.build_info())
    meta = _BUILD_META or {}
    info["version"] = __version__
    info["torch_cuda"] = meta.get("torch_cuda")
    info["arch_list"] = meta.get("arch_list")
    info["commit"] = meta.get("commit", "unknown")
    info["dirty"] = meta.get("dirty")
    info["built_at"] = meta.get("built_at")
    return info


def set_value_checks(enabled: bool) -> None:
    """Turn on/off the argument checks that read tensor values on the host (index ranges and
    order; one device->host sync each, about 10-30 us on a GPU). On by default; they are skipped
    by themselves while a CUDA graph is being captured."""
    _C.set_value_checks(bool(enabled))


def value_checks() -> bool:
    """Whether the value checks of :func:`set_value_checks` are on."""
    return bool(_C.value_checks())


__all__ = ["accelerate", "load", "CheckpointError", "build_info", "set_backend", "get_backend",
           "use_backend", "set_value_checks", "value_checks", "ops", "reference", "__version__"]
