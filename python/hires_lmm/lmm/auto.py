"""config.json -> family -> whole model: `HiResLMM.from_pretrained(path)` / `hires_lmm.load(path)`.

The family is read from config.json's fields, never from the folder name:
  ConvLLaVA  "model_type": "llava" (or "llava_llama") with "mm_vision_tower" naming a ConvNeXt
             tower, "mm_projector_type": "mlp2x_gelu", "mm_hidden_size" (specs/convllava.md 3).
  DeepStack  "model_type": "deepstack_llama", or "image_aspect_ratio": "deepstack" with an
             "mm_vision_tower" (specs/deepstack.md 1-2; -L, -L-HD via is_anyres_deepstack, -V
             via deepstack_args_for_ablation "deepstack_vit").
  SliME      "model_type": "llava_llama" (or "llava") with "mm_projector_type": "gated"
             (specs/slime.md 6.1).
Any other config raises one error that says what was found and which families are supported.
"""
import os
from pathlib import Path

import torch

from ..models._weights import read_config
from .convllava import ConvLLaVA, is_convllava_config
from .deepstack_vl import DeepStackVL, is_deepstack_config
from .slime import SliME, is_slime_config

__all__ = ["FAMILIES", "detect_family", "from_pretrained", "load"]

# name -> (predicate on config.json, class, what the config must hold)
FAMILIES = {
    "convllava": (is_convllava_config, ConvLLaVA,
                  "ConvLLaVA: model_type 'llava' with mm_vision_tower naming a ConvNeXt tower, "
                  "mm_projector_type 'mlp2x_gelu' and mm_hidden_size"),
    "deepstack": (is_deepstack_config, DeepStackVL,
                  "DeepStack: model_type 'deepstack_llama' or image_aspect_ratio 'deepstack' with "
                  "mm_vision_tower"),
    "slime": (is_slime_config, SliME,
              "SliME: model_type 'llava_llama' with mm_projector_type 'gated'"),
}


def detect_family(config: dict, where: str = "hires_lmm.load") -> str:
    for name, (pred, _, _) in FAMILIES.items():
        if pred(config):
            return name
    found = {k: config.get(k) for k in ("model_type", "architectures", "mm_vision_tower",
                                        "mm_projector_type", "mm_hidden_size",
                                        "image_aspect_ratio") if k in config}
    supported = "; ".join(desc for _, _, desc in FAMILIES.values())
    raise ValueError(f"{where}: config.json is of no supported family: found {found or 'none of model_type, architectures, mm_*'}; "
                     f"supported: {supported}")


_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
           "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
           "float32": torch.float32, "float": torch.float32}


def from_pretrained(path, vision_tower=None, dtype=None, device=None, **kw):
    """Load a released checkpoint folder as its whole model (see the family classes for kw).
    dtype: a torch floating dtype or its name ("bf16", "fp16", "fp32"); None keeps the
    checkpoint's."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"hires_lmm.load: argument 'dtype' must be one of {sorted(_DTYPES)} or a "
                             f"torch dtype, got {dtype!r}")
        dtype = _DTYPES[dtype]
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"hires_lmm.load: argument 'dtype' must be a floating torch dtype, got {dtype!r}")
    p = Path(os.fspath(path))
    if not p.is_dir():
        raise FileNotFoundError(f"hires_lmm.load: argument 'path' is not a folder: {p}")
    family = detect_family(read_config(str(p)))
    cls = FAMILIES[family][1]
    return cls.from_pretrained(p, vision_tower=vision_tower, dtype=dtype, device=device, **kw)


def load(path, vision_tower=None, dtype=None, device=None, **kw):
    """hires_lmm.load(path, vision_tower=None, dtype=None, device=None, ...) =
    HiResLMM.from_pretrained: the whole model of a released checkpoint folder, ready for
    .chat(image, question) and .generate(images, prompts)."""
    return from_pretrained(path, vision_tower=vision_tower, dtype=dtype, device=device, **kw)
