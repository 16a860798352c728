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
    # LlamaRMSNorm: fp32 statistics, cast to the input dtype, then times weight.
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def layer_norm(x, weight, bias, eps):
    y = F.layer_norm(x.float(), (x.shape[-1],), weight.float(),
                     None if bias is None else bias.float(), eps)
    return y.to(x.dtype)


def deepstack_inject_rms_norm(hidden, visual_embeds, visual_index, weight, eps):
    injected = deepstack_inject(hidden, visual_embeds, visual_index)
    return rms_norm(injected, weight, eps), injected


def deepstack_inject_layer_norm(hidden, visual_embeds, visual_index, weight, bias, eps):
    injected = deepstack_inject(hidden, visual_embeds, visual_index)
    return layer_norm(injected, weight, bias, eps), injected
