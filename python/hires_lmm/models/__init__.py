"""hires_lmm.models: plain nn.Modules built from frozen configs read from config.json; they call
hires_lmm.ops only, so hires_lmm.set_backend("reference") switches them to the references."""
from .convnext import ConvNeXtBlock, ConvNeXtConfig, ConvNeXtTower, convnext_key_map
from .convllava_preprocess import convllava_preprocess, expand2square
from .llama import KVCache, Llama, LlamaConfig
from .clip import ClipVisionConfig, ClipVisionTower
from .deepstack import deepstack_stacks_from_crops, dilated_stacks, mosaic_crops
from .slime import (GatedAdapters, Resampler, SliMEConfig, SliMEVisual, anyres_grid,
                    get_2d_sincos_pos_embed, raster_order, resize_and_pad_image, resize_pos_embed,
                    slice_image)

__all__ = ["ConvNeXtConfig", "ConvNeXtTower", "ConvNeXtBlock", "convnext_key_map",
           "convllava_preprocess", "expand2square",
           "Llama", "LlamaConfig", "KVCache", "ClipVisionTower", "ClipVisionConfig",
           "dilated_stacks", "mosaic_crops", "deepstack_stacks_from_crops",
           "anyres_grid", "resize_and_pad_image", "slice_image", "get_2d_sincos_pos_embed",
           "resize_pos_embed", "Resampler", "GatedAdapters", "SliMEConfig", "SliMEVisual",
           "raster_order"]
