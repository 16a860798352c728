"""CLIP ViT vision tower as LLaVA uses it (features of layer -2 without CLS), with DeepStack-V.

    tower = ClipVisionTower.from_pretrained("openai/clip-vit-large-patch14-336", dtype=torch.bfloat16)
    feats = tower(pixel_values)                       # (B, N_patches, C) = HF hidden_states[-2][:, 1:]
    feats = tower(pixel_values, deepstack_stacks=stacks, deepstack_start=16)   # DeepStack-V
    feats = tower.forward_deepstack_v(pixel_values, crop_pixel_values, grid=(2, 2),
                                      deepstack_start=16)   # the paper's flow: stacks from crops

Checkpoints: config.json as a full CLIPConfig (its `vision_config` is read) or a CLIPVisionConfig;
weights with the prefixes `vision_model.`, `model.vision_tower.vision_tower.vision_model.` (LLaVA)
or none. Text-tower keys (text_model.*, text_projection, visual_projection, logit_scale) and the
embeddings.position_ids buffer are ignored; in a LLaVA checkpoint every key outside the vision
tower prefix is ignored too (the LLM and the projector).

DeepStack-V (specs/deepstack.md section 2): stacks (n_stacks, B, N_patches, C); stack i is added to
the patch tokens (not CLS) before encoder layer start + i. The add is fused into that layer's
layer_norm1 through ops.deepstack_inject_layer_norm; the row index of the non-CLS tokens is built
once per forward. Layers run only up to the selected one."""
import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ._weights import load_into

__all__ = ["ClipVisionConfig", "ClipVisionTower"]

_ACTS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}

# HF CLIPVisionConfig defaults, used for keys a config.json leaves out.
_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5)

