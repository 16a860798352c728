"""ConvNeXt family: fused depthwise 7x7 conv + LayerNorm, and the whole ConvNeXt block
(kernels/convnext/, csrc/convnext.cpp). x is NHWC (B, H, W, C).

Numerics: the depthwise conv and the LayerNorm statistics are computed in fp32 and rounded once.
In convnext_block the LayerNorm output and fc1's GELU output are rounded to x's dtype (they are
the inputs of the next GEMM, as in a bf16 PyTorch model); the GEMMs accumulate in fp32 and the
last epilogue (bias, layer scale, residual) rounds once."""
import torch

from .. import reference as _ref
from .._backend import use_reference
from ._register import check_fake_devices, op, overload

__all__ = ["dwconv_layernorm", "convnext_block", "convnext_mlp"]

_below_autograd = torch._C._AutoDispatchBelowAutograd
_any_requires_grad = torch._C._any_requires_grad


def _call(name, *args):
    """torch.ops.hires_lmm.<name>.default(*args). When no argument needs a gradient (or grad mode
    is off) the call goes straight below the autograd key: on CUDA the ops' autograd kernels are
    Python functions (torch.library.register_autograd) that would only redispatch (about 6 us a
    call measured on the CPU before its autograd moved to C++, csrc/convnext_bwd.cpp, which now
    takes the same shortcut itself). Under torch.compile the plain call (the tracer sees the
    op's autograd)."""
    ov = overload(name)
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and _any_requires_grad(*args)):
        return ov(*args)
    with _below_autograd():
        return getattr(ov, "_op", ov)(*args)   # the C++ callable (OpOverload.__call__: one more frame)


def dwconv_layernorm(x, dw_weight, dw_bias, ln_weight, ln_bias, eps: float = 1e-6):
    """LayerNorm over C of the depthwise 7x7 conv (zero padding 3) of x.

    x (B,H,W,C) NHWC float32/float16/bfloat16, any strides (a non-unit channel stride costs a
    copy); dw_weight (C,1,7,7) as stored in checkpoints; dw_bias, ln_weight, ln_bias (C,); all of
    x's dtype. Returns (B,H,W,C) contiguous. On CUDA the conv output never reaches device memory
    before the norm (one kernel).
    Backward (two steps): conv recomputed in fp32, LayerNorm backward by the norm_backward kernel,
    then the dwconv_backward kernel (dx, dw_weight, dw_bias). Saved for backward: x and the
    parameters."""
    if use_reference():
        return _ref.dwconv_layernorm(x, dw_weight, dw_bias, ln_weight, ln_bias, eps)
    return _call("dwconv_layernorm", x, dw_weight, dw_bias, ln_weight, ln_bias, eps)


def convnext_block(x, dw_weight, dw_bias, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight,
                   fc2_bias, gamma=None, eps: float = 1e-6):
    """x + gamma * fc2(GELU_erf(fc1(dwconv_layernorm(x)))), NHWC in and out (HF ConvNextLayer).

    x (B,H,W,C); dwconv/LN parameters as in dwconv_layernorm; fc1_weight (F,C) (F = 4C in
    ConvNeXt), fc1_bias (F,), fc2_weight (C,F), fc2_bias (C,), gamma (C,) layer scale or None;
    all of x's dtype. On CUDA with fp16/bf16 the pointwise layers are the fused MLP kernel of
    convnext_mlp when C is one of its widths (96, 128, 192, 256, 384; F % 64 == 0, or % 32 for
    C = 384), else CUTLASS GEMMs with fused epilogues when C, F are multiples of 8, else fp32 GEMMs.
    On CPU the pointwise half is convnext_mlp's default CPU path (oneDNN GEMMs in x's dtype; see
    its docstring for where it rounds).
    Backward (direct; any device: ATen ops and our kernels): the conv output y recomputed once in
    fp32 (ATen conv2d), h = LayerNorm(y) rounded to x's dtype (what fc1 read), fc1 recomputed in
    row chunks, then the GEMM, erf-GELU and layer scale gradients (see _mlp_backward: fp32 GEMMs
    for fp32, GEMMs in x's dtype with eager autograd's roundings for fp16/bf16), norm_backward on
    the same y and dwconv_backward (fp32). Saved for backward: x and the parameters only;
    transient during backward: y and h (M x C fp32) and (rows, F) chunks of about 16 MB."""
    if use_reference():
        return _ref.convnext_block(x, dw_weight, dw_bias, ln_weight, ln_bias, fc1_weight, fc1_bias,
                                   fc2_weight, fc2_bias, gamma, eps)
    return _call("convnext_block", x, dw_weight, dw_bias, ln_weight, ln_bias, fc1_weight, fc1_bias,
                                fc2_weight, fc2_bias, gamma, eps)


