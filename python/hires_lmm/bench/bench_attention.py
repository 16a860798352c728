"""Attention forward benchmark: hires_lmm.ops.flash_attn_func against PyTorch SDPA backends.

Shapes (bf16 on CUDA): LLM prefill B=1, S=512..16384, 32 heads, D=128, causal and not; CLIP-L
B=8, S=577, 16 heads, D=64; decode Sq=1 against a 4096-token KV cache (32 q heads, 8 kv heads,
D=128). References: SDPA with each backend that runs the shape ("sdpa_flash", "sdpa_cudnn",
"sdpa_efficient", "sdpa_math"; math only up to S=4096, its S x S scores would not fit beyond).
FLOPs: 4 * B * H * Sq * Sk * D, halved for causal prefill (Sq == Sk).
quick=True: tiny shapes on the CPU against the reference and SDPA's math and (CPU) flash backends.
On an sm_90 device with sm_90a kernels built, every prefill / CLIP case is repeated as
"flash_attn_func[sm90a]" with the opt-in Hopper kernel (HIRES_LMM_ATTN_SM90=1).
flash_attn_with_kvcache: ragged batched decode (B=8, 4096-slot cache) against masked SDPA.
Forward + backward ("flash_attn_func[fwd+bwd]"): S=2048 causal, 32 heads, D=128 and CLIP-L
(B=8, S=577, 16 heads, D=64) against SDPA's flash / cuDNN / efficient backward; tiny on the CPU.
max_err: max |ours - fp32 reference| on the first heads (the full fp32 reference is O(S^2))."""
import dataclasses
import math
import os
from typing import List

import torch
import torch.nn.functional as F

from .. import ops, reference
from .common import Case

_BACKENDS = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_math": "MATH",
}


def _sdpa_fn(backend_name, q, k, v, causal):
    """A callable running SDPA with one backend on (B,S,H,D) tensors, or None if it cannot."""
    import contextlib
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # "sdpa": SDPA's own choice, without the sdpa_kernel context (whose enter / exit costs tens of
    # microseconds per call on the CPU, comparable to the tiny CPU shapes' differences)
    backend = None if backend_name == "sdpa" else getattr(SDPBackend, _BACKENDS[backend_name], None)
    if backend is None and backend_name != "sdpa":
        return None
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[2] != k.shape[2]

    def run():
        with (sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()):
            if gqa:
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=True)
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    try:
        run()
        if q.is_cuda:
            torch.cuda.synchronize()
    except Exception:  # this backend does not take this shape / dtype / GPU
        return None
    return run


def _max_err_fn(q, k, v, causal, heads):
    """max |ours - fp32 reference| over the first `heads` q heads (and their kv heads)."""
    group = q.shape[2] // k.shape[2]
    kv_heads = max(1, math.ceil(heads / group))

    def err():
        qs, ks, vs = q[:, :, :heads], k[:, :, :kv_heads], v[:, :, :kv_heads]
        ours = ops.flash_attn_func(qs, ks, vs, causal=causal).float()
        ref = reference.flash_attn_func(qs.float(), ks.float(), vs.float(), causal=causal)
        return (ours - ref).abs().max().item()

    return err


def _case(name, B, Sq, Sk, Hq, Hkv, D, causal, dtype, device, backends, err_heads):
    gen = torch.Generator(device=device).manual_seed(Sq + Sk + D)
    q = torch.randn(B, Sq, Hq, D, dtype=dtype, device=device, generator=gen)
    k = torch.randn(B, Sk, Hkv, D, dtype=dtype, device=device, generator=gen)
    v = torch.randn(B, Sk, Hkv, D, dtype=dtype, device=device, generator=gen)
    refs = {}
    for b in backends:
        fn = _sdpa_fn(b, q, k, v, causal)
        if fn is not None:
            refs[b] = fn
    if device == "cpu":
        refs["reference"] = lambda: reference.flash_attn_func(q, k, v, causal=causal)
    flops = 4.0 * B * Hq * Sq * Sk * D * (0.5 if causal and Sq == Sk else 1.0)
    return Case(op="flash_attn_func", case=f"{name} B={B} Sq={Sq} Sk={Sk} Hq={Hq} Hkv={Hkv} D={D}"
                f"{' causal' if causal else ''}", dtype=dtype,
                ours=lambda: ops.flash_attn_func(q, k, v, causal=causal), references=refs,
                flops=flops, max_err=_max_err_fn(q, k, v, causal, err_heads),
                tol=2e-2 if dtype != torch.float32 else 1e-4)