_LLAVA_PREFIX = "model.vision_tower.vision_tower."
_IGNORED_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d: dict) -> "ClipVisionConfig":
        """A CLIPVisionConfig dict, or a CLIPConfig dict with `vision_config`. Absent or null
        fields take HF CLIPVisionConfig's defaults; every value is checked (__post_init__)."""
        if not isinstance(d, dict):
            raise ValueError(f"ClipVisionConfig: expected a config object (dict), got "
                             f"{type(d).__name__}")
        if "vision_config" in d:
            d = d["vision_config"] or {}
            if not isinstance(d, dict):
                raise ValueError(f"ClipVisionConfig: field 'vision_config' must be an object, got "
                                 f"{type(d).__name__}")
        kw = {f.name: _DEFAULTS[f.name] if d.get(f.name) is None else d[f.name]
              for f in dataclasses.fields(cls)}
        return cls(**kw)

    def __post_init__(self):
        """Types and ranges (ValueError naming the field): sizes are integers in [1, bound],
        num_attention_heads divides hidden_size, patch_size <= image_size, layer_norm_eps a
        finite number in (0, 1), hidden_act one of the supported activations."""
        from ._weights import MAX_LAYERS, MAX_SIZE, check_int, check_real
        o = "ClipVisionConfig"
        check_int(o, "hidden_size", self.hidden_size, 1, MAX_SIZE)
        check_int(o, "intermediate_size", self.intermediate_size, 1, MAX_SIZE)
        check_int(o, "num_hidden_layers", self.num_hidden_layers, 1, MAX_LAYERS)
        check_int(o, "num_attention_heads", self.num_attention_heads, 1, self.hidden_size)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{o}: field 'num_attention_heads' ({self.num_attention_heads}) must "
                             f"divide hidden_size ({self.hidden_size})")
        check_int(o, "num_channels", self.num_channels, 1, 1 << 10)
        check_int(o, "image_size", self.image_size, 1, 1 << 15)
        check_int(o, "patch_size", self.patch_size, 1, self.image_size)
        check_real(o, "layer_norm_eps", self.layer_norm_eps, 0.0, 1.0, lo_open=True, hi_open=True)
        if not isinstance(self.hidden_act, str) or self.hidden_act not in _ACTS:
            raise ValueError(f"ClipVisionConfig: argument 'hidden_act' must be one of "
                             f"{sorted(_ACTS)}, got {self.hidden_act!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class _LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size,
                                         stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixel_values):
        B, C, H, W = pixel_values.shape
        s = self.cfg.image_size
        if (C, H, W) != (self.cfg.num_channels, s, s):
            raise ValueError(f"ClipVisionTower: argument 'pixel_values' must be (B, "
                             f"{self.cfg.num_channels}, {s}, {s}), got {tuple(pixel_values.shape)}")
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(w.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(B, 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight


class ClipAttention(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.h, self.d = cfg.num_attention_heads, cfg.head_dim
        c = cfg.hidden_size
        self.q_proj, self.k_proj = nn.Linear(c, c), nn.Linear(c, c)
        self.v_proj, self.out_proj = nn.Linear(c, c), nn.Linear(c, c)

    def forward(self, x):
        B, S, C = x.shape
        q = self.q_proj(x).view(B, S, self.h, self.d)
        k = self.k_proj(x).view(B, S, self.h, self.d)
        v = self.v_proj(x).view(B, S, self.h, self.d)
        o = ops.flash_attn_func(q, k, v, softmax_scale=self.d ** -0.5, causal=False)
        return self.out_proj(o.reshape(B, S, C))


class ClipMLP(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.act = _ACTS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    """Pre-norm block; forward takes the residual `h` and `normed` = layer_norm1(h), computed by
    the caller so a DeepStack-V add can be fused into it."""

    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.self_attn = ClipAttention(cfg)
        self.layer_norm1 = _LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = ClipMLP(cfg)
        self.layer_norm2 = _LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, h, normed):
        h = h + self.self_attn(normed)
        return h + self.mlp(self.layer_norm2(h))


class ClipEncoder(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(ClipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


def _clip_key(key: str, llava: bool) -> Optional[str]:
    """Checkpoint name -> our name (None: ignored)."""
    if llava:
        if not key.startswith(_LLAVA_PREFIX):
            return None                                  # the LLM and the projector
        key = key[len(_LLAVA_PREFIX):]
    if key.startswith(_IGNORED_PREFIXES):
        return None
    if key.startswith("vision_model."):
        key = key[len("vision_model."):]
    if key == "embeddings.position_ids":
        return None
    return key


class ClipVisionTower(nn.Module):
    """HF CLIPVisionModel's vision_model with HF parameter names (embeddings, pre_layrnorm,
    encoder.layers.N, post_layernorm)."""

    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = ClipEmbeddings(config)
        self.pre_layrnorm = _LayerNorm(config.hidden_size, config.layer_norm_eps)   # HF spelling
        self.encoder = ClipEncoder(config)
        self.post_layernorm = _LayerNorm(config.hidden_size, config.layer_norm_eps)  # pooler only

    @classmethod
    def from_pretrained(cls, ckpt_dir: str, dtype: Optional[torch.dtype] = None,
                        device=None) -> "ClipVisionTower":
        """config.json (CLIPConfig or CLIPVisionConfig) + safetensors (single or sharded) or .bin.
        Checked before anything is built: the keys hold a CLIP vision tower (else the error says
        what the checkpoint is), the config's types and ranges, num_hidden_layers against the
        encoder layers the keys hold; then built on meta and loaded strictly. dtype None keeps
        the checkpoint's dtype (mixed floating dtypes: an error, pass dtype=). Every problem
        raises hires_lmm.CheckpointError naming the file or the field."""
        from ._weights import check_count, check_kind, layer_indices, open_pretrained, parse_config
        pre = open_pretrained("ClipVisionTower.from_pretrained", ckpt_dir)
        check_kind(pre, "ClipVisionTower")
        config = parse_config(pre, ClipVisionConfig.from_dict)
        llava = any(k.startswith(_LLAVA_PREFIX) for k in pre.reader.keys())
        ours = [n for n in map(lambda k: _clip_key(k, llava), pre.reader.keys()) if n is not None]
        layers = layer_indices(ours, r"encoder\.layers\.(\d+)\.")
        check_count(pre, "num_hidden_layers", config.num_hidden_layers,
                    layers[-1] + 1 if layers else 0, "encoder layers (encoder.layers.N.*)")
        with torch.device("meta"):
            model = cls(config)
        load_into(model, ckpt_dir, lambda k: _clip_key(k, llava), dtype=dtype, device=device,
                  reader=pre.reader)
        return model.eval()

    def _patch_index(self, B: int, S: int, device):
        """Rows of the flattened (B, S) tokens that are patches (every row but each CLS)."""
        rows = torch.arange(B * S, device=device, dtype=torch.long).view(B, S)
        return rows[:, 1:].reshape(-1)

    def _n_run(self, select_layer: int) -> int:
        L = self.config.num_hidden_layers
        if not -(L + 1) <= select_layer <= L:
            raise ValueError(f"ClipVisionTower: argument 'select_layer' must be in [{-(L + 1)}, {L}], "
                             f"got {select_layer}")
        return select_layer % (L + 1)                    # encoder layers to run

    def _check_stacks(self, deepstack_stacks, deepstack_start, B, S, C):
        """-> (stacks as (B*(S-1), C) rows, start)."""
        L = self.config.num_hidden_layers
        if deepstack_stacks is None or len(deepstack_stacks) == 0:
            return [], 0
        start = L // 2 if deepstack_start is None else deepstack_start
        n = len(deepstack_stacks)
        if start < 0 or start + n > L:
            raise ValueError(f"ClipVisionTower: argument 'deepstack_start' ({start}) + "
                             f"{n} stacks must fit in the {L} encoder layers")
        want = (B, S - 1, C)
        for i, st in enumerate(deepstack_stacks):
            if tuple(st.shape) != want:
                raise ValueError(f"ClipVisionTower: argument 'deepstack_stacks[{i}]' must be "
                                 f"{want}, got {tuple(st.shape)}")
        return [st.reshape(B * (S - 1), C) for st in deepstack_stacks], start

    def _run(self, h, first: int, last: int, stacks=(), start: int = 0):
        """Encoder layers [first, last) on h (B, S, C); stack k (rows of the patch tokens) is
        fused into layer start + k's layer_norm1."""
        index = self._patch_index(h.shape[0], h.shape[1], h.device) if len(stacks) else None
        for i in range(first, last):
            layer = self.encoder.layers[i]
            ln = layer.layer_norm1
            k = i - start
            if 0 <= k < len(stacks):
                normed, h = ops.deepstack_inject_layer_norm(h, stacks[k].to(h.device), index,
                                                            ln.weight, ln.bias, ln.eps)
            else:
                normed = ln(h)
            h = layer(h, normed)
        return h

    def forward(self, pixel_values, select_layer: int = -2, deepstack_stacks=None,
                deepstack_start: Optional[int] = None):
        """pixel_values (B, 3, image_size, image_size) -> (B, N_patches, C): HF
        hidden_states[select_layer][:, 1:] (hidden_states[0] = pre_layrnorm(embeddings),
        hidden_states[i] = output of encoder layer i-1). deepstack_stacks (n_stacks, B, N_patches,
        C) or a list of (B, N_patches, C): stack i is added to the patch tokens before encoder
        layer deepstack_start + i (default start: num_hidden_layers // 2, DeepStack-VL's code)."""
        n_run = self._n_run(select_layer)
        h = self.pre_layrnorm(self.embeddings(pixel_values))
        B, S, C = h.shape
        stacks, start = self._check_stacks(deepstack_stacks, deepstack_start, B, S, C)
        return self._run(h, 0, n_run, stacks, start)[:, 1:]

    def forward_deepstack_v(self, pixel_values, crop_pixel_values, grid=(2, 2),
                            deepstack_start: Optional[int] = None, select_layer: int = -2):
        """DeepStack-V end to end (DeepStack-VL's custom_feature_forward, specs/deepstack.md 2):
        pixel_values (B, 3, R, R) global views; crop_pixel_values (B*grid_h*grid_w, 3, R, R) the
        crops of the hi-res image, per image in row-major grid order. Both streams run jointly
        through layers [0, start); the crops' patch tokens then form the hi-res map
        (mosaic_crops), are sampled into grid_h*grid_w dilated stacks (stack i*grid_w + j =
        hires[i::grid_h, j::grid_w]) and added to the global stream's patch tokens before layers
        start, start+1, ...; only the global stream continues. Returns (B, N_patches, C) of
        select_layer like forward()."""
        from .deepstack import dilated_stacks, mosaic_crops
        gh, gw = grid
        n_run = self._n_run(select_layer)
        L = self.config.num_hidden_layers
        start = L // 2 if deepstack_start is None else deepstack_start
        B = pixel_values.shape[0]
        if crop_pixel_values.shape[0] != B * gh * gw or crop_pixel_values.shape[1:] != pixel_values.shape[1:]:
            raise ValueError(f"ClipVisionTower: argument 'crop_pixel_values' must be "
                             f"({B * gh * gw}, {', '.join(map(str, pixel_values.shape[1:]))}), got "
                             f"{tuple(crop_pixel_values.shape)}")
        if start < 0 or start + gh * gw > L:
            raise ValueError(f"ClipVisionTower: argument 'deepstack_start' ({start}) + "
                             f"{gh * gw} stacks must fit in the {L} encoder layers")
        x = torch.cat([pixel_values, crop_pixel_values.to(pixel_values.dtype)], 0)
        h = self._run(self.pre_layrnorm(self.embeddings(x)), 0, min(start, n_run))
        g, loc = h[:B], h[B:]
        if n_run <= start:
            return g[:, 1:]
        S, C = g.shape[1], g.shape[2]
        crops = loc[:, 1:].reshape(B, gh * gw, S - 1, C)
        stacks = dilated_stacks(mosaic_crops(crops, gh, gw), (gh, gw))   # (gh*gw, B, S-1, C)
        rows = [st.reshape(B * (S - 1), C) for st in stacks]
        return self._run(g, start, n_run, rows, start)[:, 1:]
