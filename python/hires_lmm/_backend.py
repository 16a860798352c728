"""Which implementation hires_lmm.ops runs: "kernels" (the compiled ops, default) or
"reference" (the pure-PyTorch functions of hires_lmm.reference)."""
import contextlib
from typing import Iterator

_BACKENDS = ("kernels", "reference")
_state = {"backend": "kernels"}


def set_backend(name: str) -> None:
    """Switch every op in ``hires_lmm.ops`` (and every model built on them) to ``name``:
    ``"kernels"`` (the compiled CPU/CUDA kernels, the default) or ``"reference"`` (the fp32
    PyTorch references of ``hires_lmm.reference``). Process-wide, not thread-local.

    Raises ValueError naming the valid backends for any other name."""
    if name not in _BACKENDS:
        raise ValueError(f"set_backend: argument 'name' must be one of {_BACKENDS}, got {name!r}")
    _state["backend"] = name


def get_backend() -> str:
    """The backend ``hires_lmm.ops`` runs now: ``"kernels"`` or ``"reference"``."""
    return _state["backend"]


def use_reference() -> bool:
    """True when the ops should call their PyTorch reference (internal helper of ``hires_lmm.ops``)."""
    return _state["backend"] == "reference"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with another backend and restore the previous one afterwards, even on error::

        with hires_lmm.use_backend("reference"):
            expected = model(x)
    """
    old = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)