def _fwd_bwd_case(name, B, S, H, D, causal, dtype, device, backends, err_heads):
    """Forward + backward (torch.autograd.grad of o against a fixed dO for q, k, v): ours
    (FlashAttention-2 backward, hires_lmm::flash_attn_bwd) against SDPA's backends' autograd.
    FLOPs: forward 4 B H S^2 D + backward 10 B H S^2 D (5 GEMMs), halved for causal.
    max_err: max |dq, dk, dv ours - fp32 reference autograd| on the first `err_heads` heads."""
    gen = torch.Generator(device=device).manual_seed(S + D + 1)
    q, k, v = (torch.randn(B, S, H, D, dtype=dtype, device=device, generator=gen).requires_grad_(True)
               for _ in range(3))
    g = torch.randn(B, S, H, D, dtype=dtype, device=device, generator=gen)

    def grads(fn, qq, kk, vv, gg):
        return torch.autograd.grad(fn(qq, kk, vv), (qq, kk, vv), gg)

    def ours():
        return grads(lambda a, b, c: ops.flash_attn_func(a, b, c, causal=causal), q, k, v, g)

    refs = {}
    for bname in backends:
        fwd = _sdpa_fn(bname, q.detach(), k.detach(), v.detach(), causal)
        if fwd is None:
            continue
        import contextlib
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = None if bname == "sdpa" else getattr(SDPBackend, _BACKENDS[bname])

        def run(backend=backend):
            with (sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()):
                o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   is_causal=causal)
                return torch.autograd.grad(o, (q, k, v), g.transpose(1, 2))
        try:
            run()
        except Exception:  # no backward for this backend / shape
            continue
        refs[bname] = run
    if device == "cpu":
        refs["reference"] = lambda: grads(lambda a, b, c: reference.flash_attn_func(a, b, c, causal=causal),
                                          q, k, v, g)

    def err():
        sl = [t[:, :, :err_heads].detach() for t in (q, k, v, g)]
        got = grads(lambda a, b, c: ops.flash_attn_func(a, b, c, causal=causal),
                    *[t.clone().requires_grad_(True) for t in sl[:3]], sl[3])
        ref = grads(lambda a, b, c: reference.flash_attn_func(a, b, c, causal=causal),
                    *[t.float().requires_grad_(True) for t in sl[:3]], sl[3].float())
        return max((a.float() - b).abs().max().item() for a, b in zip(got, ref))

    flops = 14.0 * B * H * S * S * D * (0.5 if causal else 1.0)
    return Case(op="flash_attn_func[fwd+bwd]", case=f"{name} B={B} S={S} H={H} D={D}"
                f"{' causal' if causal else ''}", dtype=dtype, ours=ours, references=refs, flops=flops,
                max_err=err, tol=5e-2 if dtype != torch.float32 else 1e-3)


def _varlen_case(device, dtype):
    lens = [17, 64, 1, 100]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    total, H, D = sum(lens), 4, 64
    q, k, v = (torch.randn(total, H, D, dtype=dtype, device=device) for _ in range(3))
    mx = max(lens)

    def err():
        ours = ops.flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, causal=True).float()
        ref = reference.flash_attn_varlen_func(q.float(), k.float(), v.float(), cu, cu, mx, mx, causal=True)
        return (ours - ref).abs().max().item()

    flops = sum(4.0 * H * n * n * D * 0.5 for n in lens)
    return Case(op="flash_attn_varlen_func", case=f"varlen lens={lens} H={H} D={D} causal", dtype=dtype,
                ours=lambda: ops.flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, causal=True),
                references={"reference": lambda: reference.flash_attn_varlen_func(
                    q, k, v, cu, cu, mx, mx, causal=True)},
                flops=flops, max_err=err, tol=2e-2 if dtype != torch.float32 else 1e-4)


