"""DeepStack injection + norms against the HF-style PyTorch composition
(clone + masked add + LlamaRMSNorm / LayerNorm), eager and torch.compile, and against ATen's fused
norms (F.rms_norm, F.layer_norm: "aten_fused", the fastest PyTorch CPU path).
Dtypes: bf16 and fp16 on CUDA, bf16 and fp32 on the CPU."""
import torch
import torch.nn.functional as F

from hires_lmm import ops, reference as ref
from .common import Case

EPS = 1e-6


def _hf_inject(hidden, embeds, mask):
    # Qwen3VLTextModel._deepstack_process
    out = hidden.clone()
    out[mask, :] = out[mask, :] + embeds.to(out.dtype)
    return out


def _hf_rms(x, w):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def _hf_inject_rms(hidden, embeds, mask, w):
    inj = _hf_inject(hidden, embeds, mask)
    return _hf_rms(inj, w), inj


def _hf_inject_ln(hidden, embeds, mask, w, b):
    inj = _hf_inject(hidden, embeds, mask)
    return F.layer_norm(inj, (inj.shape[-1],), w, b, EPS), inj


def _shapes(device, quick):
    if quick:
        return [("B2 S512 D1024 nv=2x144", 2, 512, 1024, [144, 144])]
    return [("B2 S4096 D4096 nv=4x576", 2, 4096, 4096, [1152, 1152]),   # 8192 tokens, 4x576 visual
            ("B1 S1024 D2048 nv=576", 1, 1024, 2048, [576])]


def _cases_one(device, dtype, name, B, S, D, counts, compile_ok):
    """The cases of one (dtype, shape); a function of its own so that each case's lambdas bind
    this call's tensors (a loop body's closures would all see the last iteration's)."""
    out = []
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, S, D, generator=g).to(dtype).to(device)
    mask = torch.zeros(B, S, dtype=torch.bool)
    for b, n in enumerate(counts):
        start = (S - n) // 3
        mask[b, start:start + n] = True
    mask = mask.to(device)
    nv = int(mask.sum())
    embeds = torch.randn(nv, D, generator=g).to(dtype).to(device)
    w = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype).to(device)
    bias = (0.1 * torch.randn(D, generator=g)).to(dtype).to(device)
    idx = ops.visual_index(mask)
    el = hidden.element_size()
    N = B * S
    full = N * D * el

    def err_rms():
        n, _ = ops.deepstack_inject_rms_norm(hidden, embeds, idx, w, EPS)
        rn, _ = ref.deepstack_inject_rms_norm(hidden.float(), embeds.float(), idx, w.float(), EPS)
        return (n.float() - rn).abs().max().item()

    def err_inject():
        o = ops.deepstack_inject(hidden, embeds, idx)
        return (o.float() - _hf_inject(hidden, embeds, mask).float()).abs().max().item()

    def err_ln():
        n, _ = ops.deepstack_inject_layer_norm(hidden, embeds, idx, w, bias, EPS)
        rn, _ = ref.deepstack_inject_layer_norm(hidden.float(), embeds.float(), idx, w.float(),
                                                bias.float(), EPS)
        return (n.float() - rn).abs().max().item()

    tol = 6.25e-2 if dtype == torch.bfloat16 else 8e-3  # ~2 ulp at |y| ~ 4 (two roundings, as HF)
    refs_rms = {"hf_eager": lambda: _hf_inject_rms(hidden, embeds, mask, w)}
    refs_inj = {"hf_eager": lambda: _hf_inject(hidden, embeds, mask)}
    refs_ln = {"hf_eager": lambda: _hf_inject_ln(hidden, embeds, mask, w, bias)}
    refs_norm = {"hf_eager": lambda: _hf_rms(hidden, w),
                 "aten_fused": lambda: F.rms_norm(hidden, (D,), w, EPS)}
    refs_rms["aten_fused"] = lambda: (F.rms_norm(_hf_inject(hidden, embeds, mask), (D,), w, EPS),)
    refs_lnorm = {"aten_fused": lambda: F.layer_norm(hidden, (D,), w, bias, EPS)}
    if compile_ok:
        c_rms = torch.compile(_hf_inject_rms)
        c_inj = torch.compile(_hf_inject)
        c_norm = torch.compile(_hf_rms)
        refs_rms["torch_compile"] = lambda: c_rms(hidden, embeds, mask, w)
        refs_inj["torch_compile"] = lambda: c_inj(hidden, embeds, mask)
        refs_norm["torch_compile"] = lambda: c_norm(hidden, w)
    out += [
        Case("deepstack_inject_rms_norm", name, dtype,
             lambda: ops.deepstack_inject_rms_norm(hidden, embeds, idx, w, EPS), refs_rms,
             bytes=3 * full + nv * D * el + D * el, max_err=err_rms, tol=tol),
        Case("deepstack_inject", name, dtype,
             lambda: ops.deepstack_inject(hidden, embeds, idx), refs_inj,
             bytes=2 * full + nv * D * el, max_err=err_inject, tol=0.0),
        Case("deepstack_inject_layer_norm", name, dtype,
             lambda: ops.deepstack_inject_layer_norm(hidden, embeds, idx, w, bias, EPS), refs_ln,
             bytes=3 * full + nv * D * el + 2 * D * el, max_err=err_ln, tol=tol),
        Case("rms_norm", name.split(" nv")[0], dtype, lambda: ops.rms_norm(hidden, w, EPS),
             refs_norm, bytes=2 * full + D * el,
             max_err=lambda: (ops.rms_norm(hidden, w, EPS).float()
                              - ref.rms_norm(hidden.float(), w.float(), EPS)).abs().max().item(),
             tol=tol),
        Case("layer_norm", name.split(" nv")[0], dtype, lambda: ops.layer_norm(hidden, w, bias, EPS),
             refs_lnorm, bytes=2 * full + 2 * D * el,
             max_err=lambda: (ops.layer_norm(hidden, w, bias, EPS).float()
                              - F.layer_norm(hidden.float(), (D,), w.float(), bias.float(), EPS)
                              ).abs().max().item(),
             tol=tol),
    ]
    return out


def cases(device, quick):
    out = []
    compile_ok = device == "cuda"
    dtypes = [torch.bfloat16, torch.float32] if device == "cpu" else \
        ([torch.bfloat16] if quick else [torch.bfloat16, torch.float16])
    for dtype in dtypes:
        for name, B, S, D, counts in _shapes(device, quick):
            out += _cases_one(device, dtype, name, B, S, D, counts, compile_ok)
    return out
