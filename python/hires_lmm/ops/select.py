"""select family (see hires_lmm.ops.__init__)."""
__all__ = []
