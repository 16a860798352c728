"""hires_lmm.models: plain nn.Modules built from frozen configs read from config.json; they call
hires_lmm.ops only, so hires_lmm.set_backend("reference") switches them to the references."""
from .convnext import ConvNeXtBlock, ConvNeXtConfig, ConvNeXtTower, convnext_key_map
from .convllava_preprocess import convllava_preprocess, expand2square
from .llama import KVCache, Llama, LlamaConfig
from .clip import ClipVisionConfig, ClipVisionTower
from .deepstack import deepstack_stacks_from_crops, dilated_stacks, mosaic_crops

__all__ = ["ConvNeXtConfig", "ConvNeXtTower", "ConvNeXtBlock", "convnext_key_map",
           "convllava_preprocess", "expand2square",
           "Llama", "LlamaConfig", "KVCache", "ClipVisionTower", "ClipVisionConfig",
           "dilated_stacks", "mosaic_crops", "deepstack_stacks_from_crops"]
