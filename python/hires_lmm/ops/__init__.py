"""hires_lmm.ops: one thin function per op (torch.ops.hires_lmm.*), each with a fake kernel for
torch.compile and autograd. With set_backend("reference") each calls hires_lmm.reference instead.

Families: deepstack (injection + norms), convnext, attention, select (SliME)."""
from .deepstack import *  # noqa: F401,F403
from .convnext import *  # noqa: F401,F403
from .attention import *  # noqa: F401,F403
from .select import *  # noqa: F401,F403
from . import deepstack as _ds, convnext as _cn, attention as _at, select as _se

__all__ = [n for m in (_ds, _cn, _at, _se) for n in m.__all__]
