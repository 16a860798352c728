"""convnext family (see hires_lmm.reference.__init__)."""
__all__ = []
