"""hires_lmm: hand-written CUDA kernels behind a thin PyTorch API for high-resolution LMMs.

    import hires_lmm
    hires_lmm.build_info()               # version, torch, CUDA, arches, kernels per device
    hires_lmm.ops.deepstack_inject_rms_norm(hidden, embeds, index, weight, 1e-6)
    hires_lmm.set_backend("reference")   # every op -> its PyTorch reference (hires_lmm.reference)
    hires_lmm.accelerate(hf_model)       # our kernels inside a Hugging Face transformers model
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C
from ._version import __version__
from ._backend import get_backend, set_backend, use_backend
from . import reference, ops  # noqa: E402
from .accelerate import accelerate  # noqa: E402
from .checkpoint import CheckpointError  # noqa: E402
from .lmm import load  # noqa: E402  (HiResLMM.from_pretrained, shorter)
from .accelerate import register_attention_with_transformers as _reg; _reg()  # noqa: E702


def build_info() -> dict:
    """What this build holds: {"version", "torch", "cuda" (None for CPU-only), "cuda_archs",
    "sm90a_kernels", "kernels": {op: [devices]}}."""
    return _C.build_info()


def set_value_checks(enabled: bool) -> None:
    """Turn on/off the argument checks that read tensor values on the host (index ranges and
    order; one device->host sync each, about 10-30 us on a GPU). On by default; they are skipped
    by themselves while a CUDA graph is being captured."""
    _C.set_value_checks(bool(enabled))


__all__ = ["accelerate", "load", "CheckpointError", "build_info", "set_backend", "get_backend", "use_backend", "set_value_checks", "ops",
           "reference", "__version__"]
