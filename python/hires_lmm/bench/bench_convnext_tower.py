"""Benchmark: the whole ConvNeXt tower (hires_lmm.models.ConvNeXtTower) against HF
`transformers.ConvNextModel` with the same random weights.

  quick=False: ConvLLaVA-1536's tower (depths [3,3,27,3,6], widths [192..3072], 669M params),
               B=1, at 768 / 1024 / 1536 px; bf16 on CUDA (target: >= 1.5x HF bf16), fp32 on CPU
               at 256 / 384 px (the CPU path, no target).
  quick=True:  a tiny 5-stage config at 128 / 192 px (a CPU smoke run).
max_err is relative: max|ours - HF fp32| / max|HF fp32| (HF in fp32 on the same weights), tol 3e-2
for bf16 and 1e-4 for fp32. When torch.ops.hires_lmm.convnext_block is not built, "ours" runs the
reference ops and the case name ends in "[ref ops]". Layer scales are drawn from U(0.05, 0.2) (not the 1e-6
init) so that every block contributes to the output being checked.
"""
import copy
from typing import List

import torch

from .. import use_backend
from ..models.convnext import MLP_RATIO, ConvNeXtConfig, ConvNeXtTower
from .common import Case

CONVLLAVA_1536 = ConvNeXtConfig(hidden_sizes=(192, 384, 768, 1536, 3072), depths=(3, 3, 27, 3, 6),
                                num_stages=5, image_size=1536)
TINY = ConvNeXtConfig(hidden_sizes=(16, 32, 48, 64, 96), depths=(1, 1, 2, 1, 1), num_stages=5)


def tower_macs(cfg: ConvNeXtConfig, height: int, width: int) -> int:
    """Multiply-adds of one image through the tower (convs, depthwise conv, the two fc layers)."""
    h, w = height // cfg.patch_size, width // cfg.patch_size
    macs = h * w * cfg.hidden_sizes[0] * cfg.num_channels * cfg.patch_size ** 2
    for i, (c, d) in enumerate(zip(cfg.hidden_sizes, cfg.depths)):
        if i > 0:
            h, w = h // 2, w // 2
            macs += h * w * c * cfg.hidden_sizes[i - 1] * 4
        macs += d * h * w * c * (49 + 2 * MLP_RATIO * c)
    return macs


def _hf_model(cfg: ConvNeXtConfig, device: str, dtype: torch.dtype):
    import transformers
    hf_cfg = transformers.ConvNextConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                            if k != "model_type"})
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.ConvNextModel(hf_cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.uniform_(0.05, 0.2)
    return model.to(dtype).eval()


def cases(device: str, quick: bool) -> List[Case]:
    cfg = TINY if quick else CONVLLAVA_1536
    if quick:
        sizes = [128, 192]
    else:
        sizes = [768, 1024, 1536] if device == "cuda" else [256, 384]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    backend = "kernels" if hasattr(torch.ops.hires_lmm, "convnext_block") else "reference"
    note = "" if backend == "kernels" else " [ref ops]"   # convnext_block not built

    hf = _hf_model(cfg, device, dtype)
    tower = ConvNeXtTower.from_state_dict(hf.state_dict(), dtype=dtype, device=device)
    hf32 = {}

    def fp32_model():
        if "m" not in hf32:
            hf32["m"] = hf if dtype == torch.float32 else copy.deepcopy(hf).float()
        return hf32["m"]

    out = []
    for s in sizes:
        x = torch.randn(1, 3, s, s, device=device, dtype=dtype)
        h, w = cfg.grid(s, s)

        def ours(x=x):
            with torch.inference_mode(), use_backend(backend):
                return tower(x)

        def hf_eager(x=x):
            with torch.inference_mode():
                return hf(x).last_hidden_state

        def max_err(x=x):
            with torch.inference_mode():
                ref = fp32_model()(x.float()).last_hidden_state
                ref = ref.permute(0, 2, 3, 1).reshape(1, -1, ref.shape[1])
                got = ours(x).float()
            return ((got - ref).abs().max() / ref.abs().max()).item()

        out.append(Case(op="convnext_tower",
                        case=f"{'tiny' if quick else 'convllava1536'} {s}x{s} -> {h * w} tokens"
                             f"{note}",
                        dtype=dtype, ours=ours, references={"hf_eager": hf_eager},
                        flops=2.0 * tower_macs(cfg, s, s), max_err=max_err, tol=tol))
    return out
