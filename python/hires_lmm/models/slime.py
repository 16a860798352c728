"""SliME's visual side (specs/slime.md; arXiv 2406.08487, code github.com/yfzhang114/SliME):

    image -> slice_image: [global 336^2 ; n local 336^2 crops] (UHD grid rule, anyres_grid)
    CLIP-L/336 layer -2 features F (1+n, 576, 1024)               (not in this file)
    global: GatedAdapters(F[0]) -> (576, H)     per-token soft mix of MLP(x) and MLP(Resampler576(x))
    local : Resampler144(F[1:]) -> projector (MLP only: the 576-token gate rule) -> (n, 144, H)
            -> raster order over the whole (rows*12) x (cols*12) grid -> (n*144, H)
            -> similarity_topp against the prompt's input embeddings -> kept tokens (K, H)
    visual block = [global ; embed(',') ; kept local]                  (SliMEVisual.forward)

Everything runs through hires_lmm.ops (flash_attn_func, layer_norm, similarity_topp,
gather_tokens), so hires_lmm.set_backend("reference") switches the whole module to PyTorch.
The selector has two variants (specs/slime.md 3.4): presoftmax_temperature=0.5 is the double
softmax of the first commit, which the released checkpoints were trained and evaluated with
(K ~ ceil(0.95 N)); None is the single softmax of the code at HEAD."""
import dataclasses
import math
import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops

