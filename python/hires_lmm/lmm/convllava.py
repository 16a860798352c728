"""ConvLLaVA as released (specs/convllava.md): image -> answer, through hires_lmm's kernels.

    model = hires_lmm.load("ConvLLaVA-sft-1536", vision_tower="ConvLLaVA-ConvNeXt-1536",
                           dtype=torch.bfloat16, device="cuda")
    model.chat(Image.open("invoice.png"), "What is the total amount?", temperature=0)

Forward pass, top to bottom (spec section numbers):
  1.6  pad to a square with the CLIP mean colour, bicubic resize to the tower's resolution N,
       1/255, CLIP mean/std                                 (models.convllava_preprocess)
  1.2  ConvNeXt-L + 5th stage (depths 3,3,27,3,6; widths 192..3072), every LN eps 1e-6
  1.5  the stage-5 map as (N/64)^2 raster tokens (576 at 1536 px), no norm after the tower
  3.1  mlp2x_gelu projector: Linear(3072 -> 4096), exact-erf GELU, Linear(4096 -> 4096)
  3.3  the vicuna_v1 prompt, tokenizer_image_token, each -200 replaced by the image's rows
  3.2  Vicuna-7B (hires_lmm.models.Llama): packed prefill, batched decode (hires_lmm.generation)

Checkpoint (3.4), as published: config.json ("model_type": "llava" + mm_* fields),
pytorch_model-0000N-of-0000M.bin + pytorch_model.bin.index.json (read with
torch.load(weights_only=True), memory-mapped) or safetensors (single or sharded with its index),
tokenizer.model, tokenizer_config.json, special_tokens_map.json, generation_config.json.
Key map:
  model.embed_tokens / model.layers.* / model.norm / lm_head  -> llm.*   (models.llama._llama_key)
  model.mm_projector.{0,2}.{weight,bias}                      -> mm_projector.{0,2}.*
  model.vision_tower.vision_tower.<HF ConvNextModel names>    -> vision_tower.* (models.convnext)
  *.rotary_emb.inv_freq, the tower's pooled-output layernorm.* -> ignored
The tower comes from those keys when the LLM checkpoint has them, else from the folder the user
passes as vision_tower= (the local copy of the hub repo that config.json's mm_vision_tower
names; nothing is downloaded).
"""
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..checkpoint import open_checkpoint
from ..models._weights import read_config
from ..models.convllava_preprocess import convllava_preprocess
from ..models.convnext import ConvNeXtConfig, ConvNeXtTower
from ..models.llama import Llama, LlamaConfig, _llama_key
from ..prompt import Tokenizer, TEMPLATES
from ..generation import GenerationConfig
from ._llava import load_parts
from .base import HiResLMM, check_device, finish_load, release_device_memory

__all__ = ["ConvLLaVA", "ConvLLaVAConfig", "is_convllava_config", "TOWER_PREFIX"]

log = logging.getLogger(__name__)

TOWER_PREFIX = "model.vision_tower.vision_tower."
PROJECTOR_PREFIX = "model.mm_projector."


def is_convllava_config(cfg: dict) -> bool:
    """A LLaVA config (model_type llava / llava_llama) with a ConvNeXt vision tower and the
    mlp2x_gelu projector (ConvLLaVA's config.json; HF's own Llava configs have a vision_config
    instead of mm_* fields)."""
    if cfg.get("model_type") not in ("llava", "llava_llama"):
        return False
    if not cfg.get("mm_vision_tower") or cfg.get("mm_projector_type") != "mlp2x_gelu":
        return False
    if "mm_hidden_size" not in cfg or "hidden_size" not in cfg:
        return False
    tower = str(cfg["mm_vision_tower"]).lower()
    return "convnext" in tower


