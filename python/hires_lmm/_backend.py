"""Which implementation hires_lmm.ops runs: "kernels" (the compiled ops, default) or
"reference" (the pure-PyTorch functions of hires_lmm.reference)."""
import contextlib

_BACKENDS = ("kernels", "reference")
_state = {"backend": "kernels"}


def set_backend(name: str) -> None:
    if name not in _BACKENDS:
        raise ValueError(f"set_backend: argument 'name' must be one of {_BACKENDS}, got {name!r}")
    _state["backend"] = name


def get_backend() -> str:
    return _state["backend"]


def use_reference() -> bool:
    return _state["backend"] == "reference"


@contextlib.contextmanager
def use_backend(name: str):
    """with hires_lmm.use_backend("reference"): ..."""
    old = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)
