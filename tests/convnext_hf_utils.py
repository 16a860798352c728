"""Helpers of the ConvNeXt tower tests: small random HF ConvNextModels and the checkpoint key
namings written out by hand (HF -> timm / open_clip / original), independent of the loader's
own key map."""
import re

import pytest
import torch

import hires_lmm  # noqa: F401  (loads torch.ops.hires_lmm before the HAS_BLOCK_KERNEL check)

transformers = pytest.importorskip("transformers")

HIDDEN = [8, 16, 24, 32, 40]
DEPTHS = [1, 1, 2, 1, 1]
# 5 stages: total stride 64. 211 x 150 -> 3 x 2 tokens with a dropped remainder at every level.
SIZES = [(64, 96), (97, 65), (211, 150)]

# The kernels backend runs only where the compiled op exists (after the kernel branch is merged).
HAS_BLOCK_KERNEL = hasattr(torch.ops.hires_lmm, "convnext_block")
BACKENDS = ["reference", pytest.param("kernels", marks=pytest.mark.skipif(
    not HAS_BLOCK_KERNEL, reason="torch.ops.hires_lmm.convnext_block is not built in this branch"))]


def make_hf(hidden=HIDDEN, depths=DEPTHS, layer_scale=1e-6, seed=0, cls=None):
    """A random HF ConvNextModel (fp32, eval) with random layer scales, norms and biases, so that
    every parameter matters in the output."""
    cls = cls or transformers.ConvNextModel
    torch.manual_seed(seed)
    cfg = transformers.ConvNextConfig(num_channels=3, hidden_sizes=list(hidden), depths=list(depths),
                                      num_stages=len(hidden), layer_scale_init_value=layer_scale,
                                      num_labels=5)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.uniform_(0.2, 1.0)
            elif p.dim() == 1 and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def hf_tokens(model, x):
    """HF last_hidden_state (B, C, h, w) -> (B, h*w, C) raster tokens."""
    with torch.no_grad():
        out = model(x).last_hidden_state
    return out.permute(0, 2, 3, 1).reshape(out.shape[0], -1, out.shape[1])


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


_TIMM = [
    (r"^embeddings\.patch_embeddings\.", "stem.0."),
    (r"^embeddings\.layernorm\.", "stem.1."),
    (r"^encoder\.stages\.(\d+)\.downsampling_layer\.(\d)\.", r"stages.\1.downsample.\2."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.", r"stages.\1.blocks.\2.norm."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv1\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv2\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter$", r"stages.\1.blocks.\2.gamma"),
    (r"^layernorm\.", "head.norm."),
]
_ORIGINAL = [
    (r"^embeddings\.patch_embeddings\.", "downsample_layers.0.0."),
    (r"^embeddings\.layernorm\.", "downsample_layers.0.1."),
    (r"^encoder\.stages\.(\d+)\.downsampling_layer\.(\d)\.", r"downsample_layers.\1.\2."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.", r"stages.\1.\2.dwconv."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.", r"stages.\1.\2.norm."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv1\.", r"stages.\1.\2.pwconv1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv2\.", r"stages.\1.\2.pwconv2."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter$", r"stages.\1.\2.gamma"),
    (r"^layernorm\.", "norm."),
]


def _rename(sd, rules):
    out = {}
    for k, v in sd.items():
        for rx, rep in rules:
            new, n = re.subn(rx, rep, k)
            if n:
                out[new] = v
                break
        else:
            raise AssertionError(f"no rule for {k}")
    return out


def to_naming(hf_sd, naming, prefix=""):
    """An HF ConvNextModel state dict (with its final `layernorm`) in another naming, under a
    prefix, with the unused parts real checkpoints carry (heads, text tower, LLM)."""
    hf_sd = {k: v.clone() for k, v in hf_sd.items()}
    c_last = hf_sd["layernorm.weight"].shape[0]
    if naming == "hf":
        sd = dict(hf_sd)
        sd["pooler.dummy"] = torch.zeros(1)
    elif naming in ("timm", "open_clip"):
        sd = _rename(hf_sd, _TIMM)
        sd["head.fc.weight"] = torch.randn(7, c_last)
        sd["head.fc.bias"] = torch.randn(7)
    elif naming == "original":
        sd = _rename(hf_sd, _ORIGINAL)
        sd["head.weight"] = torch.randn(7, c_last)
        sd["head.bias"] = torch.randn(7)
    else:
        raise ValueError(naming)
    out = {prefix + k: v for k, v in sd.items()}
    if naming == "open_clip":   # the rest of a CLIP checkpoint
        out.update({"visual.head.mlp.fc1.weight": torch.randn(6, c_last),
                    "visual.head.mlp.fc1.bias": torch.randn(6),
                    "visual.head.mlp.fc2.weight": torch.randn(4, 6),
                    "token_embedding.weight": torch.randn(10, 4),
                    "positional_embedding": torch.randn(5, 4),
                    "transformer.resblocks.0.attn.in_proj_weight": torch.randn(12, 4),
                    "ln_final.weight": torch.randn(4), "text_projection": torch.randn(4, 4),
                    "logit_scale": torch.ones(())})
    if prefix.startswith("model.vision_tower"):   # the rest of a LLaVA checkpoint
        out.update({"model.embed_tokens.weight": torch.randn(10, 4),
                    "model.layers.0.mlp.up_proj.weight": torch.randn(8, 4),
                    "model.mm_projector.0.weight": torch.randn(4, c_last),
                    "model.mm_projector.0.bias": torch.randn(4),
                    "lm_head.weight": torch.randn(10, 4)})
    return out
