"""One call of every CUDA kernel path at small, odd shapes (forward and backward), for compute-sanitizer:

    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/sanitize_smoke.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python bench/sanitize_smoke.py

Each call is also compared loosely with the CPU kernel (the tests do the careful comparison);
the point is out-of-bounds accesses, races and misaligned accesses on every path, including the
scalar fallbacks, tails, split-KV decode and the opt-in sm_90a paths on a Hopper GPU."""
import os
import sys

import torch

import hires_lmm
from hires_lmm import ops

DEV = os.environ.get("HIRES_LMM_SMOKE_DEVICE", "cuda")  # "cpu": check this script's plumbing only
assert DEV == "cpu" or torch.cuda.is_available(), "sanitize_smoke: needs a CUDA device"
torch.manual_seed(0)
failures = []


def check(name, cuda_out, cpu_out, tol, rel=False):
    """max |cuda - cpu| <= tol (rel: tol * max(1, max |cpu|), for gradients of any size)"""
    cuda_out = cuda_out if isinstance(cuda_out, (tuple, list)) else [cuda_out]
    cpu_out = cpu_out if isinstance(cpu_out, (tuple, list)) else [cpu_out]
    for a, b in zip(cuda_out, cpu_out):
        if a is None and b is None:
            continue
        a, b = a.cpu(), b.cpu()
        if a.is_floating_point():
            err = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
            if rel and b.numel():
                err /= max(1.0, b.float().abs().max().item())
            ok = err <= tol
        else:
            err, ok = 0.0, torch.equal(a, b)
        print(f"{'ok  ' if ok else 'FAIL'} {name} err={err:.2e}")
        if not ok:
            failures.append(name)


def both(fn, *args):
    """fn on CUDA copies and on CPU copies of the tensors in args."""
    on = lambda dev: [a.to(dev) if isinstance(a, torch.Tensor) else a for a in args]
    return fn(*on(DEV)), fn(*on("cpu"))


for dt in (torch.float32, torch.float16, torch.bfloat16):
    tol = 1e-4 if dt == torch.float32 else 6e-2
    # DeepStack + norms: vector path (D % 8 == 0) and scalar path (odd D), tails of rows.
    for N, D in ((7, 4096), (19, 1000), (5, 72)):
        h = torch.randn(N, D).to(dt)
        idx = torch.tensor([0, 2, N - 1])
        e = torch.randn(3, D).to(dt)
        w, b = torch.randn(D).to(dt), torch.randn(D).to(dt)
        check(f"deepstack_inject_rms_norm {dt} {N}x{D}", *both(ops.deepstack_inject_rms_norm, h, e, idx, w, 1e-6), tol)
        check(f"deepstack_inject_layer_norm {dt} {N}x{D}", *both(ops.deepstack_inject_layer_norm, h, e, idx, w, b, 1e-5), tol)
        check(f"deepstack_inject {dt} {N}x{D}", *both(ops.deepstack_inject, h, e, idx), 0.0)
    # dwconv + LayerNorm: 16-byte path, scalar path (C % 8 != 0), several segments per row.
    for (B, H, W, C) in ((1, 5, 13, 24), (2, 3, 70, 20), (1, 2, 3, 3072)):
        x = torch.randn(B, H, W, C).to(dt)
        dw, dwb = torch.randn(C, 1, 7, 7).to(dt) * 0.1, torch.randn(C).to(dt)
        lw, lb = torch.randn(C).to(dt), torch.randn(C).to(dt)
        check(f"dwconv_layernorm {dt} {B}x{H}x{W}x{C}", *both(ops.dwconv_layernorm, x, dw, dwb, lw, lb, 1e-6), tol)
    for C in (24, 200):  # GEMM tails in N and K
        x = torch.randn(1, 5, 7, C).to(dt)
        p = [torch.randn(C, 1, 7, 7) * 0.1, torch.randn(C), torch.randn(C), torch.randn(C),
             torch.randn(4 * C, C) * C ** -0.5, torch.randn(4 * C), torch.randn(C, 4 * C) * (4 * C) ** -0.5,
             torch.randn(C), torch.randn(C)]
        p = [t.to(dt) for t in p]
        for sm90 in ("0", "1"):
            os.environ["HIRES_LMM_CONVNEXT_SM90"] = sm90
            check(f"convnext_block {dt} C={C} sm90={sm90}", *both(ops.convnext_block, x, *p, 1e-6), 2 * tol + 1e-3)
        os.environ.pop("HIRES_LMM_CONVNEXT_SM90")
        # backward: the op (ATen GEMMs + the norm_backward and dwconv_backward kernels)
        dy = torch.randn(1, 5, 7, C).to(dt)
        bwd = lambda dy, x, *p: torch.ops.hires_lmm.convnext_block_backward(dy, x, *p, 1e-6, [True] * 10, 1 << 22)
        check(f"convnext_block_backward {dt} C={C}", *both(bwd, dy, x, *p), 4 * tol + 1e-2, rel=True)
    # norm backward: vector rows and odd widths, with the extra gradient
    for N, D in ((7, 4096), (19, 1000), (5, 72)):
        x, g, gr = (torch.randn(N, D).to(dt) for _ in range(3))
        w = torch.randn(D).to(dt)
        for layer in (True, False):
            nb = lambda g, x, w, gr: torch.ops.hires_lmm.norm_backward(g, x, w, gr, 1e-5, layer, layer)
            check(f"norm_backward {dt} {N}x{D} layer={layer}", *both(nb, g, x, w, gr), 4 * tol, rel=True)
    # Selection: odd N, masks, k = 1 and k = N, both top-p variants, gather with -1 padding.
    loc, txt = torch.randn(2, 97, 72).to(dt), torch.randn(2, 5, 72).to(dt)
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    for k in (1, 33, 97):
        check(f"similarity_topk {dt} k={k}", *both(lambda a, b, m: ops.similarity_topk(a, b, k, m)[0], loc, txt, mask), 0)
    for pre in (0.5, None):
        i_cuda, i_cpu = both(lambda a, b, m: ops.similarity_topp(a, b, 0.9, m, 1.0, pre), loc, txt, mask)
        check(f"similarity_topp {dt} pre={pre} lengths", i_cuda[1], i_cpu[1], 0)
        check(f"gather_tokens {dt}", *both(ops.gather_tokens, loc, i_cpu[0]), 0.0)