def _kvcache_case(device, dtype, B, S_cache, Hq, Hkv, D):
    """Batched decode over a KV cache with ragged lengths: flash_attn_with_kvcache (append of one
    token in place + attention over each sequence's own length; value checks off, as in a
    CUDA-graph decode step) against SDPA over the whole cache with a key-padding mask."""
    gen = torch.Generator().manual_seed(B + S_cache)
    lens = torch.randint(S_cache // 4, S_cache - 1, (B,), generator=gen, dtype=torch.int32)
    q = torch.randn(B, 1, Hq, D, generator=gen).to(dtype).to(device)
    kc, vc = (torch.randn(B, S_cache, Hkv, D, generator=gen).to(dtype).to(device) for _ in range(2))
    k, v = (torch.randn(B, 1, Hkv, D, generator=gen).to(dtype).to(device) for _ in range(2))
    cs = lens.to(device)
    mask = (torch.arange(S_cache).view(1, -1) < (lens + 1).view(-1, 1)).to(device).view(B, 1, 1, S_cache)

    def ours():
        from .. import set_value_checks, _C
        was = _C.value_checks()
        set_value_checks(False)
        try:
            return ops.flash_attn_with_kvcache(q, kc, vc, k, v, cs)
        finally:
            set_value_checks(was)

    def sdpa():
        return F.scaled_dot_product_attention(q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2),
                                              attn_mask=mask, enable_gqa=Hq != Hkv).transpose(1, 2)

    refs = {"sdpa_masked": sdpa}
    if device == "cpu":
        refs["reference"] = lambda: reference.flash_attn_with_kvcache(q, kc, vc, k, v, cs, None, True)

    def err():
        ref = reference.flash_attn_with_kvcache(q.float(), kc.float(), vc.float(), k.float(), v.float(),
                                                cs, None, True)
        return (ours().float() - ref).abs().max().item()

    flops = 4.0 * Hq * D * float((lens + 1).sum())
    return Case(op="flash_attn_with_kvcache", case=f"decode ragged B={B} S_cache={S_cache} Hq={Hq} "
                f"Hkv={Hkv} D={D}", dtype=dtype, ours=ours, references=refs, flops=flops,
                bytes=int(2 * int((lens + 1).sum()) * Hkv * D * kc.element_size()),
                max_err=err, tol=2e-2 if dtype != torch.float32 else 1e-4)


class _Sm90:
    """Runs a call with the opt-in sm_90a kernel selected (HIRES_LMM_ATTN_SM90=1)."""

    def __enter__(self):
        self.old = os.environ.get("HIRES_LMM_ATTN_SM90")
        os.environ["HIRES_LMM_ATTN_SM90"] = "1"

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("HIRES_LMM_ATTN_SM90", None)
        else:
            os.environ["HIRES_LMM_ATTN_SM90"] = self.old


def _sm90_available(device):
    from .. import build_info
    return (device == "cuda" and build_info().get("sm90a_kernels", False)
            and torch.cuda.get_device_capability() == (9, 0))


def _sm90_variant(c: Case) -> Case:
    ours = c.ours
    err = c.max_err

    def run():
        with _Sm90():
            return ours()

    def max_err():
        with _Sm90():
            return err()

    return dataclasses.replace(c, op=c.op + "[sm90a]", ours=run, max_err=max_err)


def cases(device: str, quick: bool) -> List[Case]:
    if quick or device == "cpu":
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        # CPU: also SDPA's default CPU kernel (flash), the fastest PyTorch CPU path
        # and "sdpa" (its own choice, no backend context: the cheapest call)
        refs = ["sdpa_math", "sdpa_flash", "sdpa"] if device == "cpu" else ["sdpa_math"]
        out = [
            _case("tiny", 1, 128, 128, 4, 4, 64, False, dtype, device, refs, 4),
            _case("tiny", 1, 128, 128, 4, 4, 64, True, dtype, device, refs, 4),
            _case("tiny-gqa", 2, 77, 77, 4, 2, 128, True, dtype, device, refs, 4),
            _case("decode", 1, 1, 512, 8, 2, 128, False, dtype, device, refs, 8),
        ]
        if device == "cpu":
            out.append(_varlen_case(device, dtype))
        out.append(_kvcache_case(device, dtype, 3, 300, 8, 2, 128))
        out.append(_fwd_bwd_case("tiny", 1, 128, 4, 64, True, dtype, device, refs, 4))
        return out

    dtype = torch.bfloat16
    all_backends = list(_BACKENDS)
    no_math = [b for b in all_backends if b != "sdpa_math"]
    out = []
    for S in (512, 1024, 2048, 4096, 8192, 16384):
        for causal in (False, True):
            out.append(_case("llm-prefill", 1, S, S, 32, 32, 128, causal, dtype, device,
                             all_backends if S <= 4096 else no_math, 2))
    for causal in (False,):
        out.append(_case("clip-l", 8, 577, 577, 16, 16, 64, causal, dtype, device, all_backends, 16))
    out.append(_case("decode", 1, 1, 4096, 32, 8, 128, False, dtype, device, all_backends, 32))
    out.append(_case("decode", 8, 1, 4096, 32, 8, 128, False, dtype, device, all_backends, 32))
    if _sm90_available(device):  # opt-in sm_90a kernel on the dense prefill / CLIP shapes
        out += [_sm90_variant(c) for c in list(out) if "decode" not in c.case]
    out.append(_varlen_case(device, dtype))
    out.append(_kvcache_case(device, dtype, 8, 4096, 32, 8, 128))
    # forward + backward (training) at the model shapes
    out.append(_fwd_bwd_case("llm-train", 1, 2048, 32, 128, True, dtype, device, no_math, 2))
    out.append(_fwd_bwd_case("clip-l-train", 8, 577, 16, 64, False, dtype, device, no_math, 4))
    return out
