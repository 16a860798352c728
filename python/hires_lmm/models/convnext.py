"""ConvNeXt vision tower (ConvLLaVA's "ConvNeXt†": ConvNeXt-L + a 5th stage), NHWC inside.

    from hires_lmm.models import ConvNeXtTower, convllava_preprocess
    tower = ConvNeXtTower.from_pretrained("ConvLLaVA-ConvNeXt-1536", dtype=torch.bfloat16,
                                          device="cuda")
    pixels = convllava_preprocess(Image.open("doc.png"), 1536)      # (1, 3, 1536, 1536)
    with torch.inference_mode():
        tokens = tower(pixels.to("cuda"))                           # (1, 576, 3072)

Architecture (HF `ConvNextModel`, specs/convllava.md section 1.2 and 2.1):
  stem       Conv2d(num_channels -> C0, k=p, s=p) -> LayerNorm(C0)         (p = patch_size = 4)
  stage i    i > 0: LayerNorm(C_{i-1}) -> Conv2d(C_{i-1} -> C_i, k=2, s=2); then depths[i] blocks
  block      x + gamma * fc2(GELU_erf(fc1(LayerNorm(dwconv7x7(x)))))  = hires_lmm.ops.convnext_block
  output     the last stage's map (B, h, w, C) as (B, h*w, C) tokens, raster order (y outer,
             x inner); no final norm (ConvLLaVA never applies HF's pooled-output `layernorm`).
Every LayerNorm has eps 1e-6 (HF hard-codes it; the config's `layer_norm_eps` only belongs to the
pooled-output norm, which the tower does not have). The spatial size follows the conv
arithmetic exactly: h = floor(H / p), then floor(h / 2) for each later stage, so any H, W works,
non-square and not a multiple of the total stride included (the remainder rows/columns are dropped
as nn.Conv2d drops them). The stem and downsampling convs run as torch convolutions on
channels-last tensors; the norms and blocks go through hires_lmm.ops (layer_norm, convnext_block),
so `hires_lmm.set_backend("reference")` switches the whole tower to the PyTorch references.

Checkpoints (`ConvNeXtTower.from_pretrained(path)`):
  - a folder with an HF `config.json` (`model_type: convnext`, e.g. ConvLLaVA's
    `depths [3,3,27,3,6]`, `hidden_sizes [192,384,768,1536,3072]`, `num_stages 5`) and safetensors
    (`model.safetensors`, or shards + `model.safetensors.index.json`); `pytorch_model.bin` is read
    with `torch.load(weights_only=True)` (convert once: `python -m hires_lmm.convert`);
  - a single checkpoint file, or a folder whose config.json is not a ConvNeXt config (e.g. a
    LLaVA config): the config is inferred from the tensor shapes (stages and block counts from the
    key indices, widths from the depthwise conv weights, patch size and input channels from the
    stem conv, layer scale present or not).
  Key names (i = stage, j = block), all four map onto one internal layout:
    | part            | HF ConvNextModel                             | timm / open_clip (visual.trunk.) | original ConvNeXt           |
    | stem conv, LN   | embeddings.patch_embeddings / .layernorm     | stem.0 / stem.1                  | downsample_layers.0.0 / .0.1 |
    | downsample LN   | encoder.stages.i.downsampling_layer.0        | stages.i.downsample.0            | downsample_layers.i.0       |
    | downsample conv | encoder.stages.i.downsampling_layer.1        | stages.i.downsample.1            | downsample_layers.i.1       |
    | dwconv          | encoder.stages.i.layers.j.dwconv             | stages.i.blocks.j.conv_dw        | stages.i.j.dwconv           |
    | block LN        | ....layers.j.layernorm                       | ....blocks.j.norm                | stages.i.j.norm             |
    | fc1, fc2        | ....layers.j.pwconv1, .pwconv2               | ....blocks.j.mlp.fc1, .mlp.fc2   | stages.i.j.pwconv1, pwconv2 |
    | layer scale     | ....layers.j.layer_scale_parameter           | ....blocks.j.gamma               | stages.i.j.gamma            |
  Any prefix in front of these is accepted: found as the part of the key before the stem conv's
  name, e.g. "" (ConvLLaVA-ConvNeXt-* towers), "convnext." (HF ConvNextForImageClassification),
  "model.vision_tower.vision_tower." (inside a ConvLLaVA LLM checkpoint), "visual.trunk."
  (open_clip), "trunk." (timm wrapped), or pass `prefix=` when a file holds more than one tower.
  Keys outside the prefix (LLM, projector, text tower, open_clip's visual.head) are ignored, and
  so are the pooled-output norms and heads under it (HF `layernorm.*`, `pooler.*`,
  `hidden_states_norms.*`; timm `head.*`, `norm_pre.*`; original `norm.*`, `head.*`). Everything
  else under the prefix must map: missing, unexpected or mis-shaped keys raise one
  hires_lmm.CheckpointError (a ValueError) listing all of them. timm conv-MLP checkpoints (fc
  weights stored as (out, in, 1, 1)) are flattened to (out, in). Before anything is built the
  config (from config.json: types and ranges, see ConvNeXtConfig) is checked against the keys'
  stages and blocks; dtype=None needs one floating dtype across the tower's tensors (mixed: an
  error naming them; pass dtype= to cast).
"""
import dataclasses
import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..checkpoint import CheckpointReader, open_checkpoint

