"""hires_lmm.models: plain nn.Modules built from checkpoint configs; every op through hires_lmm.ops."""
from .llama import Llama, LlamaConfig, KVCache  # noqa: F401
from .clip import ClipVisionTower, ClipVisionConfig  # noqa: F401
from .deepstack import dilated_stacks, mosaic_crops, deepstack_stacks_from_crops  # noqa: F401

__all__ = ["Llama", "LlamaConfig", "KVCache", "ClipVisionTower", "ClipVisionConfig",
           "dilated_stacks", "mosaic_crops", "deepstack_stacks_from_crops"]
