"""DeepStack-L, DeepStack-L-HD and DeepStack-V as released (specs/deepstack.md 1-2), image ->
answer through hires_lmm's kernels.

    model = hires_lmm.load("deepstack-l-vicuna-7b", vision_tower="clip-vit-large-patch14-336",
                           dtype=torch.bfloat16, device="cuda")
    model.chat(Image.open("chart.png"), "What is the trend?", temperature=0)

Forward pass, top to bottom (spec section numbers):
  1.2  preprocessing: a global view (plain resize to 336x336, aspect not kept) and the best grid
       (cols, rows) of 336 crops among all i*j <= num_crops except 1x1 (LLaVA-NeXT's
       select_best_resolution), the image resized (not padded) to (cols*336, rows*336) and cut
       into crops, row-major; every view /255 and CLIP mean/std
  1.2  CLIP-L/336 on global + crops, layer mm_vision_select_layer (-2) without CLS, the shared
       mlp2x_gelu projector (Linear, exact GELU, Linear) on every view
  1.1  the global view's 576 rows are the image's rows in the sequence (LLaVA's splice)
  1.2  the crops' rows form the hi-res map (grid_h*24, grid_w*24), 2-D dilated into
       grid_h*grid_w stacks of 576 (stack i*grid_w + j = hires[i::grid_h, j::grid_w]),
       zero stacks up to num_crops
  1.2  HD (is_anyres_deepstack): the global stream is any-res (base view + grid crops, an
       image_newline column after every row of the crops' map); every sub-view is also encoded at
       sqrt(num_crops)x upsampling as sqrt(num_crops)^2 crops, dilated into num_crops stacks per
       sub-view, each formatted like the global stream (its newline positions add image_newline),
       so a stack has exactly the global sequence's length and layout
  1.3  schedule: stack k is added to the hidden states at the image's rows BEFORE decoder layer
       deepstack_start_id + k * deepstack_interval (defaults 1, 1; stacks that would land past the
       last layer are dropped, as the reference's loop over the layers never reaches them),
       fused with that layer's RMSNorm (ops.deepstack_inject_rms_norm in models.llama)
  1.4  the rows are the image's TRUE positions in the spliced sequence, per request, for any
       number of images, text-only requests and batch mates (the reference code takes the
       un-expanded placeholder index and the image ordinal instead: correct only for one image
       first in its sample with right padding; not copied). Decode steps inject nothing.
  2    DeepStack-V (deepstack_args_for_ablation holds "deepstack_vit"): no LLM stacks; global +
       sqrt(num_crops)^2 crops of the sqrt(num_crops)x image through
       ClipVisionTower.forward_deepstack_v, start layer lsvit_start_layer_<N> or L // 2.
  LLM  Vicuna-7B (hires_lmm.models.Llama), vicuna_v1 template; packed prefill, batched decode.

Checkpoint (LLaVA layout, "model_type": "deepstack_llama", "image_aspect_ratio": "deepstack"):
config.json, LLM shards (.bin + index or safetensors), tokenizer.model, ...; key map:
  model.embed_tokens / model.layers.* / model.norm / lm_head -> llm.*    (models.llama._llama_key)
  model.mm_projector.{0,2}.{weight,bias}                     -> mm_projector.{0,2}.*
  model.image_newline (HD; ignored otherwise)                -> image_newline
  model.vision_tower.vision_tower.vision_model.*             -> vision_tower.* (CLIP, when stored)
The tower comes from the folder the user passes as vision_tower= (the local copy of the repo that
config.json's mm_vision_tower names), else from the shards' tower keys; nothing is downloaded.
"""
import dataclasses
import logging
import math
import os
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..checkpoint import open_checkpoint
from ..generation import GenerationConfig
from ..models._weights import read_config
from ..models.deepstack import dilated_stacks, mosaic_crops
from ..models.llama import Llama, LlamaConfig, _llama_key
from ..models.slime import _clip_normalize
from ..prompt import TEMPLATES, Tokenizer
from ._llava import TOWER_PREFIX, load_clip_tower, load_parts
from .base import HiResLMM, check_device, finish_load, release_device_memory

__all__ = ["DeepStackVL", "DeepStackConfig", "is_deepstack_config", "best_grid",
           "deepstack_views", "process_image_grids"]

log = logging.getLogger(__name__)

_SUPPORTED_ARGS = {"", "deepstack_vit", "2xsample"}


def is_deepstack_config(cfg: dict) -> bool:
    """DeepStack-VL's config.json: model_type deepstack_llama, or a LLaVA config with
    image_aspect_ratio "deepstack" (its preprocessing) and an mm_vision_tower."""
    if cfg.get("model_type") == "deepstack_llama":
        return True
    return cfg.get("image_aspect_ratio") == "deepstack" and bool(cfg.get("mm_vision_tower"))


