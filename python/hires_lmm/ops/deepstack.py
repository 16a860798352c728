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
from ._register import check_fake_devices, op, overload

__all__ = ["visual_index", "deepstack_inject", "deepstack_inject_rms_norm",
           "deepstack_inject_layer_norm", "rms_norm", "layer_norm"]

_op = overload


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
    `out = hidden.clone(); out[mask] = out[mask] + visual_embeds.to(hidden.dtype)`.
    Backward: d(hidden) = grad, d(visual_embeds) = grad[visual_index] in visual_embeds' dtype.
    Saved for backward: visual_index."""
    if use_reference():
        return _ref.deepstack_inject(hidden, visual_embeds, visual_index)
    return _op("deepstack_inject")(hidden, visual_embeds, visual_index)


def deepstack_inject_rms_norm(hidden, visual_embeds, visual_index, weight, eps: float = 1e-6):
    """(normed, injected) in one pass: injected = deepstack_inject(...), normed =
    LlamaRMSNorm(injected) = weight * (injected * rsqrt(mean(injected^2) + eps)).to(dtype),
    statistics in fp32. weight (D,) of hidden's dtype.
    Backward: the norm_backward kernel (dx + d(injected) -> d(hidden); its visual rows ->
    d(visual_embeds); dweight by a deterministic two-stage sum). Saved for backward: injected,
    weight, visual_index (row statistics recomputed)."""
    if use_reference():
        return _ref.deepstack_inject_rms_norm(hidden, visual_embeds, visual_index, weight, eps)
    return _op("deepstack_inject_rms_norm")(hidden, visual_embeds, visual_index, weight, eps)


def deepstack_inject_layer_norm(hidden, visual_embeds, visual_index, weight, bias=None,
                                eps: float = 1e-5):
    """(normed, injected) in one pass with LayerNorm (the ViT side, DeepStack-V):
    normed = (injected - mean) * rsqrt(var + eps) * weight + bias, fp32 statistics, one rounding.
    Backward as deepstack_inject_rms_norm's (plus dbias). Saved for backward: injected, weight,
    visual_index."""
    if use_reference():
        return _ref.deepstack_inject_layer_norm(hidden, visual_embeds, visual_index, weight, bias, eps)
    return _op("deepstack_inject_layer_norm")(hidden, visual_embeds, visual_index, weight, bias, eps)


def rms_norm(x, weight, eps: float = 1e-6):
    """LlamaRMSNorm of x (..., D): weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype).
    Backward: the norm_backward kernel (dx, dweight). Saved for backward: x, weight."""
    if use_reference():
        return _ref.rms_norm(x, weight, eps)
    return _op("rms_norm")(x, weight, eps)


def layer_norm(x, weight, bias=None, eps: float = 1e-5):
    """LayerNorm of x (..., D) over D with fp32 statistics, rounded once.
    Backward: the norm_backward kernel (dx, dweight, dbias). Saved for backward: x, weight."""
    if use_reference():
        return _ref.layer_norm(x, weight, bias, eps)
    return _op("layer_norm")(x, weight, bias, eps)


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


# ---- autograd ----------------------------------------------------------------------------------
# The norms' backward is the fused kernel hires_lmm::norm_backward (kernels/deepstack/norm_bwd.cuh,
# CPU twin csrc/cpu/norm_bwd.cpp): dx, dweight, dbias with a deterministic two-stage reduction; the
# row statistics are recomputed from the saved input (the forward kernels return no statistics).
# Saved tensors:
#   rms_norm / layer_norm: x, weight (bias: only whether there is one)
#   deepstack_inject_*_norm: the `injected` output (the norm's input), weight, visual_index
#   deepstack_inject: visual_index (and visual_embeds' dtype)
# The visual rows' gradient: d(visual_embeds) = d(injected)[visual_index] cast to visual_embeds'
# dtype (HF's `out[mask] + e.to(dtype)`), where d(injected) includes the norm's dx.


@torch.library.register_fake("hires_lmm::norm_backward")
def _(grad_out, x, weight, grad_res, eps, layer, has_bias):
    check_fake_devices("norm_backward", grad_out=grad_out, x=x, weight=weight, grad_res=grad_res)
    d = x.shape[-1]
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty((d,), dtype=x.dtype, device=x.device),
            torch.empty((d if has_bias else 0,), dtype=x.dtype, device=x.device))


def _grad_like(g, t):
    return torch.zeros_like(t) if g is None else g


def _norm_setup(ctx, x, weight, bias, eps, layer):
    ctx.save_for_backward(x, weight)
    ctx.eps, ctx.layer, ctx.has_bias = eps, layer, bias is not None


def _norm_grads(ctx, x, weight, grad_out, grad_res):
    """(dx, dweight, dbias or None) through the kernel; grad_out None means zero."""
    grad_out = _grad_like(grad_out, x)
    dx, dw, db = op("norm_backward")(grad_out, x, weight, grad_res, ctx.eps, ctx.layer, ctx.has_bias)
    return dx, dw, (db if ctx.has_bias else None)


def _rms_setup(ctx, inputs, output):
    x, weight, eps = inputs
    _norm_setup(ctx, x, weight, None, eps, False)


def _rms_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dx, dw, _ = _norm_grads(ctx, x, weight, grad, None)
    return dx, dw, None


def _ln_setup(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _norm_setup(ctx, x, weight, bias, eps, True)


def _ln_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dx, dw, db = _norm_grads(ctx, x, weight, grad, None)
    return dx, dw, db, None


def _visual_grad(ctx, d_injected, index):
    if not ctx.needs_input_grad[1]:
        return None
    d = d_injected.shape[-1]
    return d_injected.reshape(-1, d).index_select(0, index).to(ctx.embeds_dtype)


def _inject_setup(ctx, inputs, output):
    hidden, embeds, index = inputs
    ctx.save_for_backward(index)
    ctx.embeds_dtype = embeds.dtype


def _inject_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return grad, _visual_grad(ctx, grad, index), None


def _inject_norm_setup(layer):
    def setup(ctx, inputs, output):
        hidden, embeds, index, weight = inputs[:4]
        bias = inputs[4] if layer else None
        ctx.save_for_backward(output[1], weight, index)
        ctx.eps, ctx.layer, ctx.has_bias = inputs[-1], layer, bias is not None
        ctx.embeds_dtype = embeds.dtype
    return setup


def _inject_norm_backward(layer):
    def backward(ctx, grad_normed, grad_injected):
        injected, weight, index = ctx.saved_tensors
        dx, dw, db = _norm_grads(ctx, injected, weight, grad_normed, grad_injected)
        dvis = _visual_grad(ctx, dx, index)
        if layer:
            return dx, dvis, None, dw, db, None
        return dx, dvis, None, dw, None
    return backward


torch.library.register_autograd("hires_lmm::deepstack_inject", _inject_backward,
                                setup_context=_inject_setup)
torch.library.register_autograd("hires_lmm::deepstack_inject_rms_norm", _inject_norm_backward(False),
                                setup_context=_inject_norm_setup(False))
torch.library.register_autograd("hires_lmm::deepstack_inject_layer_norm",
                                _inject_norm_backward(True), setup_context=_inject_norm_setup(True))
torch.library.register_autograd("hires_lmm::rms_norm", _rms_backward, setup_context=_rms_setup)
torch.library.register_autograd("hires_lmm::layer_norm", _ln_backward, setup_context=_ln_setup)