__all__ = ["ConvNeXtConfig", "ConvNeXtTower", "ConvNeXtBlock", "KeyMap", "convnext_key_map"]

NORM_EPS = 1e-6          # every LayerNorm of the tower (HF hard-codes it)
MLP_RATIO = 4            # fc1: C -> 4C (HF ConvNextLayer)
DW_KERNEL = 7            # depthwise conv kernel size
DOWN_KERNEL = 2          # downsampling conv kernel size = stride


@dataclasses.dataclass(frozen=True)
class ConvNeXtConfig:
    """The fields of HF `ConvNextConfig` that shape the tower (defaults are HF's)."""
    hidden_sizes: Tuple[int, ...] = (96, 192, 384, 768)
    depths: Tuple[int, ...] = (3, 3, 9, 3)
    num_stages: int = 4
    num_channels: int = 3
    patch_size: int = 4
    layer_scale_init_value: float = 1e-6   # > 0: every block has a layer scale `gamma`
    layer_norm_eps: float = 1e-12          # HF's pooled-output norm only; the tower uses 1e-6
    hidden_act: str = "gelu"
    image_size: int = 224                  # informational (the tower takes any size)

    def __post_init__(self):
        """Types and ranges (ValueError naming the field): hidden_sizes and depths are lists of
        integers (not floats: nothing is truncated) with num_stages entries, widths in [1, 2^20],
        depths in [0, 1024], num_stages in [1, 16]; eps and layer scale finite numbers."""
        from ._weights import MAX_LAYERS, MAX_SIZE, check_int, check_int_list, check_real, check_str
        o = "ConvNeXtConfig"
        check_int(o, "num_stages", self.num_stages, 1, 16)
        object.__setattr__(self, "hidden_sizes",
                           check_int_list(o, "hidden_sizes", self.hidden_sizes, 1, MAX_SIZE))
        object.__setattr__(self, "depths", check_int_list(o, "depths", self.depths, 0, MAX_LAYERS))
        for name in ("hidden_sizes", "depths"):
            if len(getattr(self, name)) != self.num_stages:
                raise ValueError(f"ConvNeXtConfig: '{name}' has {len(getattr(self, name))} entries, "
                                 f"expected num_stages = {self.num_stages}")
        check_int(o, "num_channels", self.num_channels, 1, 1 << 10)
        check_int(o, "patch_size", self.patch_size, 1, 1 << 10)
        check_int(o, "image_size", self.image_size, 1, 1 << 16)
        check_real(o, "layer_scale_init_value", self.layer_scale_init_value, 0.0)
        check_real(o, "layer_norm_eps", self.layer_norm_eps, 0.0, 1.0, lo_open=True, hi_open=True)
        check_str(o, "hidden_act", self.hidden_act)
        if self.hidden_act != "gelu":
            raise ValueError(f"ConvNeXtConfig: 'hidden_act' must be 'gelu' (exact erf GELU, the "
                             f"one hires_lmm.ops.convnext_block computes), got {self.hidden_act!r}")

    @property
    def layer_scale(self) -> bool:
        return self.layer_scale_init_value > 0

    @property
    def stride(self) -> int:
        """Total stride of the last stage: patch_size * 2^(num_stages-1)."""
        return self.patch_size * DOWN_KERNEL ** (self.num_stages - 1)

    def grid(self, height: int, width: int) -> Tuple[int, int]:
        """Last-stage (h, w) for an input of height x width (the conv arithmetic: floors)."""
        h, w = height // self.patch_size, width // self.patch_size
        for _ in range(self.num_stages - 1):
            h, w = h // DOWN_KERNEL, w // DOWN_KERNEL
        return h, w

    @classmethod
    def from_dict(cls, d: Mapping) -> "ConvNeXtConfig":
        """From an HF ConvNextConfig dict (config.json). HF builds stage i from hidden_sizes[i] and
        depths[i] for i < num_stages, so longer lists are cut to num_stages (shorter ones raise).
        Absent or null fields take HF's defaults; every value is checked (__post_init__)."""
        from ._weights import check_int, check_int_list
        if not isinstance(d, Mapping):
            raise ValueError(f"ConvNeXtConfig: expected a config object (dict), got {type(d).__name__}")

        def get(name):
            v = d.get(name)
            return getattr(cls, name) if v is None else v

        num_stages = check_int("ConvNeXtConfig", "num_stages", get("num_stages"), 1, 16)
        hs = list(check_int_list("ConvNeXtConfig", "hidden_sizes", get("hidden_sizes"), 1))
        dp = list(check_int_list("ConvNeXtConfig", "depths", get("depths"), 0))
        for name, v in (("hidden_sizes", hs), ("depths", dp)):
            if len(v) < num_stages:
                raise ValueError(f"ConvNeXtConfig: '{name}' has {len(v)} entries, expected "
                                 f"num_stages = {num_stages}")
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls)
              if d.get(f.name) is not None and f.name not in ("hidden_sizes", "depths", "num_stages")}
        return cls(hidden_sizes=tuple(hs[:num_stages]), depths=tuple(dp[:num_stages]),
                   num_stages=num_stages, **kw)

    @classmethod
    def from_json(cls, path) -> "ConvNeXtConfig":
        """From a config.json; errors (invalid JSON, a bad field) name the file."""
        from ._weights import config_from_file
        return config_from_file(path, cls.from_dict, "ConvNeXtConfig.from_json")

    def to_hf_dict(self) -> dict:
        """The config as an HF ConvNextConfig dict (for transformers.ConvNextConfig(**d))."""
        d = dataclasses.asdict(self)
        d["hidden_sizes"], d["depths"] = list(self.hidden_sizes), list(self.depths)
        d["model_type"] = "convnext"
        return d


