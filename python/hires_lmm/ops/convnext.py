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
    is off) the call goes straight below the autograd key: the ops' autograd kernels are Python
    functions (torch.library.register_autograd) that would only redispatch, about 6 us per call
    on this CPU (measured; 5-10% of convnext_mlp at the benchmark's small shapes). Under
    torch.compile the plain call (the tracer sees the op's autograd)."""
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


# ---- autograd --------------------------------------------------------------------------------
# dwconv_layernorm's backward, in two steps (no fused kernel yet):
#   1. the depthwise conv output y is recomputed in fp32 (ATen conv2d, channels-last), and the
#      LayerNorm backward runs on it through the fused norm kernel hires_lmm::norm_backward
#      (kernels/deepstack/norm_bwd.cuh; deterministic two-stage sums for ln_weight / ln_bias);
#   2. the conv's backward through hires_lmm::dwconv_backward (kernels/convnext/dwconv_bwd.cuh, CPU
#      twin csrc/cpu/dwconv_bwd.cpp): dx by the transposed depthwise conv, dw_weight / dw_bias by
#      a deterministic two-stage fp32 reduction over chunks of image rows.
#   Saved: x, dw_weight, dw_bias, ln_weight, ln_bias (nothing N x C beyond x).
# convnext_block's backward (_block_backward) is direct: y = dwconv(x) once in fp32 (ATen conv2d),
# h = LayerNorm(y), fc1 recomputed, the MLP gradients (_mlp_backward, shared with convnext_mlp),
# then the two steps above on the same y. Saved: x and the parameters.


def _dwln_setup(ctx, inputs, output):
    x, dw_weight, dw_bias, ln_weight, ln_bias, eps = inputs
    ctx.save_for_backward(x, dw_weight, dw_bias, ln_weight, ln_bias)
    ctx.eps = eps


def _dwln_backward(ctx, grad):
    x, dw_weight, dw_bias, ln_weight, ln_bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    C = x.shape[-1]
    k = dw_weight.shape[-1]
    xf = x.float().permute(0, 3, 1, 2)                               # NCHW view of NHWC
    wf = dw_weight.float()
    y = torch.nn.functional.conv2d(xf, wf, None if dw_bias is None else dw_bias.float(),
                                   padding=k // 2, groups=C).permute(0, 2, 3, 1)
    dy, dlnw, dlnb = op("norm_backward")(grad.float(), y.contiguous(), ln_weight.float(), None,
                                         ctx.eps, True, ln_bias is not None)
    gx, gw, gb = op("dwconv_backward")(dy, x, dw_weight, dw_bias is not None)
    return (gx if need[0] else None, gw if need[1] else None,
            gb if need[2] and dw_bias is not None else None,
            dlnw.to(ln_weight.dtype) if need[3] else None,
            dlnb.to(ln_bias.dtype) if need[4] and ln_bias is not None else None, None)


def _block_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:10])
    ctx.eps = inputs[10]


def _as(t, dtype):
    """t in dtype (t itself when it already is, or None: no dispatcher call for the no-op casts of
    the backwards, ~1-2 us each at the small shapes)."""
    return t if t is None or t.dtype is dtype else t.to(dtype)


# Rows per chunk of the MLP backward: the (rows, F) temporaries (u, GELU(u), its gradient) stay
# near 16 MB in fp32 whatever M is; one chunk at the benchmark's shapes.
_MLP_BWD_ELEMS = 1 << 22


def _mlp_backward(go, a, w1, b1, w2, b2, gamma, need, round_dtype=None):
    """Gradients of out = res + gamma * (G(a W1^T + b1) W2^T + b2), G = erf-GELU, with respect to
    a and the parameters (no autograd graph).

    go (M, C): d out, any float dtype. a (M, C): the values fc1 read. w1 (F, C), b1 (F,) or None,
    w2 (C, F), b2 (C,) or None, gamma (C,) or None. need: which of (a, w1, b1, w2, b2, gamma) to
    return (others None). round_dtype: a's dtype when fp16/bf16 (the forward rounds the GELU
    output to it; the rounding's derivative is taken as 1), else None: the fp32 formula's
    derivative, every GEMM in fp32.
    With round_dtype t the GEMMs run in t as eager autograd's do (fp32 accumulation, AMX / tensor
    cores): the operands u = a W1^T + b1 and every GEMM output are rounded to t once, and so are
    dv = go * gamma and du = dh * G'(u) (the roundings eager autograd makes); the reductions
    (db1, db2, dgamma, the row-chunk sums) in fp32. fp32 GEMMs on bf16 data cost ~5x on this CPU
    (2304 x 192 x 768: 2.3 ms vs 0.47) and far more on a GPU.
    Recomputes u (one GEMM) in row chunks; with dv = go * gamma:
        dW2 = dv^T G(u)   db2 = sum_m dv   dgamma = sum_m go * (G(u) W2^T + b2)
            = rowsum((go^T G(u)) * W2) + b2 * sum_m go        (no second fc2 GEMM)
        du = (dv W2) * G'(u)   dW1 = du^T a   db1 = sum_m du   da = du W1
    Returns fp32 (da, dW1, db1, dW2, db2, dgamma) (da in t with round_dtype t)."""
    need_a, need_w1, need_b1, need_w2, need_b2, need_g = need
    need_g = need_g and gamma is not None
    M, C = a.shape
    Fh = w1.shape[0]
    f32 = torch.float32
    t = round_dtype if round_dtype in (torch.float16, torch.bfloat16) else f32
    lowp = t is not f32
    w1t, w2t = _as(w1, t), _as(w2, t)                 # GEMM operands
    b1t = _as(b1, t)
    gf = _as(gamma, f32)
    go32 = _as(go, f32)
    need_gu = need_w2 or need_g                       # G(u) for go^T G(u)
    need_du = need_a or need_w1 or (need_b1 and b1 is not None)
    da = dw1 = db1 = gtg = None
    if need_du:
        if lowp:                                      # dv = round(go * gamma), then dv W2 in t
            dv = _as(go, t) if gf is None else (go32 * gf).to(t)
            w2g = w2t
        else:                                         # fp32: go (gamma W2), one fp32 product
            dv = go32
            w2g = w2t if gf is None else w2t * gf[:, None]
        if need_a:
            da = torch.empty((M, C), dtype=t, device=go.device)
    if need_gu or need_du:
        got = _as(go, t)
        rows = max(1, _MLP_BWD_ELEMS // max(Fh, 1))
        for r0 in range(0, M, rows):
            r1 = min(M, r0 + rows)
            first = r0 == 0
            ac = _as(a[r0:r1], t)
            u = torch.mm(ac, w1t.t()) if b1t is None else torch.addmm(b1t, ac, w1t.t())
            if need_gu:                               # (lowp: ATen's GELU rounds once to t)
                gu = torch.nn.functional.gelu(u)
                s = torch.mm(got[r0:r1].t(), gu)
                gtg = _as(s, f32) if first else gtg.add_(s)
                del gu
            if need_du:
                du = torch.ops.aten.gelu_backward(torch.mm(dv[r0:r1], w2g), u)
                if need_b1 and b1 is not None:
                    s = du.sum(0)                     # (fp32 accumulation; dtype=f32 would copy du)
                    db1 = _as(s, f32) if first else db1.add_(s)
                if need_w1:
                    s = torch.mm(du.t(), ac)
                    dw1 = _as(s, f32) if first else dw1.add_(s)
                if need_a:
                    torch.mm(du, w1t, out=da[r0:r1])
    gsum = go32.sum(0) if (need_b2 and b2 is not None) or (need_g and b2 is not None) else None
    dw2 = db2 = dgamma = None
    if need_w2:
        dw2 = gtg if gf is None else gtg * gf[:, None]
    if need_b2 and b2 is not None:
        db2 = gsum if gf is None else gsum * gf
    if need_g:
        dgamma = (gtg * _as(w2, f32)).sum(1)
        if b2 is not None:
            dgamma = dgamma + gsum * _as(b2, f32)
    return da, dw1, db1, dw2, db2, dgamma


def _block_backward(ctx, grad):
    """Direct backward of convnext_block (no autograd graph): recompute the conv output
    y = dwconv(x) once in fp32 (ATen conv2d), h = LayerNorm(y) (fp32, rounded to x's dtype as the
    forward's kernel output that fc1 reads), then _mlp_backward on h (fc1 recomputed; GEMMs,
    GELU and layer-scale derivatives), the LayerNorm backward on the same y by norm_backward and
    the conv's by dwconv_backward; dx = grad + the conv path's dx. Transient memory: y, h (M C fp32),
    the fp32 (rows, 4C) chunks of _mlp_backward (about 16 MB each), the gradients."""
    x, dw_weight, dw_bias, ln_weight, ln_bias, w1, b1, w2, b2, gamma = ctx.saved_tensors
    need = ctx.needs_input_grad
    result = [None] * 11
    if not any(need[i] for i in range(10)):
        return tuple(result)
    B, H, W, C = x.shape
    M = B * H * W
    f32 = torch.float32
    if x.numel() == 0:
        zeros = [torch.zeros_like(t) if t is not None and need[i] else None
                 for i, t in enumerate(ctx.saved_tensors)]
        zeros[0] = grad.to(x.dtype) if need[0] else None
        return tuple(zeros) + (None,)
    need_conv = any(need[i] for i in range(5))
    # y: the depthwise conv in fp32, NHWC (oneDNN keeps channels-last: the permute is a view)
    k = dw_weight.shape[-1]
    y = torch.nn.functional.conv2d(_as(x, f32).permute(0, 3, 1, 2), _as(dw_weight, f32),
                                   _as(dw_bias, f32),
                                   padding=k // 2, groups=C).permute(0, 2, 3, 1).contiguous()
    lnw = _as(ln_weight, f32)
    h = torch.nn.functional.layer_norm(y, (C,), lnw, _as(ln_bias, f32),
                                       ctx.eps)
    if x.dtype != f32:
        h = h.to(x.dtype)                        # the forward kernel's output, as fc1 reads it
    dh, dw1, db1, dw2, db2, dgamma = _mlp_backward(
        grad.reshape(M, C), h.reshape(M, C), w1, b1, w2, b2, gamma,
        (need_conv, need[5], need[6], need[7], need[8], need[9]), x.dtype)
    for i, g in zip(range(5, 10), (dw1, db1, dw2, db2, dgamma)):
        if g is not None:
            result[i] = _as(g, ctx.saved_tensors[i].dtype)
    if need_conv:
        dy, dlnw, dlnb = op("norm_backward")(_as(dh, f32).view(B, H, W, C), y, lnw, None, ctx.eps, True,
                                             ln_bias is not None)
        gx, gw, gb = op("dwconv_backward")(dy, x, dw_weight, dw_bias is not None)
        if need[0]:
            result[0] = gx.add_(_as(grad, x.dtype))
        result[1] = gw if need[1] else None
        result[2] = gb if need[2] and dw_bias is not None else None
        result[3] = _as(dlnw, ln_weight.dtype) if need[3] else None
        result[4] = _as(dlnb, ln_bias.dtype) if need[4] and ln_bias is not None else None
    return tuple(result)


def _mlp_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])           # x and the parameters (not the residual)
    ctx.res_dtype = inputs[6].dtype


def _mlp_op_backward(ctx, grad):
    """convnext_mlp's backward: _mlp_backward (fc1 recomputed; the GELU output rounded to x's
    dtype for fp16/bf16 as the forward) and d residual = grad."""
    x, w1, b1, w2, b2, gamma = ctx.saved_tensors
    need = ctx.needs_input_grad
    C = x.shape[-1]
    M = x.numel() // C
    result = [None] * 7
    if need[6]:
        result[6] = _as(grad, ctx.res_dtype)
    if not any(need[i] for i in range(6)):
        return tuple(result)
    got = _mlp_backward(grad.reshape(M, C), x.reshape(M, C), w1, b1, w2, b2, gamma,
                        tuple(need[:6]), x.dtype)
    for i, g in enumerate(got):
        if g is not None:
            t = ctx.saved_tensors[i]
            result[i] = _as(g, t.dtype).reshape(t.shape)
    return tuple(result)


torch.library.register_autograd("hires_lmm::dwconv_layernorm", _dwln_backward,
                                setup_context=_dwln_setup)
torch.library.register_autograd("hires_lmm::convnext_block", _block_backward,
                                setup_context=_block_setup)
torch.library.register_autograd("hires_lmm::convnext_mlp", _mlp_op_backward,
                                setup_context=_mlp_setup)