@dataclasses.dataclass(frozen=True)
class ConvLLaVAConfig:
    llm: LlamaConfig
    mm_hidden_size: int
    mm_vision_tower: str
    image_size: int                       # the tower's input resolution N (768, 1024, 1536)
    tokenizer_model_max_length: Optional[int]

    @classmethod
    def from_dict(cls, d: dict, image_size: int) -> "ConvLLaVAConfig":
        ar = d.get("image_aspect_ratio", "pad")
        if ar != "pad":
            raise ValueError(f"ConvLLaVA: config.json field 'image_aspect_ratio' is {ar!r}; only "
                             f"'pad' (the released models' value) is supported")
        sel = d.get("mm_vision_select_layer", -1)
        if sel != -1:
            raise ValueError(f"ConvLLaVA: config.json field 'mm_vision_select_layer' is {sel}; only "
                             f"-1 (the released models' value) is supported")
        return cls(llm=LlamaConfig.from_dict(d), mm_hidden_size=int(d["mm_hidden_size"]),
                   mm_vision_tower=str(d["mm_vision_tower"]), image_size=int(image_size),
                   tokenizer_model_max_length=d.get("tokenizer_model_max_length"))


def _tower_resolution(tower_dir: Optional[Path], llava_cfg: dict) -> Optional[int]:
    """The tower's input size: its preprocessor_config.json (crop_size / size), its config.json
    image_size, or the LLaVA config's mm_vision_resolution."""
    if tower_dir is not None:
        pp = tower_dir / "preprocessor_config.json"
        if pp.exists():
            with open(pp) as fh:
                d = json.load(fh)
            for field in ("crop_size", "size"):
                v = d.get(field)
                if isinstance(v, dict):
                    v = v.get("height") or v.get("shortest_edge")
                if isinstance(v, int):
                    return v
        cj = tower_dir / "config.json"
        if cj.exists():
            with open(cj) as fh:
                v = json.load(fh).get("image_size")
            if isinstance(v, int):
                return v
    v = llava_cfg.get("mm_vision_resolution")
    return int(v) if isinstance(v, int) else None