def convnext_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, residual):
    """residual + gamma * fc2(GELU_erf(fc1(x))): the pointwise half of a ConvNeXt block.

        out[m, :] = residual[m, :] + gamma * (round(GELU_erf(x[m, :] W1^T + b1)) W2^T + b2)

    x (..., C) channels-last, float32/float16/bfloat16; fc1_weight (F, C) and fc2_weight (C, F)
    nn.Linear weights (F = 4C in ConvNeXt), fc1_bias (F,) or None, fc2_bias (C,) or None, gamma
    (C,) layer scale or None, residual of x's shape; all of x's dtype. Returns x's shape,
    contiguous. fp32 accumulation; for fp16/bf16 the hidden is rounded to x's dtype once (as the
    unfused path stores it), the result once.
    On CUDA with fp16/bf16, C in (96, 128, 192, 256, 384) and F a multiple of 64 (32 for C = 384)
    one fused kernel (kernels/convnext/fused_mlp.cuh) keeps the hidden on chip; any other CUDA
    call runs fp32 ATen GEMMs with the same roundings.
    CPU default path (also convnext_block's MLP half, any C): oneDNN GEMMs in x's dtype
    (torch.ops.mkldnn._linear_pointwise; AMX / AVX-512 where the CPU has them), which round where:

        H   = round(GELU_erf(x W1^T + b1))       fc1 + bias + GELU on the fp32 accumulator (as above)
        P   = round(H W2^T + b2)                 only when gamma is given: the one extra rounding
        out = round(residual + gamma * P)        fp32 arithmetic, one rounding (torch.addcmul)
        out = round(H W2^T + b2 + residual)      without gamma: one rounding (oneDNN post-op add)

    For fp32 every round() is the fp32 one, as the formula (fp32 with M*C*F <= 2^24 takes the
    fp32 ATen path below, cheaper per call). For bf16/fp16 with gamma the extra
    rounding of P adds at most half an ulp of P times |gamma| (measured against the fp64 formula:
    mean 0.55-0.9 ulp of the output vs 0.25 for the exact paths and 1.1-1.9 for eager PyTorch's
    four roundings; max error below eager's). A non-finite output element (a NaN/inf input, or P
    overflowing fp16 where gamma * P does not), HIRES_LMM_CPU_ONEDNN_MLP=0, or a torch / CPU
    without the oneDNN operator or dtype: fp32 ATen GEMMs with exactly the rounding above (H only).
    HIRES_LMM_CPU_TWIN=1: the kernel's twin (exact, as the fp32 path). Backward (direct; fc1
    recomputed in row chunks, see _mlp_backward: fp32 GEMMs for fp32, GEMMs in x's dtype with
    eager autograd's roundings for fp16/bf16): saved x and the parameters (not the residual: its
    gradient is grad)."""
    if use_reference():
        return _ref.convnext_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, residual)
    return _call("convnext_mlp", x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, residual)


# ---- fake kernels (shapes only; torch.compile and meta tensors) ----------------------------
@torch.library.register_fake("hires_lmm::dwconv_layernorm")
def _(x, dw_weight, dw_bias, ln_weight, ln_bias, eps):
    check_fake_devices("dwconv_layernorm", x=x, dw_weight=dw_weight, dw_bias=dw_bias,
                       ln_weight=ln_weight, ln_bias=ln_bias)
    torch._check(x.dim() == 4, lambda: "dwconv_layernorm: argument 'x' must be 4-D (B, H, W, C)")
    torch._check(dw_weight.shape[0] == x.shape[-1],
                 lambda: "dwconv_layernorm: argument 'x' channel mismatch with 'dw_weight'")
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.register_fake("hires_lmm::dwconv_backward")
def _(grad_y, x, dw_weight, has_bias):
    check_fake_devices("dwconv_backward", grad_y=grad_y, x=x, dw_weight=dw_weight)
    c = x.shape[-1]
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(dw_weight.shape, dtype=x.dtype, device=x.device),
            torch.empty((c if has_bias else 0,), dtype=x.dtype, device=x.device))


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


