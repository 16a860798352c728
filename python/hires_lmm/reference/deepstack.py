"""PyTorch references of the DeepStack family, written the way Hugging Face computes them
(Qwen3VLTextModel._deepstack_process, LlamaRMSNorm, nn.LayerNorm)."""
import torch
import torch.nn.functional as F

__all__ = ["visual_index", "deepstack_inject", "deepstack_inject_rms_norm",
           "deepstack_inject_layer_norm", "rms_norm", "layer_norm"]


def visual_index(visual_pos_masks: torch.Tensor) -> torch.Tensor:
    return visual_pos_masks.reshape(-1).nonzero().view(-1)


def deepstack_inject(hidden, visual_embeds, visual_index):
    # HF: out = hidden.clone(); out[mask] = out[mask] + e.to(hidden.dtype)
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = flat.index_put((visual_index,), flat[visual_index] + visual_embeds.to(hidden.dtype))
    return out.view(hidden.shape)


def rms_norm(x, weight, eps):
    # LlamaRMSNorm: fp32 statistics, cast to the input dtype, then times weight. A row whose fp32
    # mean square is not finite (|x| > ~1.8e19, or a non-finite x) is redone in fp64, as the
    # kernels do (README "Non-finite values": never a finite wrong value such as 0).
    # (Both are always computed: no data-dependent branch, so the reference traces and compiles.)
    xf = x.float()
    ms = xf.pow(2).mean(-1, keepdim=True)
    y = xf * torch.rsqrt(ms + eps)
    xd = xf.double()
    yd = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)).float()
    y = torch.where(torch.isfinite(ms), y, yd)
    return weight * y.to(x.dtype)


def _layer_norm_two_pass(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    d = x - mean
    var = d.pow(2).mean(-1, keepdim=True)
    y = d * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y, var


def stable_layer_norm(xf, weight, bias, eps):
    """LayerNorm over the last dim of fp32 `xf`: fp32 two-pass statistics (as the kernels; not
    F.layer_norm, whose fp32 variance overflows to NaN for |x| > ~1.8e19 even when the two-pass
    one does not); a row whose fp32 variance is not finite is redone in fp64 (both are always
    computed: no data-dependent branch, so the reference traces and compiles). Returns fp32."""
    y, var = _layer_norm_two_pass(xf, weight, bias, eps)
    yd, _ = _layer_norm_two_pass(xf.double(), None if weight is None else weight.double(),
                                 None if bias is None else bias.double(), eps)
    return torch.where(torch.isfinite(var), y, yd.float())


def layer_norm(x, weight, bias, eps):
    y = stable_layer_norm(x.float(), weight.float(), None if bias is None else bias.float(), eps)
    return y.to(x.dtype)


def deepstack_inject_rms_norm(hidden, visual_embeds, visual_index, weight, eps):
    injected = deepstack_inject(hidden, visual_embeds, visual_index)
    return rms_norm(injected, weight, eps), injected


def deepstack_inject_layer_norm(hidden, visual_embeds, visual_index, weight, bias, eps):
    injected = deepstack_inject(hidden, visual_embeds, visual_index)
    return layer_norm(injected, weight, bias, eps), injected
