"""Backward kernel of the norms (hires_lmm::norm_backward: rms_norm, layer_norm,
deepstack_inject_rms_norm, deepstack_inject_layer_norm; deepstack_inject's autograd): gradients
against fp64 autograd of the formula with flash-attn's rule (our error at most 2x the error of
PyTorch autograd through hires_lmm.reference in the same dtype, plus a small floor), odd sizes,
non-contiguous inputs, the visual rows' gradient, bitwise determinism, gradcheck, opcheck, bad
input."""
import pytest

pytestmark = pytest.mark.filterwarnings("ignore:Input #.*requires gradient and is not a double")
import torch

import hires_lmm
import hires_lmm.reference as ref
from hires_lmm import ops
from conftest import DEVICES, DTYPES, HAS_CUDA, NO_CUDA_REASON

FLOOR = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _gold_norm(x, w, b, eps, layer):
    """fp64 formula (the references compute in fp32 internally, so fp64 is written out here)."""
    if layer:
        mu = x.mean(-1, keepdim=True)
        y = (x - mu) * torch.rsqrt((x - mu).pow(2).mean(-1, keepdim=True) + eps)
        y = y * w
        return y + b if b is not None else y
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _gold_inject(h, e, idx):
    flat = h.reshape(-1, h.shape[-1])
    return flat.index_put((idx,), flat[idx] + e.to(h.dtype)).view(h.shape)


KINDS = ["rms", "ln", "ln_nobias", "inject_rms", "inject_ln", "inject"]


def _make(kind, lead, D, dtype, device, seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    rows = 1
    for s in lead:
        rows *= s
    if noncontig:   # every other column of a wider tensor, and the rows transposed
        h = (torch.randn(*lead, 2 * D, generator=g) * 2 + 0.3)[..., ::2]
    else:
        h = torch.randn(*lead, D, generator=g) * 2 + 0.3
    nv = max(rows // 3, 1) if rows > 0 else 0
    idx = torch.randperm(max(rows, 1), generator=g)[:nv].sort().values if rows > 0 else \
        torch.zeros(0, dtype=torch.long)
    e = torch.randn(nv, D, generator=g)
    w = 1 + 0.5 * torch.randn(D, generator=g)
    b = 0.1 * torch.randn(D, generator=g) if kind in ("ln", "inject_ln") else None
    dn = torch.randn(*lead, D, generator=g)
    di = torch.randn(*lead, D, generator=g)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return dict(h=cast(h), e=cast(e), idx=idx.to(device), w=cast(w), b=cast(b), dn=cast(dn),
                di=cast(di))


def _run(kind, t, lib, dtype_out=None):
    """Forward with `lib` (ops, ref or gold) and backward; returns the grads of h, e, w, b."""
    leaves = {k: t[k].detach().clone().requires_grad_() for k in ("h", "e", "w", "b")
              if t[k] is not None and (k != "e" or kind.startswith("inject"))
              and (kind != "inject" or k in ("h", "e"))}
    h, w, b = leaves["h"], leaves.get("w"), leaves.get("b")
    layer = "ln" in kind
    eps = 1e-5 if layer else 1e-6
    if lib == "gold":
        if kind.startswith("inject"):
            inj = _gold_inject(h, leaves["e"], t["idx"])
            outs = [inj] if kind == "inject" else [_gold_norm(inj, w, b, eps, layer), inj]
        else:
            outs = [_gold_norm(h, w, b, eps, layer)]
    else:
        m = ops if lib == "ops" else ref
        if kind == "rms":
            outs = [m.rms_norm(h, w, eps)]
        elif kind in ("ln", "ln_nobias"):
            outs = [m.layer_norm(h, w, b, eps)]
        elif kind == "inject_rms":
            outs = list(m.deepstack_inject_rms_norm(h, leaves["e"], t["idx"], w, eps))
        elif kind == "inject_ln":
            outs = list(m.deepstack_inject_layer_norm(h, leaves["e"], t["idx"], w, b, eps))
        else:
            outs = [m.deepstack_inject(h, leaves["e"], t["idx"])]
    grads = [t["dn"], t["di"]] if kind.startswith("inject_") else \
        [t["di"] if kind == "inject" else t["dn"]]
    torch.autograd.backward(outs, [gr.to(o.dtype) for o, gr in zip(outs, grads)])
    return {k: v.grad for k, v in leaves.items()}


def _check_against_gold(kind, t, dtype):
    ours = _run(kind, t, "ops")
    theirs = _run(kind, t, "ref")
    t64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
           for k, v in t.items()}
    gold = _run(kind, t64, "gold")
    assert set(ours) == set(gold)
    for k in gold:
        assert ours[k] is not None and ours[k].dtype == t[k].dtype, k
        assert ours[k].shape == t[k].shape, k
        err = (ours[k].double() - gold[k]).abs().max().item() if gold[k].numel() else 0.0
        err_ref = (theirs[k].double() - gold[k]).abs().max().item() if gold[k].numel() else 0.0
        scale = gold[k].abs().max().item() if gold[k].numel() else 0.0
        assert err <= 2 * err_ref + FLOOR[dtype] * max(scale, 1.0), \
            f"{kind} d{k}: error {err:.3g} vs reference autograd {err_ref:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lead,D", [((37,), 67), ((3, 5), 129), ((1,), 1), ((300,), 24)])