@torch.library.register_fake("hires_lmm::convnext_mlp")
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, residual):
    check_fake_devices("convnext_mlp", x=x, fc1_weight=fc1_weight, fc1_bias=fc1_bias,
                       fc2_weight=fc2_weight, fc2_bias=fc2_bias, gamma=gamma, residual=residual)
    torch._check(x.dim() >= 1, lambda: "convnext_mlp: argument 'x' must have at least one dim (..., C)")
    torch._check(fc1_weight.dim() == 2 and fc1_weight.shape[1] == x.shape[-1],
                 lambda: "convnext_mlp: argument 'fc1_weight' must have shape (hidden, C)")
    torch._check(residual.shape == x.shape,
                 lambda: "convnext_mlp: argument 'residual' must have the shape of 'x'")
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _fake_grads(need, tensors):
    """The backward ops' outputs: a gradient of each needed tensor's shape and dtype, else None."""
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) if n and t is not None else None
                 for n, t in zip(need, tensors))


@torch.library.register_fake("hires_lmm::dwconv_layernorm_backward")
def _(grad, x, dw_weight, dw_bias, ln_weight, ln_bias, eps, need):
    return _fake_grads(need, (x, dw_weight, dw_bias, ln_weight, ln_bias))


@torch.library.register_fake("hires_lmm::convnext_block_backward")
def _(grad, x, dw_weight, dw_bias, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
      gamma, eps, need, chunk_elems):
    return _fake_grads(need, (x, dw_weight, dw_bias, ln_weight, ln_bias, fc1_weight, fc1_bias,
                              fc2_weight, fc2_bias, gamma))


@torch.library.register_fake("hires_lmm::convnext_mlp_backward")
def _(grad, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, need, chunk_elems):
    return _fake_grads(need, (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma))


# ---- autograd --------------------------------------------------------------------------------
# The backward formulas are C++ ops (csrc/convnext_bwd.cpp, one implementation for every device):
#   dwconv_layernorm_backward: the conv output y recomputed in fp32 (ATen conv2d), the LayerNorm
#     backward on it by the norm_backward kernel (kernels/deepstack/norm_bwd.cuh; deterministic
#     two-stage sums for ln_weight / ln_bias), then the dwconv_backward kernel
#     (kernels/convnext/dwconv_bwd.cuh, CPU twin csrc/cpu/dwconv_bwd.cpp): dx by the transposed
#     depthwise conv, dw_weight / dw_bias by a deterministic two-stage fp32 reduction.
#   convnext_block_backward: y once, h = LayerNorm(y) rounded to x's dtype (what fc1 read), the MLP
#     gradients (fc1 recomputed in row chunks; fp32 GEMMs for fp32, GEMMs in x's dtype with eager
#     autograd's roundings for fp16/bf16), then the two steps above on the same y.
#   convnext_mlp_backward: the MLP gradients alone.
# Saved: x and the parameters. On the CPU the ops' autograd is C++ too (AutogradCPU, same file);
# the registrations below serve CUDA. torch.compile keeps each backward op as one node (the fake
# kernels above).

# Rows per chunk of the MLP backward: the (rows, F) temporaries (u, GELU(u), its gradient) stay
# near 16 MB in fp32 whatever M is (the C++ autograd on the CPU uses the same constant).
_MLP_BWD_ELEMS = 1 << 22


def _dwln_setup(ctx, inputs, output):
    x, dw_weight, dw_bias, ln_weight, ln_bias, eps = inputs
    ctx.save_for_backward(x, dw_weight, dw_bias, ln_weight, ln_bias)
    ctx.eps = eps


def _dwln_backward(ctx, grad):
    g = torch.ops.hires_lmm.dwconv_layernorm_backward(grad, *ctx.saved_tensors, ctx.eps,
                                                        list(ctx.needs_input_grad[:5]))
    return (*g, None)


def _block_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:10])
    ctx.eps = inputs[10]


def _block_backward(ctx, grad):
    g = torch.ops.hires_lmm.convnext_block_backward(grad, *ctx.saved_tensors, ctx.eps,
                                                      list(ctx.needs_input_grad[:10]), _MLP_BWD_ELEMS)
    return (*g, None)


def _mlp_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])           # x and the parameters (not the residual)
    ctx.res_dtype = inputs[6].dtype


def _mlp_op_backward(ctx, grad):
    need = ctx.needs_input_grad
    g = torch.ops.hires_lmm.convnext_mlp_backward(grad, *ctx.saved_tensors, list(need[:6]), _MLP_BWD_ELEMS)
    return (*g, grad.to(ctx.res_dtype) if need[6] else None)


torch.library.register_autograd("hires_lmm::dwconv_layernorm", _dwln_backward,
                                setup_context=_dwln_setup)
torch.library.register_autograd("hires_lmm::convnext_block", _block_backward,
                                setup_context=_block_setup)
torch.library.register_autograd("hires_lmm::convnext_mlp", _mlp_op_backward,
                                setup_context=_mlp_setup)