@dataclasses.dataclass(frozen=True)
class DeepStackConfig:
    llm: LlamaConfig
    mm_hidden_size: int
    mm_vision_tower: str
    mm_vision_select_layer: int = -2
    num_crops: int = 4
    deepstack_start_id: int = 1
    deepstack_interval: int = 1
    is_anyres_deepstack: bool = False                 # DeepStack-L-HD
    deepstack_vit: bool = False                       # DeepStack-V
    vit_start_layer: Optional[int] = None             # lsvit_start_layer_<N>; None: L // 2
    force_square_grid: bool = False                   # "2xsample"
    tokenizer_model_max_length: Optional[int] = None

    @classmethod
    def from_dict(cls, d: dict) -> "DeepStackConfig":
        w = "DeepStack"
        if d.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
            raise ValueError(f"{w}: config.json field 'mm_projector_type' is "
                             f"{d.get('mm_projector_type')!r}; only 'mlp2x_gelu' is supported")
        sampling = d.get("deepstack_sampling", "2d")
        if sampling != "2d":
            raise ValueError(f"{w}: config.json field 'deepstack_sampling' is {sampling!r}; only "
                             f"'2d' (the released models' dilated sampling) is supported")
        args = [a for a in str(d.get("deepstack_args_for_ablation") or "").split("+")]
        vit_start = None
        for a in args:
            m = re.fullmatch(r"lsvit_start_layer_(\d+)", a)
            if m:
                vit_start = int(m.group(1))
            elif a not in _SUPPORTED_ARGS:
                raise ValueError(f"{w}: config.json field 'deepstack_args_for_ablation' holds "
                                 f"{a!r}; supported: deepstack_vit, 2xsample, lsvit_start_layer_<N>")
        n = int(d.get("num_crops", 4))
        start, interval = int(d.get("deepstack_start_id", 1)), int(d.get("deepstack_interval", 1))
        if n < 2 or start < 0 or interval < 1:
            raise ValueError(f"{w}: config.json needs num_crops >= 2, deepstack_start_id >= 0, "
                             f"deepstack_interval >= 1, got {n}, {start}, {interval}")
        hd = bool(d.get("is_anyres_deepstack", False))
        if hd and math.isqrt(n) ** 2 != n:
            raise ValueError(f"{w}: config.json field 'num_crops' must be a square for "
                             f"is_anyres_deepstack, got {n}")
        return cls(llm=LlamaConfig.from_dict(d), mm_hidden_size=int(d["mm_hidden_size"]),
                   mm_vision_tower=str(d.get("mm_vision_tower")),
                   mm_vision_select_layer=int(d.get("mm_vision_select_layer", -2)),
                   num_crops=n, deepstack_start_id=start, deepstack_interval=interval,
                   is_anyres_deepstack=hd, deepstack_vit="deepstack_vit" in args,
                   vit_start_layer=vit_start, force_square_grid="2xsample" in args,
                   tokenizer_model_max_length=d.get("tokenizer_model_max_length"))

    def stack_layers(self) -> List[int]:
        """1.3: the decoder layer before which stack k is added, for the stacks that land inside
        the decoder (start + k * interval < num_hidden_layers)."""
        L = self.llm.num_hidden_layers
        return [l for l in (self.deepstack_start_id + k * self.deepstack_interval
                            for k in range(self.num_crops)) if l < L]


