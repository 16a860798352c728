"""PyTorch references of the ConvNeXt family (HF ConvNextLayer math), computed in fp32 and
rounded once to the input dtype. x is NHWC (B, H, W, C)."""
import torch
import torch.nn.functional as F

from .deepstack import stable_layer_norm

__all__ = ["dwconv_layernorm", "convnext_block"]


def dwconv_layernorm(x, dw_weight, dw_bias, ln_weight, ln_bias, eps=1e-6):
    """LayerNorm over C of the depthwise 7x7 conv (zero padding 3) of x (B,H,W,C);
    dw_weight (C,1,7,7) as stored in checkpoints, dw_bias (C,) or None."""
    C = x.shape[-1]
    y = F.conv2d(x.permute(0, 3, 1, 2).float(), dw_weight.float(),
                 None if dw_bias is None else dw_bias.float(), padding=dw_weight.shape[-1] // 2,
                 groups=C)
    # fp32 LayerNorm; a pixel whose fp32 variance overflows is redone in fp64 (as the kernels)
    y = stable_layer_norm(y.permute(0, 2, 3, 1), ln_weight.float(),
                          None if ln_bias is None else ln_bias.float(), eps)
    return y.to(x.dtype)


def convnext_block(x, dw_weight, dw_bias, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight,
                   fc2_bias, gamma=None, eps=1e-6):
    """x + gamma * fc2(GELU_erf(fc1(dwconv_layernorm(x)))), NHWC; fc1 (4C,C), fc2 (C,4C)."""
    h = dwconv_layernorm(x.float(), dw_weight, dw_bias, ln_weight, ln_bias, eps)
    h = F.linear(h, fc1_weight.float(), None if fc1_bias is None else fc1_bias.float())
    h = F.gelu(h)  # exact erf GELU, as HF ConvNext ("gelu")
    h = F.linear(h, fc2_weight.float(), None if fc2_bias is None else fc2_bias.float())
    if gamma is not None:
        h = gamma.float() * h
    return (x.float() + h).to(x.dtype)
