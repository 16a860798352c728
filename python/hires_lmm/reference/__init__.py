"""hires_lmm.reference: the pure-PyTorch reference of every op (the tests' ground truth and the
backend of set_backend("reference")). Same names and signatures as hires_lmm.ops."""
from .deepstack import *  # noqa: F401,F403
from .deepstack import __all__ as _deepstack_all

__all__ = list(_deepstack_all)