# ---- 1.2 preprocessing ----------------------------------------------------------------------
def best_grid(width: int, height: int, num_crops: int, patch: int = 336) -> Tuple[int, int]:
    """(cols, rows) among i*j <= num_crops except (1, 1), in the order i = 1.., j = 1.. (DS-MMU
    get_possible_resolutions_by_crops); LLaVA-NeXT's select_best_resolution over the canvases
    (i*patch, j*patch): the largest effective resolution min(int(W s) * int(H s), W H),
    s = min(i*patch/W, j*patch/H), ties to less waste, exact ties to the first."""
    best, best_eff, best_waste = None, 0, float("inf")
    for i in range(1, num_crops + 1):
        for j in range(1, num_crops // i + 1):
            if i == j == 1:
                continue
            cw, ch = i * patch, j * patch
            s = min(cw / width, ch / height)
            eff = min(int(width * s) * int(height * s), width * height)
            waste = cw * ch - eff
            if eff > best_eff or (eff == best_eff and waste < best_waste):
                best, best_eff, best_waste = (i, j), eff, waste
    return best


def _patches(image, patch: int) -> List:
    w, h = image.size
    return [image.crop((x, y, x + patch, y + patch)) for y in range(0, h, patch)
            for x in range(0, w, patch)]


def deepstack_views(image, config: DeepStackConfig, patch: int = 336):
    """PIL image -> (views (V, 3, patch, patch) fp32, (cols, rows)) in DS-MMU's order:
    [global, grid crops row-major] and, for HD, then the sqrt(num_crops)x-upsampled global's crops
    and each grid cell's upsampled crops (cell by cell, row-major inside a cell)."""
    image = image.convert("RGB")
    if config.force_square_grid or config.deepstack_vit:
        s = math.isqrt(config.num_crops)
        cols = rows = s                              # DeepStack-V needs exactly s x s crops
    else:
        cols, rows = best_grid(image.size[0], image.size[1], config.num_crops, patch)
    views = [image.resize((patch, patch))] + _patches(image.resize((cols * patch, rows * patch)), patch)
    if config.is_anyres_deepstack:
        up = math.isqrt(config.num_crops)
        views += _patches(image.resize((patch * up, patch * up)), patch)
        big = _patches(image.resize((cols * patch * up, rows * patch * up)), patch)
        for r in range(rows):                        # group each cell's up x up crops
            for c in range(cols):
                for i in range(up):
                    for j in range(up):
                        views.append(big[(r * up + i) * cols * up + c * up + j])
    return torch.stack([_clip_normalize(v) for v in views]), (cols, rows)


def process_image_grids(feats: torch.Tensor, grid: Tuple[int, int],
                        newline: torch.Tensor) -> torch.Tensor:
    """HD layout (DS-ARCH process_image_grids): feats (1 + cols*rows, P*P, H) -> (P*P +
    rows*P*(cols*P + 1), H) = [base view ; crops' map row by row, each row followed by
    image_newline]."""
    cols, rows = grid
    n, PP, H = feats.shape
    P = math.isqrt(PP)
    m = feats[1:].reshape(rows, cols, P, P, H).permute(0, 2, 1, 3, 4).reshape(rows * P, cols * P, H)
    nl = newline.to(m.dtype).view(1, 1, H).expand(rows * P, 1, H)
    return torch.cat([feats[0], torch.cat([m, nl], dim=1).reshape(-1, H)], dim=0)


class DeepStackVL(HiResLMM):
    """vision_tower (ClipVisionTower) -> mm_projector -> llm (Llama) with DeepStack-L stacks."""

    def __init__(self, config: DeepStackConfig, vision_tower: Optional[nn.Module]):
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower
        h = config.llm.hidden_size
        self.mm_projector = nn.Sequential(nn.Linear(config.mm_hidden_size, h), nn.GELU(),
                                          nn.Linear(h, h))
        self.image_newline = nn.Parameter(torch.zeros(h)) if config.is_anyres_deepstack else None
        self.llm = Llama(config.llm)
        self.tokenizer: Optional[Tokenizer] = None
        self.conv_template = "vicuna_v1"
        self.generation_config = GenerationConfig()
        self.max_prompt_len = config.tokenizer_model_max_length
        layers = [] if config.deepstack_vit else config.stack_layers()
        self.deepstack_layers = layers or None

    def _project(self, views: torch.Tensor) -> torch.Tensor:
        """1.2: CLIP layer mm_vision_select_layer without CLS, then the shared projector."""
        t = self.vision_tower
        feats = t(views.to(device=t.embeddings.patch_embedding.weight.device),
                  select_layer=self.config.mm_vision_select_layer)
        w = self.mm_projector[0].weight
        return self.mm_projector(feats.to(w.dtype))

    def encode(self, image, prompt_ids: Sequence[int]):
        """One opened image -> (rows (N, H), stacks (n_levels, N, H) or None)."""
        cfg = self.config
        t = self.vision_tower
        views, (cols, rows) = deepstack_views(image, cfg, t.config.image_size)   # 1.2
        dev, dt = t.embeddings.patch_embedding.weight.device, t.embeddings.patch_embedding.weight.dtype
        views = views.to(device=dev, dtype=dt)
        if cfg.deepstack_vit:                                                  # 2
            feats = t.forward_deepstack_v(views[:1], views[1:], grid=(rows, cols),
                                          deepstack_start=cfg.vit_start_layer,
                                          select_layer=cfg.mm_vision_select_layer)
            w = self.mm_projector[0].weight
            return self.mm_projector(feats.to(w.dtype))[0], None
        n_levels = len(self.deepstack_layers or ())
        if not cfg.is_anyres_deepstack:
            proj = self._project(views)                                        # (1 + n, 576, H)
            glob = proj[0]                                                     # 1.1
            hires = mosaic_crops(proj[1:], rows, cols)                         # 1.2
            st = dilated_stacks(hires.unsqueeze(0), (rows, cols))[:, 0]        # (rows*cols, 576, H)
            if st.shape[0] < cfg.num_crops:                                    # zero stacks
                st = torch.cat([st, st.new_zeros((cfg.num_crops - st.shape[0],) + tuple(st.shape[1:]))])
            return glob, st[:n_levels]
        # HD: any-res global stream with image_newline; stacks in the same layout
        n_sub = 1 + cols * rows
        up = math.isqrt(cfg.num_crops)
        proj = self._project(views)                                            # (n_sub*(1+up^2), 576, H)
        glob = process_image_grids(proj[:n_sub], (cols, rows), self.image_newline)
        loc = proj[n_sub:].reshape(n_sub, up * up, proj.shape[1], proj.shape[2])
        st = dilated_stacks(mosaic_crops(loc, up, up), up)                     # (up^2, n_sub, 576, H)
        stacks = torch.stack([process_image_grids(s, (cols, rows), self.image_newline) for s in st])
        return glob, stacks[:n_levels]

    # -- loading --
    @classmethod
    def from_pretrained(cls, path, vision_tower=None, dtype: Optional[torch.dtype] = None,
                        device=None, conv_template: Optional[str] = None,
                        progress: Optional[bool] = None, image_size: Optional[int] = None
                        ) -> "DeepStackVL":
        """Load a released DeepStack folder (see the module docstring). vision_tower: the local
        folder of the CLIP repo config.json's mm_vision_tower names (needed when the shards do
        not hold the tower). dtype: None keeps the checkpoint's. device: default cpu.
        conv_template: overrides vicuna_v1. image_size: accepted for the CLI; must equal the
        tower's image_size (336 for CLIP-L/336: views and crops are cut at that size)."""
        where = "hires_lmm.load"
        path = Path(os.fspath(path))
        dev = check_device(device if device is not None else "cpu", where)
        d = read_config(str(path))
        if not is_deepstack_config(d):
            raise ValueError(f"{where}: {path}/config.json is not a DeepStack config")
        if conv_template is not None and conv_template not in TEMPLATES:
            raise ValueError(f"{where}: argument 'conv_template' must be one of {list(TEMPLATES)}, "
                             f"got {conv_template!r}")
        config = DeepStackConfig.from_dict(d)
        tokenizer = Tokenizer.from_pretrained(path)
        reader = open_checkpoint(path)
        model = tower = None
        try:
            tower = load_clip_tower(path, reader, d, vision_tower, dtype, dev, where)
            tc = tower.config
            if tc.hidden_size != config.mm_hidden_size:
                raise ValueError(f"{where}: the CLIP tower has hidden_size {tc.hidden_size} but "
                                 f"config.json's mm_hidden_size is {config.mm_hidden_size}")
            if image_size is not None and image_size != tc.image_size:
                raise ValueError(f"{where}: argument 'image_size' ({image_size}) differs from the "
                                 f"CLIP tower's image_size {tc.image_size}")
            with torch.device("meta"):
                model = cls(config, vision_tower=None)
            model.vision_tower = tower
            part = _Parts(model)
            hd = config.is_anyres_deepstack
            # a plain config with an 'unpad' merge type stores an image_newline it never uses
            key_map = _key_map if hd else (lambda k: None if k == "model.image_newline" else _key_map(k))
            load_parts(part, path, reader, key_map, dtype, dev, progress, "DeepStack")
            if model.image_newline is not None:     # assign=True replaced the parameter object
                model.image_newline = part.image_newline
        except BaseException:
            model = tower = None           # nothing half-loaded stays on the device
            release_device_memory(dev)
            raise
        return finish_load(model, path, d, tokenizer, conv_template)


class _Parts(nn.Module):
    """What the LLM checkpoint fills with one strict load (not the tower)."""

    def __init__(self, model: DeepStackVL):
        super().__init__()
        self.llm = model.llm
        self.mm_projector = model.mm_projector
        if model.image_newline is not None:
            self.image_newline = model.image_newline


def _key_map(key: str) -> Optional[str]:
    if key.startswith(TOWER_PREFIX):
        return None                                    # the tower has its own loader
    if key.startswith("model.mm_projector."):
        return "mm_projector." + key[len("model.mm_projector."):]
    if key == "model.image_newline":
        return "image_newline"
    name = _llama_key(key)
    return None if name is None else "llm." + name
