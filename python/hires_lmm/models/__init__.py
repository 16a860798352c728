"""hires_lmm.models: plain nn.Modules of the three families, built on hires_lmm.ops."""
from .slime import (anyres_grid, resize_and_pad_image, slice_image, get_2d_sincos_pos_embed,  # noqa: F401
                    resize_pos_embed, Resampler, GatedAdapters, SliMEConfig, SliMEVisual, raster_order)
