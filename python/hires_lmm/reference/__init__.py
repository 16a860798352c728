"""hires_lmm.reference: the pure-PyTorch reference of every op (the tests' ground truth and the
backend of set_backend("reference")). Same names and signatures as hires_lmm.ops."""
from .deepstack import *  # noqa: F401,F403
from .convnext import *  # noqa: F401,F403
from .attention import *  # noqa: F401,F403
from .select import *  # noqa: F401,F403
from . import deepstack as _ds, convnext as _cn, attention as _at, select as _se

__all__ = [n for m in (_ds, _cn, _at, _se) for n in m.__all__]