__all__ = ["anyres_grid", "resize_and_pad_image", "slice_image", "get_2d_sincos_pos_embed",
           "resize_pos_embed", "Resampler", "GatedAdapters", "SliMEConfig", "SliMEVisual",
           "raster_order", "CLIP_MEAN", "CLIP_STD"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
GATED_TOKENS = 576  # GatedBlock gates only inputs with 576 tokens (x.shape[0] or x.shape[1])


# ---- 1. slicing (llava/mm_utils.py: select_best_resolution_uhd, resize_and_pad_image) ----------
def anyres_grid(width: int, height: int, patch: int = 336) -> Tuple[int, int]:
    """SliME's UHD grid rule (specs/slime.md 1.2) -> (cols, rows), 2..7 crops.

    scale = ceil(W H / patch^2), clamped to 6, 1 -> 2; candidates: every factorisation
    (cols = i, rows = n / i) of n in {scale-1, scale, scale+1} ({scale, scale+1} when scale <= 2),
    ordered by n then i; pick the largest effective resolution min(int(W s) int(H s), W H),
    s = min(cw / W, ch / H), ties to the smaller waste, exact ties to the first candidate."""
    if width < 1 or height < 1:
        raise ValueError(f"anyres_grid: argument 'width'/'height' must be >= 1, got {width}x{height}")
    scale = math.ceil(width * height / (patch * patch))
    scale = min(scale, 6)
    if scale == 1:
        scale = 2
    ns = [scale, scale + 1] if scale <= 2 else [scale - 1, scale, scale + 1]
    best, best_eff, best_waste = None, -1, None
    for n in ns:
        for i in range(1, n + 1):
            if n % i:
                continue
            cols, rows = i, n // i
            cw, ch = cols * patch, rows * patch
            s = min(cw / width, ch / height)
            eff = min(int(width * s) * int(height * s), width * height)
            waste = cw * ch - eff
            if eff > best_eff or (eff == best_eff and waste < best_waste):
                best, best_eff, best_waste = (cols, rows), eff, waste
    return best


def resize_and_pad_image(image, target: Tuple[int, int]):
    """Aspect-kept resize to fit target (w, h) (PIL's default resample, ceil on the scaled side),
    pasted centred on a black canvas (LLaVA's resize_and_pad_image)."""
    from PIL import Image
    ow, oh = image.size
    tw, th = target
    sw, sh = tw / ow, th / oh
    if sw < sh:
        nw, nh = tw, min(math.ceil(oh * sw), th)
    else:
        nw, nh = min(math.ceil(ow * sh), tw), th
    resized = image.resize((nw, nh))
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(resized, ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def _clip_normalize(image) -> torch.Tensor:
    """CLIPImageProcessor on a patch x patch RGB image: /255, (x - mean) / std -> (3, h, w) fp32."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255.0))
    x = x.permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def slice_image(image, patch: int = 336) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """PIL image -> (views (1 + n, 3, patch, patch) fp32 CLIP-normalised, (cols, rows)).

    views[0] is the global view, a plain resize to patch x patch (aspect not kept, no padding, as
    the code does); views[1:] are the n = cols * rows crops of the aspect-kept, black-padded
    (cols*patch, rows*patch) canvas in row-major order (rows outer, cols inner)."""
    image = image.convert("RGB")
    cols, rows = anyres_grid(image.size[0], image.size[1], patch)
    canvas = resize_and_pad_image(image, (cols * patch, rows * patch))
    views = [image.resize((patch, patch))]
    for r in range(rows):
        for c in range(cols):
            views.append(canvas.crop((c * patch, r * patch, (c + 1) * patch, (r + 1) * patch)))
    return torch.stack([_clip_normalize(v) for v in views]), (cols, rows)


# ---- 2. Resampler (Qwen-VL style learnable-query cross-attention) ------------------------------
def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """MAE's 2-D sin-cos table (grid_size^2, embed_dim) fp32: first half from the column
    coordinate (np.meshgrid(w, h)[0]), second half from the row coordinate; each half is
    [sin(pos * omega), cos(pos * omega)] with omega = 1 / 10000^(2i / (embed_dim / 2))."""
    assert embed_dim % 4 == 0, "embed_dim must be a multiple of 4"
    gw, gh = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(embed_dim // 2, gw), one_d(embed_dim // 2, gh)], axis=1)
    return torch.from_numpy(emb).float()


def resize_pos_embed(pos_embed: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(L, C) on a sqrt(L) grid -> (num_tokens, C) on a sqrt(num_tokens) grid, bicubic,
    align_corners=False, in fp32 (Qwen-VL's get_abs_pos); identity when the grids match."""
    src, tgt = int(math.isqrt(pos_embed.shape[0])), int(math.isqrt(num_tokens))
    if src == tgt:
        return pos_embed
    x = pos_embed.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).flatten(0, 2).to(pos_embed.dtype)


class _MHAWeights(nn.Module):
    """nn.MultiheadAttention's parameters, same names and packed layout: in_proj_weight
    (3E, E) = [W_q; W_k; W_v], in_proj_bias (3E,), out_proj.{weight, bias}."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query, key, value):
        """query (B, Q, E), key/value (B, L, E) -> (B, Q, E): softmax(q k^T / sqrt(E/H)) v per
        head through ops.flash_attn_func, then out_proj (nn.MultiheadAttention, no mask)."""
        E, H = self.embed_dim, self.num_heads
        wq, wk, wv = self.in_proj_weight.chunk(3, dim=0)
        bq, bk, bv = self.in_proj_bias.chunk(3, dim=0)
        B, Q, L = query.shape[0], query.shape[1], key.shape[1]
        q = F.linear(query, wq, bq).view(B, Q, H, E // H)
        k = F.linear(key, wk, bk).view(B, L, H, E // H)
        v = F.linear(value, wv, bv).view(B, L, H, E // H)
        o = ops.flash_attn_func(q, k, v, softmax_scale=1.0 / math.sqrt(E // H), causal=False)
        return self.out_proj(o.reshape(B, Q, E))


class Resampler(nn.Module):
    """SliME's learnable-query compressor (llava/model/multimodal_resampler/sampler.py; Qwen-VL
    style). grid_size^2 queries, one cross-attention, no FFN, no residual:

        x_n = ln_kv(kv_proj(x))                     kv_proj = Identity when kv_dim == embed_dim
        q   = ln_q(query) + pos_embed               (grid_size^2 x grid_size^2 sin-cos)
        k   = x_n + resize_pos_embed(pos_embed, L)  (bicubic to the input's sqrt(L) grid)
        out = proj(ln_post(MHA(q, k, x_n)))         proj = Identity

    Keys: query, pos_embed, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.{weight,bias},
    ln_q.*, ln_kv.*, ln_post.* (and kv_proj.weight only when kv_dim != embed_dim).
    LayerNorms eps 1e-6. Input (B, L, kv_dim) or (L, kv_dim) -> (B, grid_size^2, embed_dim)."""

    def __init__(self, grid_size: int, embed_dim: int, num_heads: int, kv_dim: Optional[int] = None,
                 eps: float = 1e-6):
        super().__init__()
        self.grid_size, self.embed_dim, self.num_heads, self.eps = grid_size, embed_dim, num_heads, eps
        self.num_queries = grid_size * grid_size
        self.pos_embed = nn.Parameter(get_2d_sincos_pos_embed(embed_dim, grid_size), requires_grad=False)
        self.query = nn.Parameter(torch.zeros(self.num_queries, embed_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.kv_proj = (nn.Linear(kv_dim, embed_dim, bias=False)
                        if kv_dim is not None and kv_dim != embed_dim else nn.Identity())
        self.attn = _MHAWeights(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_post = nn.LayerNorm(embed_dim, eps=eps)

    def _ln(self, ln: nn.LayerNorm, x):
        return ops.layer_norm(x, ln.weight, ln.bias, self.eps)

    def forward(self, x):
        if x.dim() == 2:
            x = x.unsqueeze(0)
        B, L = x.shape[0], x.shape[1]
        x = self._ln(self.ln_kv, self.kv_proj(x))
        pos_q = self.pos_embed.to(x.dtype)
        pos_k = resize_pos_embed(self.pos_embed, L).to(x.dtype)
        q = (self._ln(self.ln_q, self.query.to(x.dtype)) + pos_q).unsqueeze(0).expand(B, -1, -1)
        out = self.attn(q, x + pos_k.unsqueeze(0), x)
        return self._ln(self.ln_post, out)


# ---- 3. mixture of adapters (GatedBlock, llava/model/multimodal_projector/builder.py) ----------
class GatedAdapters(nn.Module):
    """SliME's global projector: two experts sharing one MLP (mlp2x_gelu),
    e0 = projection(x), e1 = projection(attn(x)) with attn a 576-query Resampler, mixed per token
    by g = softmax(x @ w_gate) / (sum + 1e-6) computed from the raw CLIP tokens (inference: no
    noise). Only inputs with 576 tokens (x.shape[0] == 576 or x.shape[1] == 576, the code's rule)
    are gated; anything else (the (n, 144, 1024) local tokens) gets projection(x) alone.

    Keys: projection.{0,2}.{weight,bias}, attn.* (Resampler), w_gate (D, 2), w_noise (D, 2; training
    only), buffers mean, std (1,) (stored by the checkpoints, unused at inference)."""

    def __init__(self, mm_hidden_size: int = 1024, hidden_size: int = 4096, grid_size: int = 24,
                 num_heads: Optional[int] = None, num_experts: int = 2):
        super().__init__()
        self.projection = nn.Sequential(nn.Linear(mm_hidden_size, hidden_size), nn.GELU(),
                                        nn.Linear(hidden_size, hidden_size))
        self.attn = Resampler(grid_size, mm_hidden_size, num_heads or mm_hidden_size // 128, mm_hidden_size)
        self.w_gate = nn.Parameter(torch.zeros(mm_hidden_size, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(mm_hidden_size, num_experts))
        self.register_buffer("mean", torch.zeros(1))
        self.register_buffer("std", torch.ones(1))
        self.gated_tokens = grid_size * grid_size

    def gates(self, x):
        """(..., D) -> (..., 2) fp32: softmax over the experts of x @ w_gate, renormalised."""
        logits = (x @ self.w_gate.to(x.dtype)).float()
        p = torch.softmax(logits, dim=-1)
        return p / (p.sum(-1, keepdim=True) + 1e-6)

    def forward(self, x):
        gated = x.shape[0] == self.gated_tokens or x.shape[1] == self.gated_tokens  # the code's rule
        if not gated:
            return self.projection(x)
        g = self.gates(x).to(x.dtype)
        e0 = self.projection(x)
        e1 = self.projection(self.attn(x))        # (B, 576, H); (1, 576, H) for a 2-D input
        if x.dim() == 2:
            e1 = e1.squeeze(0)
        return g[..., 0:1] * e0 + g[..., 1:2] * e1


# ---- 4. the local branch and the visual block ------------------------------------------------
def raster_order(local: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(n, q*q, H) crop-major tokens of a (cols, rows) grid -> (n*q*q, H) in raster order over the
    whole (rows*q) x (cols*q) token grid (SliME's `spatial` merge: reshape (rows, cols, q, q, H),
    permute (0, 2, 1, 3, 4), flatten)."""
    cols, rows = grid
    n, L, H = local.shape
    q = int(math.isqrt(L))
    if n != cols * rows or q * q != L:
        raise ValueError(f"raster_order: argument 'local' has shape {tuple(local.shape)}, expected "
                         f"({cols * rows}, q*q, H) for the grid {cols}x{rows}")
    return local.view(rows, cols, q, q, H).permute(0, 2, 1, 3, 4).reshape(n * L, H)


@dataclasses.dataclass(frozen=True)
class SliMEConfig:
    """The fields of a SliME config.json that the visual side reads (specs/slime.md 6.1)."""
    hidden_size: int = 4096
    mm_hidden_size: int = 1024
    mm_resampler_dim: int = 144
    mm_resampler_topp: float = 0.95
    mm_resampler_temp: float = 1.0
    seperator: int = 1919                       # the code's spelling; the ',' token id
    mm_projector_type: str = "gated"
    mm_resampler_type: str = "cosine"
    mm_patch_merge_type: str = "spatial"
    image_size: int = 336
    global_grid: int = 24                       # 576 CLIP tokens per 336 view
    # The selector variant is not in config.json: 0.5 = the first commit (the checkpoints),
    # None = the code at HEAD (single softmax).
    presoftmax_temperature: Optional[float] = 0.5

    @classmethod
    def from_dict(cls, d: Dict, presoftmax_temperature: Optional[float] = 0.5) -> "SliMEConfig":
        """From a SliME config.json dict; absent fields take the released model's values, every
        value is checked (__post_init__: ValueError naming the field)."""
        if not isinstance(d, dict):
            raise ValueError(f"SliMEConfig: expected a config object (dict), got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["presoftmax_temperature"] = presoftmax_temperature
        cfg = cls(**kw)
        if cfg.mm_projector_type != "gated" or cfg.mm_resampler_type != "cosine":
            raise ValueError(f"SliMEConfig: mm_projector_type={cfg.mm_projector_type!r}, mm_resampler_type="
                             f"{cfg.mm_resampler_type!r}; only 'gated' + 'cosine' (the released SliME) are supported")
        return cfg

    def __post_init__(self):
        """Types and ranges (ValueError naming the field): mm_hidden_size a multiple of 128 (the
        resamplers' heads are mm_hidden_size / 128), mm_resampler_dim a square, topp in (0, 1],
        temperatures finite and positive."""
        from ._weights import MAX_SIZE, MAX_VOCAB, check_int, check_real, check_str
        o = "SliMEConfig"
        check_int(o, "hidden_size", self.hidden_size, 1, MAX_SIZE)
        check_int(o, "mm_hidden_size", self.mm_hidden_size, 128, 1 << 14)
        if self.mm_hidden_size % 128:
            raise ValueError(f"{o}: field 'mm_hidden_size' must be a multiple of 128 (one "
                             f"attention head per 128 channels), got {self.mm_hidden_size}")
        check_int(o, "mm_resampler_dim", self.mm_resampler_dim, 1, 1 << 12)
        if math.isqrt(self.mm_resampler_dim) ** 2 != self.mm_resampler_dim:
            raise ValueError(f"{o}: field 'mm_resampler_dim' must be a square (grid x grid "
                             f"queries), got {self.mm_resampler_dim}")
        check_real(o, "mm_resampler_topp", self.mm_resampler_topp, 0.0, 1.0, lo_open=True)
        check_real(o, "mm_resampler_temp", self.mm_resampler_temp, 0.0, lo_open=True)
        check_int(o, "seperator", self.seperator, 0, MAX_VOCAB)
        for name in ("mm_projector_type", "mm_resampler_type", "mm_patch_merge_type"):
            check_str(o, name, getattr(self, name))
        check_int(o, "image_size", self.image_size, 1, 1 << 15)
        check_int(o, "global_grid", self.global_grid, 1, 64)
        if self.presoftmax_temperature is not None:
            check_real(o, "presoftmax_temperature", self.presoftmax_temperature, 0.0, lo_open=True)

    @classmethod
    def from_json(cls, path: str, presoftmax_temperature: Optional[float] = 0.5) -> "SliMEConfig":
        """From a config.json (or the folder holding it); errors name the file."""
        from ._weights import config_from_file
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        return config_from_file(path, lambda d: cls.from_dict(d, presoftmax_temperature),
                                "SliMEConfig.from_json")


class SliMEVisual(nn.Module):
    """The projector, the local compressor and the selector of SliME; CLIP features in, the
    visual block out (specs/slime.md section 5, steps 2-6).

    Checkpoint keys (load_checkpoint): model.mm_projector.* -> projector.*,
    model.sampler.post_qformer.* -> sampler.*; other keys (LLM, vision tower) are ignored."""

    KEY_PREFIXES = {"model.mm_projector.": "projector.", "model.sampler.post_qformer.": "sampler."}

    def __init__(self, config: SliMEConfig):
        super().__init__()
        self.config = config
        D, H = config.mm_hidden_size, config.hidden_size
        self.projector = GatedAdapters(D, H, config.global_grid, D // 128)
        self.sampler = Resampler(int(math.isqrt(config.mm_resampler_dim)), D, D // 128, D)

    def local_tokens(self, local_features: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """(n, 576, D) CLIP features of the crops -> (n*144, H) projected tokens in raster order."""
        c = self.sampler(local_features)          # (n, 144, D)
        z = self.projector(c)                     # MLP only: 144 tokens are not gated
        return raster_order(z, grid)

    def select(self, local: torch.Tensor, text_embeds: torch.Tensor, text_mask=None):
        """(L, H) local tokens, (T, H) prompt input embeddings -> kept (K, H), raster order kept."""
        cfg = self.config
        idx, lengths = ops.similarity_topp(local.unsqueeze(0), text_embeds.unsqueeze(0).to(local.dtype),
                                           cfg.mm_resampler_topp,
                                           None if text_mask is None else text_mask.unsqueeze(0),
                                           cfg.mm_resampler_temp, cfg.presoftmax_temperature)
        kept = ops.gather_tokens(local.unsqueeze(0), idx)[0]
        return kept[: int(lengths[0])]            # one sync: K is data-dependent

    def forward(self, features: torch.Tensor, grid: Tuple[int, int], text_embeds: torch.Tensor,
                separator_embed: torch.Tensor, text_mask=None) -> torch.Tensor:
        """features (1 + n, 576, D): [global, crops] CLIP layer -2 without CLS; grid (cols, rows)
        from slice_image; text_embeds (T, H): embed_tokens of every non-image prompt token;
        separator_embed (H,): embed_tokens(config.seperator).
        -> (576 + 1 + K, H) = [GatedAdapters(global) ; separator ; selected local tokens]."""
        g = self.projector(features[0])           # (576, H), gated
        local = self.local_tokens(features[1:], grid)
        kept = self.select(local, text_embeds, text_mask)
        return torch.cat([g, separator_embed.to(g.dtype).view(1, -1), kept], dim=0)

    @classmethod
    def key_map(cls, key: str) -> Optional[str]:
        """SliME checkpoint key -> our name, or None for keys this module does not own."""
        for src, dst in cls.KEY_PREFIXES.items():
            if key.startswith(src):
                return dst + key[len(src):]
        return None

    @classmethod
    def from_pretrained(cls, ckpt_dir: str, dtype: Optional[torch.dtype] = None, device=None,
                        presoftmax_temperature: Optional[float] = 0.5) -> "SliMEVisual":
        """Config from ckpt_dir/config.json, built on meta, the projector and sampler keys loaded
        strictly through hires_lmm.checkpoint (safetensors, sharded or not; .bin fallback).
        Checked before anything is built: the keys hold SliME's projector and sampler (else the
        error says what the checkpoint is), the config's types and ranges, and hidden_size /
        mm_hidden_size / mm_resampler_dim / global_grid against the stored shapes. Every problem
        raises hires_lmm.CheckpointError naming the file or the field."""
        from ._weights import CheckpointError, check_kind, load_into, open_pretrained, parse_config
        pre = open_pretrained("SliMEVisual.from_pretrained", ckpt_dir)
        check_kind(pre, "SliMEVisual")
        config = parse_config(pre, lambda d: SliMEConfig.from_dict(d, presoftmax_temperature))
        D, H = config.mm_hidden_size, config.hidden_size
        want = {"model.mm_projector.projection.0.weight": ((H, D), "hidden_size, mm_hidden_size"),
                "model.mm_projector.attn.query": ((config.global_grid ** 2, D),
                                                  "global_grid^2, mm_hidden_size"),
                "model.sampler.post_qformer.query": ((config.mm_resampler_dim, D),
                                                     "mm_resampler_dim, mm_hidden_size")}
        for key, (shape, fields) in want.items():
            if key in pre.reader and tuple(pre.reader.shape(key)) != shape:
                raise CheckpointError(
                    f"{pre.owner}: config file {pre.config_path} gives ({fields}) = {shape} but "
                    f"{key} in {pre.reader.file(key)} has shape {tuple(pre.reader.shape(key))}; "
                    f"the config and the weights disagree (nothing was built)")
        with torch.device("meta"):
            model = cls(config)
        load_into(model, ckpt_dir, cls.key_map, dtype=dtype, device=device, reader=pre.reader)
        return model.eval()

    def load_checkpoint(self, state_dict: Dict[str, torch.Tensor]) -> None:
        """Load SliME's keys with the explicit prefix map; missing, unexpected (under the mapped
        prefixes) or mis-shaped keys raise one error listing them."""
        mine = self.state_dict()
        mapped, unexpected = {}, []
        for k, v in state_dict.items():
            for src, dst in self.KEY_PREFIXES.items():
                if k.startswith(src):
                    name = dst + k[len(src):]
                    if name in mine:
                        mapped[name] = v
                    else:
                        unexpected.append(k)
                    break
        missing = sorted(set(mine) - set(mapped))
        shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(mine[k].shape)}"
                  for k, v in mapped.items() if tuple(v.shape) != tuple(mine[k].shape)]
        if missing or unexpected or shapes:
            raise ValueError("SliMEVisual.load_checkpoint: " + "; ".join(
                part for part in (f"missing keys {missing}" if missing else "",
                                  f"unexpected keys {sorted(unexpected)}" if unexpected else "",
                                  f"mis-shaped keys {shapes}" if shapes else "") if part))
        self.load_state_dict(mapped, strict=True, assign=True)
