"""hires_lmm.ops: one thin function per op (torch.ops.hires_lmm.*), each with a fake kernel for
torch.compile and autograd. With set_backend("reference") each calls hires_lmm.reference instead.

Families: deepstack (injection + norms), convnext, attention, select (SliME)."""
from .deepstack import *  # noqa: F401,F403
from .deepstack import __all__ as _deepstack_all

__all__ = list(_deepstack_all)
