"""DeepStack injection and the norms it fuses with (kernels/deepstack/, csrc/deepstack.cpp).

Row mapping: `visual_index` holds the rows of hidden seen as (N, D) (N = prod of leading dims)
that receive a visual embedding, strictly increasing: the row-major order of HF's
`hidden[visual_pos_masks]`. Build it once per forward with visual_index(mask) and reuse it for
every DeepStack level. The kernels read hidden once, hold no N x D temporary and never sync, so
they are CUDA-graph capturable; the index checks (range, order) cost one device->host sync and
can be turned off with hires_lmm.set_value_checks(False)."""
import torch

from .. import reference as _ref
from .._backend import use_reference
from ._register import check_fake_devices, op, register_reference_backward

__all__ = ["visual_index", "deepstack_inject", "deepstack_inject_rms_norm",
           "deepstack_inject_layer_norm", "rms_norm", "layer_norm"]


def visual_index(visual_pos_masks: torch.Tensor) -> torch.Tensor:
    """(B, S) bool -> (Nv,) int64 rows of the flattened (B*S) tokens where the mask is true,
    row-major. Syncs once (its length depends on the data); compute it once per forward."""
    if use_reference():
        return _ref.visual_index(visual_pos_masks)
    return op("visual_index")(visual_pos_masks)


def deepstack_inject(hidden, visual_embeds, visual_index):
    """out = hidden with visual_embeds[r] added to row visual_index[r].

    hidden (..., D) float32/float16/bfloat16, any strides; visual_embeds (Nv, D)
    float32/float16/bfloat16, not necessarily hidden's dtype (rounded to hidden's dtype first, as
    HF; float64 is refused like everywhere else); visual_index (Nv,) int64. Bit-exact with
    `out = hidden.clone(); out[mask] = out[mask] + visual_embeds.to(hidden.dtype)`."""
    if use_reference():
        return _ref.deepstack_inject(hidden, visual_embeds, visual_index)
    return op("deepstack_inject")(hidden, visual_embeds, visual_index)


def deepstack_inject_rms_norm(hidden, visual_embeds, visual_index, weight, eps: float = 1e-6):
    """(normed, injected) in one pass: injected = deepstack_inject(...), normed =
    LlamaRMSNorm(injected) = weight * (injected * rsqrt(mean(injected^2) + eps)).to(dtype),
    statistics in fp32. weight (D,) of hidden's dtype."""
    if use_reference():
        return _ref.deepstack_inject_rms_norm(hidden, visual_embeds, visual_index, weight, eps)
    return op("deepstack_inject_rms_norm")(hidden, visual_embeds, visual_index, weight, eps)


def deepstack_inject_layer_norm(hidden, visual_embeds, visual_index, weight, bias=None,
                                eps: float = 1e-5):
    """(normed, injected) in one pass with LayerNorm (the ViT side, DeepStack-V):
    normed = (injected - mean) * rsqrt(var + eps) * weight + bias, fp32 statistics, one rounding."""
    if use_reference():
        return _ref.deepstack_inject_layer_norm(hidden, visual_embeds, visual_index, weight, bias, eps)
    return op("deepstack_inject_layer_norm")(hidden, visual_embeds, visual_index, weight, bias, eps)


def rms_norm(x, weight, eps: float = 1e-6):
    """LlamaRMSNorm of x (..., D): weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)."""
    if use_reference():
        return _ref.rms_norm(x, weight, eps)
    return op("rms_norm")(x, weight, eps)


def layer_norm(x, weight, bias=None, eps: float = 1e-5):
    """LayerNorm of x (..., D) over D with fp32 statistics, rounded once."""
    if use_reference():
        return _ref.layer_norm(x, weight, bias, eps)
    return op("layer_norm")(x, weight, bias, eps)


# ---- fake kernels (shapes only; torch.compile and meta tensors) ----------------------------
@torch.library.register_fake("hires_lmm::visual_index")
def _(visual_pos_masks):
    n = torch.library.get_ctx().new_dynamic_size()
    return visual_pos_masks.new_empty((n,), dtype=torch.long)


@torch.library.register_fake("hires_lmm::deepstack_inject")
def _(hidden, visual_embeds, visual_index):
    check_fake_devices("deepstack_inject", hidden=hidden, visual_embeds=visual_embeds,
                       visual_index=visual_index)
    return torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)


@torch.library.register_fake("hires_lmm::deepstack_inject_rms_norm")
def _(hidden, visual_embeds, visual_index, weight, eps):
    check_fake_devices("deepstack_inject_rms_norm", hidden=hidden, visual_embeds=visual_embeds,
                       visual_index=visual_index, weight=weight)
    return (torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device),
            torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device))


@torch.library.register_fake("hires_lmm::deepstack_inject_layer_norm")
def _(hidden, visual_embeds, visual_index, weight, bias, eps):
    check_fake_devices("deepstack_inject_layer_norm", hidden=hidden, visual_embeds=visual_embeds,
                       visual_index=visual_index, weight=weight, bias=bias)
    return (torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device),
            torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device))


@torch.library.register_fake("hires_lmm::rms_norm")
def _(x, weight, eps):
    check_fake_devices("rms_norm", x=x, weight=weight)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.register_fake("hires_lmm::layer_norm")
def _(x, weight, bias, eps):
    check_fake_devices("layer_norm", x=x, weight=weight, bias=bias)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# ---- autograd (recompute with the reference; the ops are memory-bound, so this costs one more
# pass and no extra kernels to maintain) ---------------------------------------------------------
register_reference_backward("deepstack_inject", _ref.deepstack_inject)
register_reference_backward("deepstack_inject_rms_norm", _ref.deepstack_inject_rms_norm)
register_reference_backward("deepstack_inject_layer_norm", _ref.deepstack_inject_layer_norm)
register_reference_backward("rms_norm", _ref.rms_norm)
register_reference_backward("layer_norm", _ref.layer_norm)
