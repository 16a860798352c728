"""ConvNeXt family benchmark: one ConvNeXt block per ConvLLaVA-1536 stage (B=1, bf16) and the
fused dwconv + LayerNorm, and the block's MLP alone (stages with C <= 384: the fused MLP kernel), against PyTorch eager (transformers' ConvNextLayer, channels_last) and
torch.compile of the same module.

    python -m hires_lmm.bench.bench_convnext [--quick] [--device cpu|cuda]

`quick` (the CPU smoke run) uses tiny shapes; the targets of issue 3 (block >= 1.5x eager and
>= 1.1x compile on every stage) are for the full shapes on H100/H200."""
import argparse
import dataclasses
import functools
import os

import torch
import torch.nn.functional as F

from .. import ops, reference as ref
from .common import Case, time_us

# ConvLLaVA-1536 stage maps (H = W, C), B = 1 (specs/convllava.md section 1.2).
STAGES = [(384, 192), (192, 384), (96, 768), (48, 1536), (24, 3072)]
QUICK_STAGES = [(16, 32), (12, 64), (8, 128)]

# Max-abs-error budgets against the fp32 reference (outputs are O(1..5); bf16 ulp at 4 is 1/32).
TOL = {torch.bfloat16: {"block": 0.125, "dwln": 0.0625},
       torch.float16: {"block": 0.02, "dwln": 0.01},
       torch.float32: {"block": 1e-3, "dwln": 1e-4}}


def _params(C, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype=dtype, device=device)

    return dict(dw_weight=r(C, 1, 7, 7, scale=0.2), dw_bias=r(C, scale=0.5),
                ln_weight=r(C, scale=0.3, shift=1.0), ln_bias=r(C, scale=0.2),
                fc1_weight=r(4 * C, C, scale=C ** -0.5), fc1_bias=r(4 * C, scale=0.2),
                fc2_weight=r(C, 4 * C, scale=(4 * C) ** -0.5), fc2_bias=r(C, scale=0.2),
                gamma=r(C, scale=0.5))


def _block_args(p):
    return (p["dw_weight"], p["dw_bias"], p["ln_weight"], p["ln_bias"], p["fc1_weight"],
            p["fc1_bias"], p["fc2_weight"], p["fc2_bias"], p["gamma"])


def _hf_layer(C, p):
    """transformers' ConvNextLayer with our parameters, channels_last, in p's dtype."""
    from transformers import ConvNextConfig
    from transformers.models.convnext.modeling_convnext import ConvNextLayer

    layer = ConvNextLayer(ConvNextConfig(hidden_act="gelu", layer_scale_init_value=1.0), C).eval()
    with torch.no_grad():
        layer.dwconv.weight.copy_(p["dw_weight"].float().cpu())
        layer.dwconv.bias.copy_(p["dw_bias"].float().cpu())
        layer.layernorm.weight.copy_(p["ln_weight"].float().cpu())
        layer.layernorm.bias.copy_(p["ln_bias"].float().cpu())
        layer.pwconv1.weight.copy_(p["fc1_weight"].float().cpu())
        layer.pwconv1.bias.copy_(p["fc1_bias"].float().cpu())
        layer.pwconv2.weight.copy_(p["fc2_weight"].float().cpu())
        layer.pwconv2.bias.copy_(p["fc2_bias"].float().cpu())
        layer.layer_scale_parameter.copy_(p["gamma"].float().cpu())
    dtype, device = p["gamma"].dtype, p["gamma"].device
    return layer.to(device=device, dtype=dtype, memory_format=torch.channels_last)


def _eager_dwln(x_nchw, p):
    C = x_nchw.shape[1]
    y = F.conv2d(x_nchw, p["dw_weight"], p["dw_bias"], padding=3, groups=C).permute(0, 2, 3, 1)
    return F.layer_norm(y, (C,), p["ln_weight"], p["ln_bias"], 1e-6)


def _eager_mlp(h, w1, b1, w2, b2, gamma, res):
    """Eager Linear -> GELU (erf) -> Linear -> layer scale -> residual, in h's dtype."""
    return res + gamma * F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2)


def _sm90_available():
    import hires_lmm
    return (hires_lmm.build_info()["sm90a_kernels"]
            and torch.cuda.get_device_capability()[0] == 9)


def _with_sm90(fn):
    """Runs fn with HIRES_LMM_CONVNEXT_SM90=1 (the binding reads it per call)."""
    old = os.environ.get("HIRES_LMM_CONVNEXT_SM90")
    os.environ["HIRES_LMM_CONVNEXT_SM90"] = "1"
    try:
        return fn()
    finally:
        if old is None:
            del os.environ["HIRES_LMM_CONVNEXT_SM90"]
        else:
            os.environ["HIRES_LMM_CONVNEXT_SM90"] = old


