"""PyTorch references of the ConvNeXt family (HF ConvNextLayer math), computed in fp32 and
rounded once to the input dtype. x is NHWC (B, H, W, C)."""
import torch
import torch.nn.functional as F

from .deepstack import stable_layer_norm

__all__ = ["dwconv_layernorm", "convnext_block", "convnext_mlp"]


def dwconv_layernorm(x, dw_weight, dw_bias, ln_weight, ln_bias, eps=1e-6):
    """LayerNorm over C of the depthwise 7x7 conv (zero padding 3) of x (B,H,W,C);
    dw_weight (C,1,7,7) as stored in checkpoints, dw_bias (C,) or None."""
    C = x.shape[-1]
    # The conv as a masked sum over the taps, not F.conv2d: F.conv2d multiplies the
    # zero padding on some paths (an inf/NaN weight on a 1x1 image gives NaN), and the rule is
    # that padding is not a product (README "Non-finite values").
    y = _dwconv_taps(x.float(), dw_weight.float(), None if dw_bias is None else dw_bias.float())
    # fp32 LayerNorm; a pixel whose fp32 variance overflows is redone in fp64 (as the kernels)
    y = stable_layer_norm(y, ln_weight.float(),
                          None if ln_bias is None else ln_bias.float(), eps)
    return y.to(x.dtype)


def _dwconv_taps(x, w, b, chunk_bytes=1 << 28):
    """Depthwise KxK conv (zero padding K//2) of fp32 x (B,H,W,C) in which a tap that falls on the
    padding adds nothing (rather than w * 0). Windows of the zero-padded input (unfold), a mask of
    the taps inside the image, fp32 sum over the taps, then the bias. Rows are processed in chunks
    of at most `chunk_bytes` of windows. -> (B,H,W,C)."""
    B, H, W, C = x.shape
    K = w.shape[-1]
    pad = K // 2
    y = x.new_zeros((B, H, W, C))
    if x.numel() > 0:
        xp = F.pad(x, (0, 0, pad, pad, pad, pad))  # (B, H+2p, W+2p, C), zeros outside
        inside = F.pad(torch.ones(H, W, dtype=torch.bool, device=x.device), (pad, pad, pad, pad))
        wk = w.reshape(C, K, K)
        rows = max(1, chunk_bytes // max(1, B * W * C * K * K * 4))
        for h0 in range(0, H, rows):  # shapes only: no data-dependent branch (the reference traces)
            h1 = min(H, h0 + rows)
            win = xp[:, h0:h1 + 2 * pad].unfold(1, K, 1).unfold(2, K, 1)  # (B, h, W, C, K, K)
            ok = inside[h0:h1 + 2 * pad].unfold(0, K, 1).unfold(1, K, 1)  # (h, W, K, K)
            prod = torch.where(ok[None, :, :, None], win * wk, torch.zeros((), dtype=x.dtype, device=x.device))
            y[:, h0:h1] = prod.sum((-2, -1))
    if b is not None:
        y = y + b
    return y


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


def convnext_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, residual):
    """residual + gamma * fc2(GELU_erf(fc1(x))) over the last dim of x (..., C): the pointwise
    half of a ConvNeXt block (HF ConvNextLayer's pwconv1 -> act -> pwconv2 -> layer scale, plus
    the residual). fc1 (F, C), fc2 (C, F) nn.Linear weights; fp32 throughout, except that for
    fp16/bf16 x the GELU output is rounded to x's dtype once (it is the input of fc2, as the
    kernels store or stage it); one rounding of the result."""
    h = F.linear(x.float(), fc1_weight.float(), None if fc1_bias is None else fc1_bias.float())
    h = F.gelu(h)  # exact erf GELU
    if x.dtype != torch.float32:
        h = h.to(x.dtype).float()
    h = F.linear(h, fc2_weight.float(), None if fc2_bias is None else fc2_bias.float())
    if gamma is not None:
        h = gamma.float() * h
    return (residual.float() + h).to(x.dtype)
