"""SliME as released (specs/slime.md; SliME-vicuna-7B, SliME-Llama3-8B, SliME-vicuna-13B), image
-> answer through hires_lmm's kernels.

    model = hires_lmm.load("SliME-Llama3-8B", vision_tower="clip-vit-large-patch14-336",
                           dtype=torch.bfloat16, device="cuda")
    model.chat(Image.open("chart.png"), "What is the trend?", temperature=0)

Forward pass, top to bottom (spec section numbers):
  1.2  UHD slicing: the grid (cols, rows) of 2..7 crops (models.slime.anyres_grid), the global view
       a plain 336x336 resize, the crops cut from the aspect-kept, black-padded canvas, row-major;
       CLIP mean/std                                                   (models.slime.slice_image)
  1.1  CLIP-L/336 on [global, crops], layer mm_vision_select_layer (-2) without CLS: (1+n, 576, 1024)
  2    the global view through the mixture of adapters: per-token soft gate softmax(x @ w_gate)
       between MLP(x) and MLP(Resampler576(x))                   (models.slime.GatedAdapters)
  3.1  the crops through Resampler144, then the same MLP (no gate: 144 tokens)
  3.2  raster order over the whole (rows*12) x (cols*12) grid of local tokens
  3.3  router scores S_i = sum_t cos(local_i, e_t) over the input embeddings e_t of every
       non-image token of the prompt (system prompt and role headers included)
  3.4  top-p (mm_resampler_topp) prefix + 1 of softmax(S): the released checkpoints' first-commit
       code takes softmax(softmax(S / 0.5)) (selector="double_softmax", the default); the code at
       HEAD a single softmax (selector="single_softmax"); kept tokens in raster order
  4    visual block [global 576 ; embed_tokens(config.seperator) ; kept local] in place of <image>
       (LLaVA's splice); vicuna_v1 template for the Vicuna models, llama3 for SliME-8B (from the
       tokenizer's <|eot_id|>); the LLM (hires_lmm.models.Llama): packed prefill, batched decode.

Checkpoint (6.2): config.json ("model_type": "llava_llama", "mm_projector_type": "gated", ...),
safetensors shards + model.safetensors.index.json, the tokenizer files. Key map:
  model.embed_tokens / model.layers.* / model.norm / lm_head -> llm.*           (models.llama)
  model.mm_projector.*                                       -> visual.projector.* (GatedAdapters)
  model.sampler.post_qformer.*                               -> visual.sampler.*   (Resampler144)
  model.vision_tower.vision_tower.vision_model.*             -> vision_tower.* (CLIP, when stored)
The whole model reads this one folder; the CLIP tower comes from its tower keys when the shards
hold them, or from the folder passed as vision_tower= (the local copy of the repo config.json's
mm_vision_tower names; the released code reloads stock OpenAI CLIP, which the frozen tower equals).
"""
import dataclasses
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..checkpoint import open_checkpoint
from ..generation import GenerationConfig
from ..models._weights import read_config
from ..models.llama import Llama, LlamaConfig, _llama_key
from ..models.slime import SliMEConfig, SliMEVisual, slice_image
from ..prompt import IMAGE_TOKEN_INDEX, TEMPLATES, Tokenizer
from ._llava import TOWER_PREFIX, load_clip_tower, load_parts
from .base import HiResLMM, check_device, finish_load, release_device_memory

__all__ = ["SliME", "SliMEModelConfig", "is_slime_config", "SELECTORS"]

log = logging.getLogger(__name__)

# selector variant (spec 3.4) -> SliMEConfig.presoftmax_temperature
SELECTORS = {"double_softmax": 0.5, "single_softmax": None}


def is_slime_config(cfg: dict) -> bool:
    """SliME's config.json: a LLaVA config (model_type llava_llama / llava) whose projector is
    the gated mixture of adapters."""
    return (cfg.get("model_type") in ("llava_llama", "llava")
            and cfg.get("mm_projector_type") == "gated" and "hidden_size" in cfg)


@dataclasses.dataclass(frozen=True)
class SliMEModelConfig:
    llm: LlamaConfig
    visual: SliMEConfig
    mm_vision_tower: str
    mm_vision_select_layer: int = -2
    tokenizer_model_max_length: Optional[int] = None