class ConvLLaVA(HiResLMM):
    """vision_tower (ConvNeXtTower) -> mm_projector (Linear, GELU, Linear) -> llm (Llama)."""

    def __init__(self, config: ConvLLaVAConfig, vision_tower: nn.Module):
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower
        h = config.llm.hidden_size
        self.mm_projector = nn.Sequential(nn.Linear(config.mm_hidden_size, h), nn.GELU(),
                                          nn.Linear(h, h))   # nn.GELU(): exact erf form
        self.llm = Llama(config.llm)
        self.tokenizer: Optional[Tokenizer] = None
        self.conv_template = "vicuna_v1"
        self.generation_config = GenerationConfig()
        self.max_prompt_len = config.tokenizer_model_max_length

    # -- forward pieces --
    def visual_rows(self, image) -> torch.Tensor:
        """One opened PIL image -> (N, hidden) projected visual rows, raster order."""
        pixels = convllava_preprocess(image, self.config.image_size)           # 1.6
        feats = self.vision_tower(pixels.to(self.vision_tower.device))         # 1.2, 1.5
        w = self.mm_projector[0].weight
        return self.mm_projector(feats.to(w.dtype))[0]                         # 3.1

    # -- loading --
    @classmethod
    def from_pretrained(cls, path, vision_tower=None, dtype: Optional[torch.dtype] = None,
                        device=None, image_size: Optional[int] = None,
                        conv_template: Optional[str] = None, progress: Optional[bool] = None
                        ) -> "ConvLLaVA":
        """Load a released ConvLLaVA folder (see the module docstring). vision_tower: local
        folder of the tower repo config.json's mm_vision_tower names (needed only when the LLM
        shards lack model.vision_tower.vision_tower.* keys). dtype: None keeps the checkpoint's.
        device: default cpu. image_size: overrides the tower's resolution. conv_template:
        overrides the checkpoint's template (vicuna_v1). progress: tqdm bar (default: shown when
        loading takes more than 2 s)."""
        where = "hires_lmm.load"
        path = Path(os.fspath(path))
        dev = check_device(device if device is not None else "cpu", where)
        cfg = read_config(str(path))
        if not is_convllava_config(cfg):
            raise ValueError(f"{where}: {path}/config.json is not a ConvLLaVA config")
        if conv_template is not None and conv_template not in TEMPLATES:
            raise ValueError(f"{where}: argument 'conv_template' must be one of {list(TEMPLATES)}, "
                             f"got {conv_template!r}")
        tokenizer = Tokenizer.from_pretrained(path)
        reader = open_checkpoint(path)
        keys = list(reader.keys())
        in_shards = any(k.startswith(TOWER_PREFIX) for k in keys)
        tower_dir = None
        if vision_tower is not None:
            tower_dir = Path(os.fspath(vision_tower))
            if not tower_dir.exists():
                raise FileNotFoundError(f"{where}: argument 'vision_tower' does not exist: {tower_dir}")
        if not in_shards and tower_dir is None:
            raise ValueError(
                f"{where}: the checkpoint {path} has no {TOWER_PREFIX}* keys and no vision tower "
                f"folder was given. config.json's mm_vision_tower is {cfg['mm_vision_tower']!r}: "
                f"download that repository yourself and pass its local folder as vision_tower= "
                f"(CLI: --vision-tower PATH); nothing is downloaded")
        if in_shards and tower_dir is not None:
            log.info("%s: the tower is read from the LLM checkpoint's %s* keys; the folder %s "
                     "gives its config and resolution only", where, TOWER_PREFIX, tower_dir)
        size = image_size or _tower_resolution(tower_dir, cfg)
        if not size:
            raise ValueError(f"{where}: the tower's input resolution is unknown: no "
                             f"preprocessor_config.json / config.json image_size in a vision_tower "
                             f"folder and no mm_vision_resolution in config.json; pass image_size= "
                             f"(768, 1024 or 1536 for the released models)")
        config = ConvLLaVAConfig.from_dict(cfg, size)
        tower_cfg = None
        if tower_dir is not None and (tower_dir / "config.json").exists():
            with open(tower_dir / "config.json") as fh:
                td = json.load(fh)
            if td.get("model_type") == "convnext" or "hidden_sizes" in td:
                tower_cfg = ConvNeXtConfig.from_dict(td)

        model = None
        try:
            # Tower: its own loader (HF / timm / original names, strict, one error listing keys).
            if in_shards:
                tower = ConvNeXtTower.from_state_dict(reader, config=tower_cfg, dtype=dtype,
                                                      device=dev, prefix=TOWER_PREFIX)
            else:
                tower = ConvNeXtTower.from_pretrained(tower_dir, dtype=dtype, device=dev,
                                                      config=tower_cfg)
            last = tower.config.hidden_sizes[-1]
            if last != config.mm_hidden_size:
                raise ValueError(f"{where}: the vision tower's last stage has {last} channels but "
                                 f"config.json's mm_hidden_size is {config.mm_hidden_size}")
            with torch.device("meta"):
                model = cls(config, vision_tower=None)
            model.vision_tower = tower
            load_parts(_LLMAndProjector(model), path, reader, _key_map, dtype, dev, progress, "ConvLLaVA")
        except BaseException:
            model = tower = None           # nothing half-loaded stays on the device
            release_device_memory(dev)
            raise
        return finish_load(model, path, cfg, tokenizer, conv_template)


class _LLMAndProjector(nn.Module):
    """The part of ConvLLaVA that the LLM checkpoint fills with one strict load_into."""

    def __init__(self, model: ConvLLaVA):
        super().__init__()
        self.llm = model.llm
        self.mm_projector = model.mm_projector


def _key_map(key: str) -> Optional[str]:
    if key.startswith(TOWER_PREFIX):
        return None                                    # the tower is loaded by its own loader
    if key.startswith(PROJECTOR_PREFIX):
        return "mm_projector." + key[len(PROJECTOR_PREFIX):]
    name = _llama_key(key)
    return None if name is None else "llm." + name