for dt in (torch.float16, torch.bfloat16):
    # Attention: D 64/128, tails, causal with Sq != Sk both ways, GQA, decode (split-KV), varlen.
    for (B, Sq, Sk, Hq, Hkv, D, causal) in ((1, 77, 77, 4, 4, 64, False), (2, 33, 129, 4, 2, 128, True),
                                           (1, 129, 33, 2, 1, 64, True), (2, 1, 2049, 8, 2, 128, False)):
        q, k, v = (torch.randn(B, S, H, D).to(dt) for S, H in ((Sq, Hq), (Sk, Hkv), (Sk, Hkv)))
        f = lambda q, k, v: ops.flash_attn_func(q, k, v, causal=causal)
        check(f"flash_attn_func {dt} B{B} {Sq}x{Sk} H{Hq}/{Hkv} D{D} causal={causal}", *both(f, q, k, v), 2e-2)
        fw = lambda q, k, v: ops.flash_attn_func(q, k, v, causal=causal, window_size=(40, 3), softcap=20.0)
        check(f"flash_attn_func {dt} B{B} {Sq}x{Sk} D{D} causal={causal} window=(40,3) softcap=20",
              *both(fw, q, k, v), 2e-2)
        if DEV == "cuda" and torch.cuda.get_device_capability() == (9, 0) and Sq > 1:
            os.environ["HIRES_LMM_ATTN_SM90"] = "1"
            check(f"flash_attn_func[sm90a] {dt} {Sq}x{Sk} D{D}", *both(f, q, k, v), 2e-2)
            os.environ.pop("HIRES_LMM_ATTN_SM90")
        # backward (FlashAttention-2's on CUDA: dot(dO, O), the main kernel, the dQ convert)
        def fb(q, k, v, g, causal=causal):
            q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
            return torch.autograd.grad(ops.flash_attn_func(q, k, v, causal=causal), (q, k, v), g)
        check(f"flash_attn_func[bwd] {dt} B{B} {Sq}x{Sk} H{Hq}/{Hkv} D{D} causal={causal}",
              *both(fb, q, k, v, torch.randn(B, Sq, Hq, D).to(dt)), 5e-2, rel=True)
    cu = torch.tensor([0, 17, 17, 81, 82], dtype=torch.int32)
    q, k, v = (torch.randn(82, 4, 64).to(dt) for _ in range(3))
    f = lambda q, k, v, cu: ops.flash_attn_varlen_func(q, k, v, cu, cu, 64, 64, causal=True)
    check(f"flash_attn_varlen_func {dt}", *both(f, q, k, v, cu), 2e-2)

if DEV == "cuda":
    torch.cuda.synchronize()
print(f"sanitize_smoke: {len(failures)} mismatches" + (f": {failures}" if failures else ""))
sys.exit(1 if failures else 0)
