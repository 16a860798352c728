"""hires_lmm.lmm: whole models of released checkpoints (one file per family) and the loader
that picks the family from config.json (auto.py)."""
from .base import HiResLMM
from .convllava import ConvLLaVA, ConvLLaVAConfig
from .deepstack_vl import DeepStackConfig, DeepStackVL
from .slime import SliME, SliMEModelConfig
from .auto import FAMILIES, detect_family, from_pretrained, load

__all__ = ["HiResLMM", "ConvLLaVA", "ConvLLaVAConfig", "DeepStackVL", "DeepStackConfig",
           "SliME", "SliMEModelConfig",
           "FAMILIES", "detect_family", "from_pretrained", "load"]
