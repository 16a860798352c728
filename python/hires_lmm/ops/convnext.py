"""ConvNeXt family: fused depthwise 7x7 conv + LayerNorm, and the whole ConvNeXt block
(kernels/convnext/, csrc/convnext.cpp). x is NHWC (B, H, W, C)."""
from .. import reference as _ref
from .._backend import use_reference
from ._register import op

__all__ = ["dwconv_layernorm", "convnext_block"]


def dwconv_layernorm(x, dw_weight, dw_bias, ln_weight, ln_bias, eps: float = 1e-6):
    """LayerNorm over C of the depthwise 7x7 conv (zero padding 3) of x (B,H,W,C).
    dw_weight (C,1,7,7) as stored in checkpoints; the conv output never reaches device memory."""
    if use_reference():
        return _ref.dwconv_layernorm(x, dw_weight, dw_bias, ln_weight, ln_bias, eps)
    return op("dwconv_layernorm")(x, dw_weight, dw_bias, ln_weight, ln_bias, eps)


def convnext_block(x, dw_weight, dw_bias, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight,
                   fc2_bias, gamma=None, eps: float = 1e-6):
    """x + gamma * fc2(GELU_erf(fc1(dwconv_layernorm(x)))), NHWC in and out."""
    if use_reference():
        return _ref.convnext_block(x, dw_weight, dw_bias, ln_weight, ln_bias, fc1_weight, fc1_bias,
                                   fc2_weight, fc2_bias, gamma, eps)
    return op("convnext_block")(x, dw_weight, dw_bias, ln_weight, ln_bias, fc1_weight, fc1_bias,
                                fc2_weight, fc2_bias, gamma, eps)