def test_grads_match_fp64(device, dtype, kind, lead, D):
    _check_against_gold(kind, _make(kind, lead, D, dtype, device, seed=D), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_inputs(device, kind):
    t = _make(kind, (4, 9), 33, torch.float32, device, seed=1, noncontig=True)
    assert not t["h"].is_contiguous()
    t["h"] = t["h"].transpose(0, 1)
    t["dn"], t["di"] = t["dn"].transpose(0, 1), t["di"].transpose(0, 1)   # non-contiguous grads
    _check_against_gold(kind, t, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("edtype", [torch.float32, torch.bfloat16])
def test_visual_rows_gradient(device, edtype):
    """d(visual_embeds)[r] = d(injected)[visual_index[r]] (norm's dx plus injected's own
    gradient), in visual_embeds' dtype; the other rows of hidden get theirs untouched."""
    t = _make("inject_rms", (2, 11), 40, torch.bfloat16, device, seed=4)
    e = t["e"].to(edtype).requires_grad_()
    h = t["h"].clone().requires_grad_()
    w = t["w"].clone().requires_grad_()
    normed, inj = ops.deepstack_inject_rms_norm(h, e, t["idx"], w, 1e-6)
    torch.autograd.backward([normed, inj], [t["dn"], t["di"]])
    assert e.grad.dtype == edtype
    dflat = h.grad.reshape(-1, 40)
    torch.testing.assert_close(e.grad, dflat[t["idx"]].to(edtype), rtol=0, atol=0)
    # and d(hidden) is exactly what rms_norm's backward gives on the injected rows, plus di
    inj2 = inj.detach().clone().requires_grad_()
    w2 = t["w"].clone().requires_grad_()
    ops.rms_norm(inj2, w2, 1e-6).backward(t["dn"])
    expect = (inj2.grad.float() + t["di"].float())
    torch.testing.assert_close(h.grad.float(), expect, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(w.grad, w2.grad, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic(device, dtype):
    """Two runs are bitwise identical (the weight/bias gradients are a fixed-order two-stage sum
    over 2500 rows = 250 chunks; no atomics)."""
    t = _make("ln", (2500,), 96, dtype, device, seed=5)
    a = op_bwd(t, True)
    b = op_bwd(t, True)
    threads = torch.get_num_threads()
    try:   # and independent of the CPU thread count (the partition depends on the shape only)
        torch.set_num_threads(1)
        c = op_bwd(t, True)
    finally:
        torch.set_num_threads(threads)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)


def op_bwd(t, layer):
    return torch.ops.hires_lmm.norm_backward(t["dn"], t["h"], t["w"], t["di"], 1e-5, layer, True)


def test_zero_rows():
    for layer in (False, True):
        x = torch.zeros(0, 7)
        dx, dw, db = torch.ops.hires_lmm.norm_backward(x, x, torch.ones(7), None, 1e-5, layer, layer)
        assert dx.shape == (0, 7) and torch.equal(dw, torch.zeros(7))
        assert db.shape == ((7,) if layer else (0,)) and (db == 0).all()


def test_gradcheck_fp32_small():
    """gradcheck (finite differences): the forward kernels are fp32/fp16/bf16 only, so this runs
    in fp32 on a tiny shape with tolerances for fp32 differences (eps=1e-2)."""
    g = torch.Generator().manual_seed(6)
    h = torch.randn(3, 5, generator=g).requires_grad_()
    e = torch.randn(1, 5, generator=g).requires_grad_()
    w = (1 + 0.3 * torch.randn(5, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(5, generator=g)).requires_grad_()
    idx = torch.tensor([1])
    kw = dict(eps=1e-2, atol=2e-2, rtol=2e-2)
    assert torch.autograd.gradcheck(lambda x, w_: ops.rms_norm(x, w_, 1e-6), (h, w), **kw)
    assert torch.autograd.gradcheck(lambda x, w_, b_: ops.layer_norm(x, w_, b_, 1e-5), (h, w, b), **kw)
    assert torch.autograd.gradcheck(
        lambda x, e_, w_, b_: ops.deepstack_inject_layer_norm(x, e_, idx, w_, b_, 1e-5), (h, e, w, b), **kw)
    assert torch.autograd.gradcheck(
        lambda x, e_, w_: ops.deepstack_inject_rms_norm(x, e_, idx, w_, 1e-6), (h, e, w), **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward_op(device):
    t = _make("ln", (5, 3), 17, torch.float32, device, seed=7)
    lib = torch.ops.hires_lmm
    torch.library.opcheck(lib.norm_backward, (t["dn"], t["h"], t["w"], t["di"], 1e-5, True, True))
    torch.library.opcheck(lib.norm_backward, (t["dn"], t["h"], t["w"], None, 1e-6, False, False))
    h = t["h"].clone().requires_grad_()
    w = t["w"].clone().requires_grad_()
    torch.library.opcheck(lib.rms_norm, (h, w, 1e-6))
    torch.library.opcheck(lib.layer_norm, (h, w, t["b"], 1e-5))


@pytest.mark.parametrize("mutate,arg", [
    (lambda a: a.update(w=a["w"][:-1]), "weight"),
    (lambda a: a.update(dn=a["dn"][:1]), "grad_out"),
    (lambda a: a.update(di=a["di"].half()), "grad_res"),
    (lambda a: a.update(eps=-1.0), "eps"),
])
def test_bad_input_names_the_argument(mutate, arg):
    t = _make("ln", (4,), 8, torch.float32, "cpu")
    a = dict(dn=t["dn"], h=t["h"], w=t["w"], di=t["di"], eps=1e-5)
    mutate(a)
    with pytest.raises(RuntimeError, match=f"norm_backward: argument '{arg}'"):
        torch.ops.hires_lmm.norm_backward(a["dn"], a["h"], a["w"], a["di"], a["eps"], True, True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer", [False, True])
def test_gpu_matches_cpu_twin(dtype, layer):
    """Same partition and formula: dweight/dbias agree with the CPU twin to fp32 rounding of the
    row statistics (block-tree vs serial row sums), dx likewise."""
    t = _make("ln", (1031,), 200, dtype, "cpu", seed=8)
    cpu = torch.ops.hires_lmm.norm_backward(t["dn"], t["h"], t["w"], t["di"], 1e-5, layer, True)
    gpu = torch.ops.hires_lmm.norm_backward(*[t[k].cuda() for k in ("dn", "h", "w", "di")],
                                            1e-5, layer, True)
    atol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
    for c, g in zip(cpu, gpu):
        torch.testing.assert_close(g.cpu().float(), c.float(), atol=atol, rtol=atol)


def test_autograd_runs_the_kernel():
    """The ops' autograd is norm_backward itself (bitwise), not a reference recompute."""
    t = _make("ln", (50,), 40, torch.bfloat16, "cpu", seed=9)
    x = t["h"].clone().requires_grad_()
    w = t["w"].clone().requires_grad_()
    b = t["b"].clone().requires_grad_()
    ops.layer_norm(x, w, b, 1e-5).backward(t["dn"])
    dx, dw, db = torch.ops.hires_lmm.norm_backward(t["dn"], t["h"], t["w"], None, 1e-5, True, True)
    assert torch.equal(x.grad, dx) and torch.equal(w.grad, dw) and torch.equal(b.grad, db)
    x.grad = w.grad = None
    ops.rms_norm(x, w, 1e-6).backward(t["dn"])
    dx, dw, _ = torch.ops.hires_lmm.norm_backward(t["dn"], t["h"], t["w"], None, 1e-6, False, False)
    assert torch.equal(x.grad, dx) and torch.equal(w.grad, dw)


# ---- dwconv_layernorm and convnext_block backward ------------------------------------------------
_BLOCK_KEYS = ["dw_weight", "dw_bias", "ln_weight", "ln_bias", "fc1_weight", "fc1_bias",
               "fc2_weight", "fc2_bias", "gamma"]


def _block_params(C, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0, shift=0.0: (torch.randn(*s, generator=g) * scale + shift).to(device=device, dtype=dtype)
    return dict(dw_weight=r(C, 1, 7, 7, scale=0.2), dw_bias=r(C, scale=0.5), ln_weight=r(C, scale=0.3, shift=1.0),
                ln_bias=r(C, scale=0.2), fc1_weight=r(4 * C, C, scale=C ** -0.5), fc1_bias=r(4 * C, scale=0.2),
                fc2_weight=r(C, 4 * C, scale=(4 * C) ** -0.5), fc2_bias=r(C, scale=0.2),
                gamma=r(C, scale=0.3, shift=0.5))


def _gold_block(x, p, eps, block):
    F = torch.nn.functional
    C = x.shape[-1]
    y = F.conv2d(x.permute(0, 3, 1, 2), p["dw_weight"], p["dw_bias"], padding=3, groups=C).permute(0, 2, 3, 1)
    y = F.layer_norm(y, (C,), p["ln_weight"], p["ln_bias"], eps)
    if not block:
        return y
    h = F.linear(F.gelu(F.linear(y, p["fc1_weight"], p["fc1_bias"])), p["fc2_weight"], p["fc2_bias"])
    return x + p["gamma"] * h


def _block_grads(lib, x, p, dout, block):
    xs = x.detach().clone().requires_grad_()
    ps = {k: v.detach().clone().requires_grad_() for k, v in p.items()}
    if lib == "gold":
        out = _gold_block(xs, ps, 1e-6, block)
    else:
        m = ops if lib == "ops" else ref
        out = (m.convnext_block(xs, *[ps[k] for k in _BLOCK_KEYS], 1e-6) if block else
               m.dwconv_layernorm(xs, *[ps[k] for k in _BLOCK_KEYS[:4]], 1e-6))
    out.backward(dout.to(out.dtype))
    keys = _BLOCK_KEYS if block else _BLOCK_KEYS[:4]
    return {"x": xs.grad, **{k: ps[k].grad for k in keys}}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [False, True])
def test_convnext_grads_match_fp64(device, dtype, block):
    C = 12
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 5, 9, C, generator=g).to(device=device, dtype=dtype)
    dout = torch.randn(2, 5, 9, C, generator=g).to(device=device, dtype=dtype)
    p = _block_params(C, dtype, device)
    ours = _block_grads("ops", x, p, dout, block)
    theirs = _block_grads("ref", x, p, dout, block)
    gold = _block_grads("gold", x.double(), {k: v.double() for k, v in p.items()}, dout.double(), block)
    for k in gold:
        assert ours[k] is not None and ours[k].dtype == dtype and ours[k].shape == gold[k].shape, k
        err = (ours[k].double() - gold[k]).abs().max().item()
        err_ref = (theirs[k].double() - gold[k]).abs().max().item()
        scale = gold[k].abs().max().item()
        assert err <= 2 * err_ref + FLOOR[dtype] * max(scale, 1.0), \
            f"block={block} d{k}: error {err:.3g} vs reference autograd {err_ref:.3g} (scale {scale:.3g})"


def test_convnext_backward_deterministic():
    C = 16
    x = torch.randn(2, 14, 14, C)
    p = _block_params(C, torch.float32, "cpu")
    dout = torch.randn_like(x)
    a = _block_grads("ops", x, p, dout, True)
    b = _block_grads("ops", x, p, dout, True)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("device", DEVICES)
def test_dwconv_backward_op(device):
    """dwconv_backward alone against ATen's depthwise convolution_backward in fp64, no bias,
    odd sizes smaller than the kernel (every tap partly on the padding), opcheck."""
    g = torch.Generator().manual_seed(11)
    for shape in [(1, 3, 2, 5), (2, 9, 8, 3), (67, 2, 3, 4)]:   # B*H = 134 rows: 3 rows per chunk
        C = shape[-1]
        x = torch.randn(*shape, generator=g)
        w = torch.randn(C, 1, 7, 7, generator=g)
        dy = torch.randn(*shape, generator=g)
        gx, gw, gb = torch.ops.hires_lmm.dwconv_backward(dy.to(device), x.to(device), w.to(device), True)
        ex, ew, eb = torch.ops.aten.convolution_backward(
            dy.double().permute(0, 3, 1, 2), x.double().permute(0, 3, 1, 2), w.double(), [C],
            [1, 1], [3, 3], [1, 1], False, [0, 0], C, [True, True, True])
        torch.testing.assert_close(gx.cpu().double(), ex.permute(0, 2, 3, 1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gw.cpu().double(), ew, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gb.cpu().double(), eb, atol=1e-4, rtol=1e-4)
    _, _, nb = torch.ops.hires_lmm.dwconv_backward(dy.to(device), x.to(device), w.to(device), False)
    assert nb.shape == (0,)
    torch.library.opcheck(torch.ops.hires_lmm.dwconv_backward,
                          (dy.to(device), x.to(device), w.to(device), True))
    with pytest.raises(RuntimeError, match="dwconv_backward: argument 'grad_y'"):
        torch.ops.hires_lmm.dwconv_backward(dy.half().to(device), x.to(device), w.to(device), True)
    with pytest.raises(RuntimeError, match="dwconv_backward: argument 'dw_weight'"):
        torch.ops.hires_lmm.dwconv_backward(dy.to(device), x.to(device), w[:, :, :5, :5].to(device), True)


@pytest.mark.parametrize("device", DEVICES)
def test_dwconv_layernorm_no_bias_grads(device):
    C = 6
    g = torch.Generator().manual_seed(12)
    x = torch.randn(1, 4, 11, C, generator=g).to(device)
    p = _block_params(C, torch.float32, device)
    args = lambda q: (q["dw_weight"], None, q["ln_weight"], None)
    ps = {k: v.clone().requires_grad_() for k, v in p.items()}
    xs = x.clone().requires_grad_()
    ops.dwconv_layernorm(xs, *args(ps), 1e-6).sum().backward()
    pr = {k: v.clone().requires_grad_() for k, v in p.items()}
    xr = x.clone().requires_grad_()
    ref.dwconv_layernorm(xr, *args(pr), 1e-6).sum().backward()
    for a, b in [(xs, xr), (ps["dw_weight"], pr["dw_weight"]), (ps["ln_weight"], pr["ln_weight"])]:
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_dwconv_backward_matches_cpu_twin(dtype):
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 37, 23, 40, generator=g).to(dtype)
    w = torch.randn(40, 1, 7, 7, generator=g).to(dtype)
    dy = torch.randn(2, 37, 23, 40, generator=g)
    cpu = torch.ops.hires_lmm.dwconv_backward(dy, x, w, True)
    gpu = torch.ops.hires_lmm.dwconv_backward(dy.cuda(), x.cuda(), w.cuda(), True)
    atol = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 0.25}[dtype]
    for c, gg in zip(cpu, gpu):
        torch.testing.assert_close(gg.cpu().float(), c.float(), atol=atol, rtol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", [False, True])
def test_huge_rows_use_fp64_statistics(device, layer):
    """A row whose fp32 sum of squares overflows (|x| ~ 1e20) gets its statistics in fp64, as the
    forward: finite gradients equal to the fp64 formula, not 0 or NaN."""
    g = torch.Generator().manual_seed(14)
    x = torch.randn(3, 16, generator=g)
    x[1] *= 1e20
    w = 1 + 0.3 * torch.randn(16, generator=g)
    dy = torch.randn(3, 16, generator=g)
    dx, dw, db = torch.ops.hires_lmm.norm_backward(dy.to(device), x.to(device), w.to(device), None,
                                                   1e-5, layer, layer)
    xd = x.double().requires_grad_()
    wd = w.double().requires_grad_()
    _gold_norm(xd, wd, None, 1e-5, layer).backward(dy.double())
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()
    torch.testing.assert_close(dx.cpu().double(), xd.grad, rtol=1e-4, atol=0)
    torch.testing.assert_close(dw.cpu().double(), wd.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer", [True, False])
@pytest.mark.parametrize("D", [1, 7, 8, 17, 77, 192, 1000])
@pytest.mark.parametrize("no_avx512", ["0", "1"])
def test_cpu_avx2_rows_match_portable(dtype, layer, D, no_avx512, monkeypatch):
    """The CPU's vectorized rows (default path: AVX-512 where the CPU has it, else AVX2;
    HIRES_LMM_CPU_NO_AVX512=1: AVX2) compute the portable rows' arithmetic lane for lane: dx,
    dweight and dbias bitwise equal to HIRES_LMM_CPU_TWIN=1's, with and without the extra
    gradient, an overflowing row (fp64 statistics) and a NaN row included."""
    monkeypatch.setenv("HIRES_LMM_CPU_NO_AVX512", no_avx512)
    g = torch.Generator().manual_seed(D)
    # chunks of 8 rows: 37 ends in a chunk of 5, 19 in one of 3, 23 in one of 7 (the vector rows
    # take 4 rows at a time and a chunk's last 1 .. 7 rows in one call)
    for rows in (37, 19, 23):
        x = (torch.randn(rows, D, generator=g) * 3 + 0.5).to(dtype)
        x[5] = 1e4 if dtype == torch.float16 else 3e19        # sum of squares overflows fp32
        x[9, D // 2] = float("nan")
        dy = torch.randn(rows, D, generator=g).to(dtype)
        dres = torch.randn(rows, D, generator=g).to(dtype)
        w = (torch.randn(D, generator=g) * 0.5 + 1).to(dtype)
        for di in (None, dres):
            monkeypatch.delenv("HIRES_LMM_CPU_TWIN", raising=False)
            fast = torch.ops.hires_lmm.norm_backward(dy, x, w, di, 1e-5, layer, True)
            monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "1")
            twin = torch.ops.hires_lmm.norm_backward(dy, x, w, di, 1e-5, layer, True)
            for a, b in zip(fast, twin):
                assert torch.equal(a.isnan(), b.isnan())
                assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