class SliME(HiResLMM):
    """vision_tower (ClipVisionTower) -> visual (SliMEVisual: adapters, resampler, selector)
    -> llm (Llama)."""

    def __init__(self, config: SliMEModelConfig, vision_tower: Optional[nn.Module]):
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower
        self.visual = SliMEVisual(config.visual)
        self.llm = Llama(config.llm)
        self.tokenizer: Optional[Tokenizer] = None
        self.conv_template = "vicuna_v1"
        self.generation_config = GenerationConfig()
        self.max_prompt_len = config.tokenizer_model_max_length

    @property
    def selector(self) -> str:
        t = self.config.visual.presoftmax_temperature
        return next(k for k, v in SELECTORS.items() if v == t)

    def encode(self, image, prompt_ids: Sequence[int]):
        """One opened image of a request -> ([global ; separator ; kept local] (576 + 1 + K, H),
        None: SliME has no DeepStack stacks)."""
        t = self.vision_tower
        w = t.embeddings.patch_embedding.weight
        views, grid = slice_image(image, t.config.image_size)                  # 1.2
        feats = t(views.to(device=w.device, dtype=w.dtype),
                  select_layer=self.config.mm_vision_select_layer)             # 1.1
        emb = self.llm.embed_tokens
        text_ids = [int(i) for i in prompt_ids if i != IMAGE_TOKEN_INDEX]      # 3.3
        text = emb(torch.tensor(text_ids, dtype=torch.long, device=self.device))
        sep = emb(torch.tensor([self.config.visual.seperator], device=self.device))[0]   # 4
        dt = self.visual.projector.projection[0].weight.dtype
        rows = self.visual(feats.to(dt), grid, text.to(dt), sep)              # 2, 3.1-3.4, 4
        return rows, None

    # -- loading --
    @classmethod
    def from_pretrained(cls, path, vision_tower=None, dtype: Optional[torch.dtype] = None,
                        device=None, conv_template: Optional[str] = None,
                        progress: Optional[bool] = None, image_size: Optional[int] = None,
                        selector: str = "double_softmax") -> "SliME":
        """Load a released SliME folder (see the module docstring). vision_tower: the local CLIP
        folder (needed when the shards do not hold the tower). dtype: None keeps the
        checkpoint's. device: default cpu. conv_template: overrides the checkpoint's (vicuna_v1,
        or llama3 for SliME-8B). selector: "double_softmax" (default: the first commit's code,
        which the released checkpoints were trained and evaluated with, K ~ ceil(0.95 N)) or
        "single_softmax" (the code at HEAD, spec 3.4). image_size: must equal the tower's."""
        where = "hires_lmm.load"
        path = Path(os.fspath(path))
        dev = check_device(device if device is not None else "cpu", where)
        d = read_config(str(path))
        if not is_slime_config(d):
            raise ValueError(f"{where}: {path}/config.json is not a SliME config")
        if conv_template is not None and conv_template not in TEMPLATES:
            raise ValueError(f"{where}: argument 'conv_template' must be one of {list(TEMPLATES)}, "
                             f"got {conv_template!r}")
        if selector not in SELECTORS:
            raise ValueError(f"{where}: argument 'selector' must be one of {list(SELECTORS)}, got "
                             f"{selector!r}")
        for field, want in (("mm_patch_merge_type", "spatial"), ("image_aspect_ratio", "anyres")):
            if d.get(field, want) != want:
                raise ValueError(f"{where}: config.json field {field!r} is {d.get(field)!r}; only "
                                 f"{want!r} (the released SliME) is supported")
        if d.get("use_local_only") or d.get("use_global_only"):
            raise ValueError(f"{where}: config.json sets use_local_only / use_global_only; only the "
                             f"released global + local SliME is supported")
        tokenizer = Tokenizer.from_pretrained(path)
        reader = open_checkpoint(path)
        model = tower = None
        try:
            tower = load_clip_tower(path, reader, d, vision_tower, dtype, dev, where)
            tc = tower.config
            if image_size is not None and image_size != tc.image_size:
                raise ValueError(f"{where}: argument 'image_size' ({image_size}) differs from the "
                                 f"CLIP tower's image_size {tc.image_size}")
            vis = SliMEConfig.from_dict(d, SELECTORS[selector])
            vis = dataclasses.replace(vis, image_size=tc.image_size,
                                      global_grid=tc.image_size // tc.patch_size)
            if tc.hidden_size != vis.mm_hidden_size:
                raise ValueError(f"{where}: the CLIP tower has hidden_size {tc.hidden_size} but "
                                 f"config.json's mm_hidden_size is {vis.mm_hidden_size}")
            llm_cfg = LlamaConfig.from_dict(d)
            if vis.seperator >= llm_cfg.vocab_size:
                raise ValueError(f"{where}: config.json field 'seperator' ({vis.seperator}) must be "
                                 f"a token id below vocab_size ({llm_cfg.vocab_size})")
            config = SliMEModelConfig(llm=llm_cfg, visual=vis,
                                      mm_vision_tower=str(d.get("mm_vision_tower")),
                                      mm_vision_select_layer=int(d.get("mm_vision_select_layer", -2)),
                                      tokenizer_model_max_length=d.get("tokenizer_model_max_length"))
            with torch.device("meta"):
                model = cls(config, vision_tower=None)
            model.vision_tower = tower
            load_parts(_Parts(model), path, reader, _key_map, dtype, dev, progress, "SliME")
        except BaseException:
            model = tower = None           # nothing half-loaded stays on the device
            release_device_memory(dev)
            raise
        return finish_load(model, path, d, tokenizer, conv_template)


class _Parts(nn.Module):
    def __init__(self, model: SliME):
        super().__init__()
        self.llm = model.llm
        self.visual = model.visual


def _key_map(key: str) -> Optional[str]:
    if key.startswith(TOWER_PREFIX):
        return None                                    # the tower has its own loader
    v = SliMEVisual.key_map(key)
    if v is not None:
        return "visual." + v
    name = _llama_key(key)
    return None if name is None else "llm." + name
