"""ConvNeXt family: fused depthwise 7x7 conv + LayerNorm, and the whole ConvNeXt block
(kernels/convnext/, csrc/convnext.cpp). x is NHWC (B, H, W, C).

Numerics: the depthwise conv and the LayerNorm statistics are computed in fp32 and rounded once.
In convnext_block the LayerNorm output and fc1's GELU output are rounded to x's dtype (they are
the inputs of the next GEMM, as in a bf16 PyTorch model); the GEMMs accumulate in fp32 and the
last epilogue (bias, layer scale, residual) rounds once."""
import torch

from .. import reference as _ref
from .._backend import use_reference
from ._register import check_fake_devices, op, register_reference_backward

__all__ = ["dwconv_layernorm", "convnext_block"]


def dwconv_layernorm(x, dw_weight, dw_bias, ln_weight, ln_bias, eps: float = 1e-6):
    """LayerNorm over C of the depthwise 7x7 conv (zero padding 3) of x.

    x (B,H,W,C) NHWC float32/float16/bfloat16, any strides (a non-unit channel stride costs a
    copy); dw_weight (C,1,7,7) as stored in checkpoints; dw_bias, ln_weight, ln_bias (C,); all of
    x's dtype. Returns (B,H,W,C) contiguous. On CUDA the conv output never reaches device memory
    before the norm (one kernel)."""
    if use_reference():
        return _ref.dwconv_layernorm(x, dw_weight, dw_bias, ln_weight, ln_bias, eps)
    return op("dwconv_layernorm")(x, dw_weight, dw_bias, ln_weight, ln_bias, eps)


def convnext_block(x, dw_weight, dw_bias, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight,
                   fc2_bias, gamma=None, eps: float = 1e-6):
    """x + gamma * fc2(GELU_erf(fc1(dwconv_layernorm(x)))), NHWC in and out (HF ConvNextLayer).

    x (B,H,W,C); dwconv/LN parameters as in dwconv_layernorm; fc1_weight (F,C) (F = 4C in
    ConvNeXt), fc1_bias (F,), fc2_weight (C,F), fc2_bias (C,), gamma (C,) layer scale or None;
    all of x's dtype. On CUDA with fp16/bf16 and C, F multiples of 8 the pointwise layers are
    CUTLASS GEMMs with fused epilogues; otherwise fp32 GEMMs."""
    if use_reference():
        return _ref.convnext_block(x, dw_weight, dw_bias, ln_weight, ln_bias, fc1_weight, fc1_bias,
                                   fc2_weight, fc2_bias, gamma, eps)
    return op("convnext_block")(x, dw_weight, dw_bias, ln_weight, ln_bias, fc1_weight, fc1_bias,
                                fc2_weight, fc2_bias, gamma, eps)


# ---- fake kernels (shapes only; torch.compile and meta tensors) ----------------------------
@torch.library.register_fake("hires_lmm::dwconv_layernorm")
def _(x, dw_weight, dw_bias, ln_weight, ln_bias, eps):
    check_fake_devices("dwconv_layernorm", x=x, dw_weight=dw_weight, dw_bias=dw_bias,
                       ln_weight=ln_weight, ln_bias=ln_bias)
    torch._check(x.dim() == 4, lambda: "dwconv_layernorm: argument 'x' must be 4-D (B, H, W, C)")
    torch._check(dw_weight.shape[0] == x.shape[-1],
                 lambda: "dwconv_layernorm: argument 'x' channel mismatch with 'dw_weight'")
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.register_fake("hires_lmm::convnext_block")
def _(x, dw_weight, dw_bias, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
      gamma, eps):
    check_fake_devices("convnext_block", x=x, dw_weight=dw_weight, dw_bias=dw_bias,
                       ln_weight=ln_weight, ln_bias=ln_bias, fc1_weight=fc1_weight,
                       fc1_bias=fc1_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias, gamma=gamma)
    torch._check(x.dim() == 4, lambda: "convnext_block: argument 'x' must be 4-D (B, H, W, C)")
    torch._check(dw_weight.shape[0] == x.shape[-1],
                 lambda: "convnext_block: argument 'x' channel mismatch with 'dw_weight'")
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# ---- autograd (recompute with the reference until backward kernels exist) -------------------
register_reference_backward("dwconv_layernorm", _ref.dwconv_layernorm)
register_reference_backward("convnext_block", _ref.convnext_block)