def _is_convnext_config(d: Mapping) -> bool:
    return d.get("model_type") == "convnext" or ("hidden_sizes" in d and "depths" in d
                                                  and "model_type" not in d)


# ---- modules ---------------------------------------------------------------------------------

class _Norm(nn.Module):
    """LayerNorm parameters over the channel (last, NHWC) dim."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, NORM_EPS)


class _Conv(nn.Module):
    """Conv2d(cin -> cout, kernel k, stride k, no padding) on NHWC in and out."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.k = k
        self.weight = nn.Parameter(torch.empty(cout, cin, k, k))
        self.bias = nn.Parameter(torch.empty(cout))

    def forward(self, x_nchw: torch.Tensor) -> torch.Tensor:
        # x_nchw: an NCHW view (channels-last memory) -> NHWC contiguous output. Conv arithmetic
        # as nn.Conv2d: out = floor(in / k), the remainder dropped.
        y = F.conv2d(x_nchw, self.weight, self.bias, stride=self.k)
        return y.permute(0, 2, 3, 1).contiguous()   # a no-op when the conv returned channels-last


class ConvNeXtBlock(nn.Module):
    """x + gamma * fc2(GELU_erf(fc1(LayerNorm(dwconv7x7(x))))) on NHWC x: one
    hires_lmm.ops.convnext_block call."""

    def __init__(self, dim: int, layer_scale: bool):
        super().__init__()
        self.dw_weight = nn.Parameter(torch.empty(dim, 1, DW_KERNEL, DW_KERNEL))
        self.dw_bias = nn.Parameter(torch.empty(dim))
        self.ln_weight = nn.Parameter(torch.empty(dim))
        self.ln_bias = nn.Parameter(torch.empty(dim))
        self.fc1_weight = nn.Parameter(torch.empty(MLP_RATIO * dim, dim))
        self.fc1_bias = nn.Parameter(torch.empty(MLP_RATIO * dim))
        self.fc2_weight = nn.Parameter(torch.empty(dim, MLP_RATIO * dim))
        self.fc2_bias = nn.Parameter(torch.empty(dim))
        if layer_scale:
            self.gamma = nn.Parameter(torch.empty(dim))
        else:
            self.register_parameter("gamma", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.convnext_block(x, self.dw_weight, self.dw_bias, self.ln_weight, self.ln_bias,
                                  self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias,
                                  self.gamma, NORM_EPS)


class _Stage(nn.Module):
    def __init__(self, cin: int, cout: int, depth: int, downsample: bool, layer_scale: bool):
        super().__init__()
        if downsample:
            self.down_norm = _Norm(cin)
            self.down = _Conv(cin, cout, DOWN_KERNEL)
        else:
            self.down_norm = self.down = None
        self.blocks = nn.ModuleList(ConvNeXtBlock(cout, layer_scale) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down is not None:
            x = self.down(self.down_norm(x).permute(0, 3, 1, 2))
        for blk in self.blocks:
            x = blk(x)
        return x


class ConvNeXtTower(nn.Module):
    """ConvNeXt trunk (stem + stages, optional 5th stage), NHWC inside.
    forward(pixel_values (B, C_in, H, W)) -> (B, h*w, C_last) raster tokens, no final norm."""

    def __init__(self, config: ConvNeXtConfig):
        super().__init__()
        self.config = config
        c0 = config.hidden_sizes[0]
        self.stem = _Conv(config.num_channels, c0, config.patch_size)
        self.stem_norm = _Norm(c0)
        # HF ConvNextEncoder: stage 0 keeps C0 at stride 1 (no downsampling layer); every later
        # stage downsamples by 2.
        self.stages = nn.ModuleList(
            _Stage(config.hidden_sizes[max(i - 1, 0)], config.hidden_sizes[i], config.depths[i],
                   downsample=i > 0, layer_scale=config.layer_scale)
            for i in range(config.num_stages))
        if self.stem.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """HF's init: conv/linear weights N(0, std), biases 0, norms (1, 0),
        gamma = layer_scale_init_value."""
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "gamma":
                p.fill_(self.config.layer_scale_init_value)
            elif leaf in ("ln_weight",) or (leaf == "weight" and p.dim() == 1):
                p.fill_(1.0)
            elif leaf.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)

    @property
    def dtype(self) -> torch.dtype:
        return self.stem.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.stem.weight.device

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The last stage's map, NHWC (B, h, w, C_last)."""
        cfg = self.config
        if pixel_values.dim() != 4 or pixel_values.shape[1] != cfg.num_channels:
            raise ValueError(f"ConvNeXtTower: argument 'pixel_values' must be (B, {cfg.num_channels}"
                             f", H, W), got shape {tuple(pixel_values.shape)}")
        H, W = pixel_values.shape[-2:]
        h, w = cfg.grid(H, W)
        if h < 1 or w < 1:
            raise ValueError(f"ConvNeXtTower: argument 'pixel_values' has H x W = {H} x {W}; the "
                             f"{cfg.num_stages}-stage tower needs at least {cfg.stride} x "
                             f"{cfg.stride} (its total stride)")
        x = pixel_values.to(device=self.device, dtype=self.dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem_norm(self.stem(x))
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(pixel_values)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype: Optional[torch.dtype] = None, device=None,
                        prefix: Optional[str] = None,
                        config: Optional[ConvNeXtConfig] = None) -> "ConvNeXtTower":
        """Load a tower from a folder (config.json + safetensors, single or sharded, or .bin) or a
        single checkpoint file (config inferred from the shapes); see the module docstring for the
        key names. dtype: default the checkpoint's (its tower tensors must then share one floating
        dtype; mixed: an error naming them). device: default cpu. prefix: the text before the
        tower's keys, found by itself when None. Checked before anything is built: a ConvNeXt stem
        in the keys (else the error says what the checkpoint is), the config's types and ranges,
        and its stages and blocks against the keys. Every problem raises
        hires_lmm.CheckpointError naming the file or the field."""
        from ._weights import CheckpointError, describe_checkpoint, read_config
        p = Path(os.fspath(path))
        d, source = None, str(p)
        if config is None and p.is_dir() and (p / "config.json").exists():
            d = read_config(p)
            if _is_convnext_config(d):
                source = str(p / "config.json")
                try:
                    config = ConvNeXtConfig.from_dict(d)
                except (ValueError, TypeError) as e:
                    raise CheckpointError(f"ConvNeXtTower.from_pretrained: config file {source}: "
                                          f"{e}") from None
        reader = open_checkpoint(p)
        stems = [s for s, _, _ in _NAMINGS.values()]
        if not any(k == s or k.endswith("." + s) for k in reader.keys() for s in stems):
            raise CheckpointError(f"ConvNeXtTower.from_pretrained({str(p)!r}): not a ConvNeXt tower "
                                  f"checkpoint: no ConvNeXt stem found (a key ending in one of "
                                  f"{stems}); {describe_checkpoint(d, reader.keys())}")
        return cls.from_state_dict(reader, config=config, dtype=dtype, device=device,
                                   prefix=prefix, source=source)

    @classmethod
    def from_state_dict(cls, state_dict, config: Optional[ConvNeXtConfig] = None,
                        dtype: Optional[torch.dtype] = None, device=None,
                        prefix: Optional[str] = None,
                        source: Optional[str] = None) -> "ConvNeXtTower":
        """Build on meta and load (assign=True) from a {key: tensor} mapping or a
        CheckpointReader, in any of the supported namings. config: inferred when None (else its
        stages and blocks are checked against the keys before building). dtype: None keeps the
        checkpoint's (one floating dtype, else CheckpointError). source: the config's file, for
        messages."""
        from ._weights import CheckpointError
        src = state_dict if isinstance(state_dict, CheckpointReader) else _DictSource(state_dict)
        keymap = convnext_key_map(src.keys(), prefix=prefix)
        mapping, unexpected = keymap.mapping, keymap.unexpected
        shapes = {internal: _target_shape(internal, src.shape(key))
                  for internal, key in mapping.items()}
        if config is None:
            try:
                config = _infer_config(shapes)
            except ValueError as e:
                where = getattr(src, "description", None) or "the state dict"
                raise CheckpointError(f"ConvNeXtTower: cannot infer the config from the shapes "
                                      f"in {where}: {e}") from None
        else:
            _check_counts(config, shapes, keymap, source)
        with torch.device("meta"):
            model = cls(config)
        params = dict(model.named_parameters())
        unexpected = unexpected + [mapping[k] for k in mapping if k not in params]
        missing = [k for k in params if k not in mapping]
        misshaped = [f"{mapping[k]}: checkpoint {tuple(shapes[k])}, model {tuple(params[k].shape)}"
                     for k in params if k in mapping and tuple(shapes[k]) != tuple(params[k].shape)]
        if missing or unexpected or misshaped:
            raise CheckpointError(_load_error(config, keymap, missing, unexpected, misshaped))
        dtypes = {k: src.dtype(mapping[k]) for k in params}
        notfloat = [f"{mapping[k]}: {dt}" for k, dt in dtypes.items()
                    if not (isinstance(dt, torch.dtype) and dt.is_floating_point)]
        if notfloat:
            raise CheckpointError(f"ConvNeXtTower: checkpoint keys must hold floating-point "
                                  f"tensors; these do not: {notfloat[:20]}")
        if dtype is None:
            kinds = {}
            for k, dt in dtypes.items():
                kinds.setdefault(dt, []).append(mapping[k])
            if len(kinds) > 1:
                parts = [f"{dt} ({len(ks)} keys, e.g. {ks[:3]})" for dt, ks in kinds.items()]
                raise CheckpointError(f"ConvNeXtTower: the checkpoint's tower tensors mix floating "
                                      f"dtypes: {'; '.join(parts)}; pass dtype= to cast all of "
                                      f"them to one")
            dtype = next(iter(kinds))
        device = torch.device(device if device is not None else "cpu")
        order = {key: i for i, key in enumerate(src.keys())}
        sd = {}
        for k in sorted(params, key=lambda k: order[mapping[k]]):   # shard by shard
            t = src.get(mapping[k])
            sd[k] = t.reshape(params[k].shape).to(device=device, dtype=dtype)
        model.load_state_dict(sd, strict=True, assign=True)
        return model.eval()


def _check_counts(config: ConvNeXtConfig, shapes, keymap, source: Optional[str]) -> None:
    """Before building: every stage and block the config asks for has keys in the checkpoint
    (a config with 10**6 blocks fails here instead of building them)."""
    from ._weights import CheckpointError
    have_stages = sorted({int(m.group(1)) for k in shapes for m in [_STAGE_RX.match(k)] if m})
    n_stages = max(have_stages[-1] + 1 if have_stages else 0, 1)
    depths = [0] * max(n_stages, config.num_stages)
    for k in shapes:
        m = _BLOCK_RX.match(k)
        if m:
            depths[int(m.group(1))] = max(depths[int(m.group(1))], int(m.group(2)) + 1)
    missing = []
    for i, want in enumerate(config.depths):
        if want > depths[i]:
            n = want - depths[i]
            missing.append(f"stages.{i}.blocks.{depths[i]}.*" + (
                "" if n == 1 else f" .. stages.{i}.blocks.{want - 1}.* ({n} blocks)"))
    if config.num_stages > n_stages:
        missing.insert(0, f"stages {n_stages}..{config.num_stages - 1} (num_stages = "
                          f"{config.num_stages}, the checkpoint has {n_stages})")
    if missing:
        where = f"config file {source}" if source else "the config"
        raise CheckpointError(
            f"ConvNeXtTower: {where} asks for more than the checkpoint holds (depths="
            f"{list(config.depths)} vs the checkpoint's {depths[:n_stages]}; naming "
            f"{keymap.naming!r} under prefix {keymap.prefix!r}); missing (nothing was built): "
            + "; ".join(missing))


class _DictSource:
    def __init__(self, d: Mapping[str, torch.Tensor]):
        self._d = d

    def keys(self):
        return self._d.keys()

    def shape(self, key):
        return tuple(self._d[key].shape)

    def dtype(self, key):
        return self._d[key].dtype

    def get(self, key):
        return self._d[key]


# ---- key names -------------------------------------------------------------------------------

_B = r"(weight|bias)"
# naming -> (stem conv name that identifies it, [(regex, internal template)], ignored regexes)
_NAMINGS = {
    "hf": ("embeddings.patch_embeddings.weight", [
        (rf"embeddings\.patch_embeddings\.{_B}", r"stem.\1"),
        (rf"embeddings\.layernorm\.{_B}", r"stem_norm.\1"),
        (rf"encoder\.stages\.(\d+)\.downsampling_layer\.0\.{_B}", r"stages.\1.down_norm.\2"),
        (rf"encoder\.stages\.(\d+)\.downsampling_layer\.1\.{_B}", r"stages.\1.down.\2"),
        (rf"encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.{_B}", r"stages.\1.blocks.\2.dw_\3"),
        (rf"encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.{_B}", r"stages.\1.blocks.\2.ln_\3"),
        (rf"encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv1\.{_B}", r"stages.\1.blocks.\2.fc1_\3"),
        (rf"encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv2\.{_B}", r"stages.\1.blocks.\2.fc2_\3"),
        (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter", r"stages.\1.blocks.\2.gamma"),
    ], [r"layernorm\..*", r"pooler\..*", r"hidden_states_norms\..*"]),
    "timm": ("stem.0.weight", [
        (rf"stem\.0\.{_B}", r"stem.\1"),
        (rf"stem\.1\.{_B}", r"stem_norm.\1"),
        (rf"stages\.(\d+)\.downsample\.0\.{_B}", r"stages.\1.down_norm.\2"),
        (rf"stages\.(\d+)\.downsample\.1\.{_B}", r"stages.\1.down.\2"),
        (rf"stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.{_B}", r"stages.\1.blocks.\2.dw_\3"),
        (rf"stages\.(\d+)\.blocks\.(\d+)\.norm\.{_B}", r"stages.\1.blocks.\2.ln_\3"),
        (rf"stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.{_B}", r"stages.\1.blocks.\2.fc1_\3"),
        (rf"stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.{_B}", r"stages.\1.blocks.\2.fc2_\3"),
        (r"stages\.(\d+)\.blocks\.(\d+)\.gamma", r"stages.\1.blocks.\2.gamma"),
    ], [r"head\..*", r"norm_pre\..*"]),
    "original": ("downsample_layers.0.0.weight", [
        (rf"downsample_layers\.0\.0\.{_B}", r"stem.\1"),
        (rf"downsample_layers\.0\.1\.{_B}", r"stem_norm.\1"),
        (rf"downsample_layers\.([1-9]\d*)\.0\.{_B}", r"stages.\1.down_norm.\2"),
        (rf"downsample_layers\.([1-9]\d*)\.1\.{_B}", r"stages.\1.down.\2"),
        (rf"stages\.(\d+)\.(\d+)\.dwconv\.{_B}", r"stages.\1.blocks.\2.dw_\3"),
        (rf"stages\.(\d+)\.(\d+)\.norm\.{_B}", r"stages.\1.blocks.\2.ln_\3"),
        (rf"stages\.(\d+)\.(\d+)\.pwconv1\.{_B}", r"stages.\1.blocks.\2.fc1_\3"),
        (rf"stages\.(\d+)\.(\d+)\.pwconv2\.{_B}", r"stages.\1.blocks.\2.fc2_\3"),
        (r"stages\.(\d+)\.(\d+)\.gamma", r"stages.\1.blocks.\2.gamma"),
    ], [r"norm\..*", r"head\..*"]),
}
_COMPILED = {name: ([(re.compile(rx), t) for rx, t in rules], [re.compile(rx) for rx in ign])
             for name, (_, rules, ign) in _NAMINGS.items()}


def _find_prefix(keys: Sequence[str]) -> Tuple[str, str]:
    """(naming, prefix) from the one key that names the stem conv weight."""
    found = []
    for k in keys:
        for naming, (stem, _, _) in _NAMINGS.items():
            if k == stem or k.endswith("." + stem):
                found.append((naming, k[: len(k) - len(stem)]))
    if len(found) == 1:
        return found[0]
    stems = [s for s, _, _ in _NAMINGS.values()]
    if not found:
        some = sorted(keys)[:8]
        raise ValueError(f"ConvNeXtTower: no ConvNeXt stem found in the checkpoint: expected a key "
                         f"ending in one of {stems}; its first keys are {some}")
    raise ValueError(f"ConvNeXtTower: the checkpoint holds several ConvNeXt stems "
                     f"{[p + _NAMINGS[n][0] for n, p in found]}; "
                     f"pass prefix= to pick one")


class KeyMap(NamedTuple):
    mapping: Dict[str, str]     # tower parameter name -> checkpoint key
    ignored: List[str]          # outside the prefix, or a known unused part (final norm, head)
    unexpected: List[str]       # under the prefix but not a tower parameter
    naming: str                 # "hf", "timm" (open_clip too) or "original"
    prefix: str


def convnext_key_map(keys, prefix: Optional[str] = None, naming: Optional[str] = None) -> KeyMap:
    """Map checkpoint keys onto the tower's parameter names. The naming ("hf", "timm",
    "original"; open_clip is timm under "visual.trunk.") and the prefix are found from the stem
    conv key unless given."""
    keys = list(keys)
    if prefix is None or naming is None:
        if prefix is not None:
            sub = [k[len(prefix):] for k in keys if k.startswith(prefix)]
            found_naming, inner = _find_prefix(sub)
            naming, prefix = naming or found_naming, prefix + inner
        else:
            found_naming, prefix = _find_prefix(keys)
            naming = naming or found_naming
    if naming not in _COMPILED:
        raise ValueError(f"convnext_key_map: argument 'naming' must be one of {list(_COMPILED)}, "
                         f"got {naming!r}")
    rules, ignore = _COMPILED[naming]
    mapping, ignored, unexpected = {}, [], []
    for k in keys:
        if not k.startswith(prefix):
            ignored.append(k)                      # LLM, projector, text tower, other heads
            continue
        rest = k[len(prefix):]
        for rx, tmpl in rules:
            m = rx.fullmatch(rest)
            if m:
                internal = m.expand(tmpl)
                if internal in mapping:
                    unexpected.append(k)
                else:
                    mapping[internal] = k
                break
        else:
            if any(rx.fullmatch(rest) for rx in ignore):
                ignored.append(k)
            else:
                unexpected.append(k)
    return KeyMap(mapping, ignored, unexpected, naming, prefix)


def _target_shape(internal: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    # timm conv-MLP blocks store fc weights as 1x1 convs (out, in, 1, 1)
    if internal.endswith(("fc1_weight", "fc2_weight")) and len(shape) == 4 and shape[2:] == (1, 1):
        return tuple(shape[:2])
    return tuple(shape)


_BLOCK_RX = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.")
_STAGE_RX = re.compile(r"stages\.(\d+)\.")


def _infer_config(shapes: Mapping[str, Tuple[int, ...]]) -> ConvNeXtConfig:
    """ConvNeXtConfig from the mapped tensor shapes (no config.json)."""
    if "stem.weight" not in shapes or len(shapes["stem.weight"]) != 4:
        raise ValueError("ConvNeXtTower: cannot infer the config: the stem conv weight is missing "
                         "or not 4-D")
    c0, cin, p, _ = shapes["stem.weight"]
    stages = sorted({int(m.group(1)) for k in shapes for m in [_STAGE_RX.match(k)] if m})
    if not stages:
        raise ValueError("ConvNeXtTower: cannot infer the config: the checkpoint has no stages")
    num_stages = stages[-1] + 1
    if num_stages > 16:
        raise ValueError(f"ConvNeXtTower: cannot infer the config: the checkpoint's keys name stage "
                         f"{stages[-1]} (at most 16 stages are supported)")
    depths, widths = [0] * num_stages, [0] * num_stages
    for k in shapes:
        m = _BLOCK_RX.match(k)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            depths[i] = max(depths[i], j + 1)
    for i in range(num_stages):
        dw = shapes.get(f"stages.{i}.blocks.0.dw_weight")
        down = shapes.get(f"stages.{i}.down.weight")
        if dw is not None:
            widths[i] = dw[0]
        elif down is not None:
            widths[i] = down[0]
        elif i == 0:
            widths[i] = c0
        else:
            raise ValueError(f"ConvNeXtTower: cannot infer the width of stage {i}: it has neither "
                             f"blocks nor a downsampling conv in the checkpoint")
    layer_scale = any(k.endswith(".gamma") for k in shapes)
    return ConvNeXtConfig(hidden_sizes=tuple(widths), depths=tuple(depths), num_stages=num_stages,
                          num_channels=cin, patch_size=p,
                          layer_scale_init_value=1e-6 if layer_scale else 0.0)


def _load_error(config, keymap, missing, unexpected, misshaped, limit: int = 20) -> str:
    def fmt(title, items):
        if not items:
            return ""
        shown = "\n    ".join(items[:limit])
        more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
        return f"\n  {title} ({len(items)}):\n    {shown}{more}"

    return (f"ConvNeXtTower: the checkpoint does not match the config (hidden_sizes="
            f"{list(config.hidden_sizes)}, depths={list(config.depths)}, layer_scale="
            f"{config.layer_scale}; checkpoint naming {keymap.naming!r} under prefix "
            f"{keymap.prefix!r}):" + fmt("missing (model parameters without a checkpoint key)",
                                            missing)
            + fmt("unexpected checkpoint keys", unexpected) + fmt("mis-shaped", misshaped))