def _with_env(name, value, fn):
    """Runs fn with the environment variable `name` set to `value` (the binding reads it per call)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        return fn()
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _max_err(fn, want_fn):
    @torch.no_grad()
    def err():
        return (fn().float() - want_fn().float()).abs().max().item()
    return err


def cases(device: str, quick: bool) -> list:
    stages = QUICK_STAGES if quick else STAGES
    dtypes = [torch.bfloat16] if device == "cuda" else [torch.float32, torch.bfloat16]
    out = []
    for dtype in dtypes:
        for hw, C in stages:
            p = _params(C, dtype, device)
            g = torch.Generator().manual_seed(1)
            x = torch.randn(1, hw, hw, C, generator=g).to(device=device, dtype=dtype)  # NHWC
            x_nchw = x.permute(0, 3, 1, 2)  # the same memory: an NCHW channels_last tensor
            assert x_nchw.is_contiguous(memory_format=torch.channels_last)
            M = hw * hw
            esize = x.element_size()
            p32 = {k: v.float() for k, v in p.items()}
            tag = f"{hw}x{hw}x{C}"

            # -- the whole block
            layer = _hf_layer(C, p)
            compiled = torch.compile(layer)
            ours = functools.partial(ops.convnext_block, x, *_block_args(p), 1e-6)
            out.append(Case(
                op="convnext_block", case=tag, dtype=dtype,
                ours=torch.no_grad()(ours),
                references={"hf_eager": torch.no_grad()(functools.partial(layer, x_nchw)),
                            "torch_compile": torch.no_grad()(functools.partial(compiled, x_nchw))},
                bytes=(2 * M * C + 2 * M * 4 * C + 8 * C * C) * esize,  # x, out, hidden (w+r), weights
                flops=2.0 * 2 * M * C * 4 * C + 2.0 * 49 * M * C,
                max_err=_max_err(ours, lambda x=x, p32=p32: ref.convnext_block(
                    x.float(), *_block_args(p32), 1e-6)),
                tol=TOL[dtype]["block"]))

            block_case = out[-1]

            # -- the same block through the opt-in Hopper GEMMs (compare before making them default;
            #    stages 1-2 take the fused MLP kernel first, so only C > 384)
            if device == "cuda" and _sm90_available() and C > 384:
                ours90 = functools.partial(_with_sm90, ours)
                out.append(dataclasses.replace(out[-1], op="convnext_block_sm90",
                                               ours=torch.no_grad()(ours90),
                                               max_err=_max_err(ours90, lambda x=x, p32=p32: ref.convnext_block(
                                                   x.float(), *_block_args(p32), 1e-6))))

            # -- stages 1-2 through the two CUTLASS GEMMs instead of the fused MLP (the widths the
            #    fused kernel should take are for this side-by-side on a GPU to decide)
            if device == "cuda" and C <= 384:
                ours2 = functools.partial(_with_env, "HIRES_LMM_CONVNEXT_FUSED_MLP", "0", ours)
                out.append(dataclasses.replace(block_case, op="convnext_block[two-gemm]",
                                               ours=torch.no_grad()(ours2),
                                               max_err=_max_err(ours2, lambda x=x, p32=p32: ref.convnext_block(
                                                   x.float(), *_block_args(p32), 1e-6))))

            # -- forward + backward (fine-tuning the tower): ours (dwconv+LN backward kernels, ATen
            #    GEMM gradients) against transformers' ConvNextLayer in eager autograd
            xg = x.detach().clone().requires_grad_(True)
            pg = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
            dy = torch.randn(x.shape, generator=g).to(device=device, dtype=dtype)
            layer_t = _hf_layer(C, p).train()
            xh = x_nchw.detach().clone().requires_grad_(True)   # channels_last, as x's memory
            dyh = dy.permute(0, 3, 1, 2)

            def ours_fb(xg=xg, pg=pg, dy=dy):
                ops.convnext_block(xg, *_block_args(pg), 1e-6).backward(dy)

            def hf_fb(layer_t=layer_t, xh=xh, dyh=dyh):
                layer_t(xh).backward(dyh)

            out.append(Case(
                op="convnext_block[fwd+bwd]", case=tag, dtype=dtype, ours=ours_fb,
                references={"hf_eager": hf_fb},
                bytes=None, flops=3 * (2.0 * 2 * M * C * 4 * C + 2.0 * 49 * M * C)))

            # -- the block's MLP alone (fused kernel for C <= 384, stages 1-2) against eager
            #    Linear -> GELU -> Linear -> layer scale -> residual and torch.compile of it
            if C <= 384:
                mlp_args = (p["fc1_weight"], p["fc1_bias"], p["fc2_weight"], p["fc2_bias"],
                            p["gamma"], x)
                h_in = torch.randn(x.shape, generator=g).to(device=device, dtype=dtype)
                ours_mlp = functools.partial(ops.convnext_mlp, h_in, *mlp_args)
                out.append(Case(
                    op="convnext_mlp", case=tag, dtype=dtype,
                    ours=torch.no_grad()(ours_mlp),
                    references={"eager": torch.no_grad()(functools.partial(_eager_mlp, h_in, *mlp_args)),
                                "torch_compile": torch.no_grad()(functools.partial(
                                    torch.compile(_eager_mlp), h_in, *mlp_args))},
                    bytes=(3 * M * C + 8 * C * C) * esize,  # x, res, out, weights (hidden on chip)
                    flops=2.0 * 2 * M * C * 4 * C,
                    max_err=_max_err(ours_mlp, lambda h_in=h_in, x=x, p32=p32: ref.convnext_mlp(
                        h_in.float(), p32["fc1_weight"], p32["fc1_bias"], p32["fc2_weight"],
                        p32["fc2_bias"], p32["gamma"], x.float())),
                    tol=TOL[dtype]["block"]))

                # fwd + bwd of the MLP alone against eager autograd (ours recomputes fc1 and the
                # GELU in the backward, which eager saves)
                mg = {k: pg[k] for k in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "gamma")}
                hg = h_in.detach().clone().requires_grad_(True)
                mlp_g = (mg["fc1_weight"], mg["fc1_bias"], mg["fc2_weight"], mg["fc2_bias"], mg["gamma"], x)

                def ours_mlp_fb(hg=hg, mlp_g=mlp_g, dy=dy):
                    ops.convnext_mlp(hg, *mlp_g).backward(dy)

                def eager_mlp_fb(hg=hg, mlp_g=mlp_g, dy=dy):
                    _eager_mlp(hg, *mlp_g).backward(dy)

                out.append(Case(
                    op="convnext_mlp[fwd+bwd]", case=tag, dtype=dtype, ours=ours_mlp_fb,
                    references={"eager": eager_mlp_fb}, bytes=None, flops=3 * 2.0 * 2 * M * C * 4 * C))

            # -- dwconv + LayerNorm alone
            ours_dw = functools.partial(ops.dwconv_layernorm, x, p["dw_weight"], p["dw_bias"],
                                        p["ln_weight"], p["ln_bias"], 1e-6)
            eager_dw = functools.partial(_eager_dwln, x_nchw, p)
            refs = {"eager": torch.no_grad()(eager_dw)}
            if device == "cpu":  # the best PyTorch CPU path may be either layout (issue 13, section 3)
                refs["eager_nchw"] = torch.no_grad()(functools.partial(_eager_dwln, x_nchw.contiguous(), p))
            refs["torch_compile"] = torch.no_grad()(functools.partial(torch.compile(_eager_dwln), x_nchw, p))
            out.append(Case(
                op="dwconv_layernorm", case=tag, dtype=dtype,
                ours=torch.no_grad()(ours_dw),
                references=refs,
                bytes=2 * M * C * esize,
                flops=2.0 * 49 * M * C,
                max_err=_max_err(ours_dw, lambda x=x, p32=p32: ref.dwconv_layernorm(
                    x.float(), p32["dw_weight"], p32["dw_bias"], p32["ln_weight"],
                    p32["ln_bias"], 1e-6)),
                tol=TOL[dtype]["dwln"]))

            # fwd + bwd: ours (conv recomputed in fp32, norm_backward, dwconv_backward) against
            # eager autograd of the depthwise conv + LayerNorm (channels-last)
            dg = {k: pg[k] for k in ("dw_weight", "dw_bias", "ln_weight", "ln_bias")}
            xg2 = x.detach().clone().requires_grad_(True)
            xh2 = x_nchw.detach().clone().requires_grad_(True)

            def ours_dw_fb(xg2=xg2, dg=dg, dy=dy):
                ops.dwconv_layernorm(xg2, dg["dw_weight"], dg["dw_bias"], dg["ln_weight"], dg["ln_bias"],
                                     1e-6).backward(dy)

            def eager_dw_fb(xh2=xh2, dg=dg, dy=dy):
                _eager_dwln(xh2, dg).backward(dy)          # (B, H, W, C) out, as ours

            out.append(Case(
                op="dwconv_layernorm[fwd+bwd]", case=tag, dtype=dtype, ours=ours_dw_fb,
                references={"eager": eager_dw_fb}, bytes=None, flops=3 * 2.0 * 49 * M * C))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    args = ap.parse_args(argv)
    print("case | dtype | ours us | reference us | speedup | TFLOP/s or GB/s | max err (tol)")
    for c in cases(args.device, args.quick):
        t = time_us(c.ours, args.device)
        rate = (f"{c.flops / t / 1e6:.2f} TFLOP/s"
                if c.flops and (c.bytes is None or c.op.startswith(("convnext_block", "convnext_mlp")))
                else f"{c.bytes / t / 1e3:.1f} GB/s")
        err = c.max_err() if c.max_err else float("nan")
        for name, fn in c.references.items():
            if args.no_compile and name == "torch_compile":
                continue
            tr = time_us(fn, args.device)
            print(f"{c.op} {c.case} | {str(c.dtype).replace('torch.', '')} | {t:.1f} | "
                  f"{name} {tr:.1f} | {tr / t:.2f}x | {rate} | {err:.3g} ({'-' if c.tol is None else f'{c.tol:g}'})")


if __name__ == "__main__":
    main()
