"""Direct backwards of convnext_block and convnext_mlp (python/hires_lmm/ops/convnext.py,
_block_backward / _mlp_backward: no autograd re-run) against fp64 autograd of the references at
odd sizes, every dtype, with and without biases / layer scale; against transformers'
ConvNextLayer autograd; partial requires_grad, row chunks, empty input (default CPU path)."""
import pytest
import torch

from hires_lmm import ops, reference as ref

from conftest import DEVICES
from test_convnext_ops import block_args, make_params, make_x

pytestmark = pytest.mark.filterwarnings("ignore:Input #.*requires gradient and is not a double")

DT = [torch.float32, torch.bfloat16, torch.float16]
# floor of the relative error (max abs error / max abs gold) for each dtype: a few ulps
FLOOR = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
NAMES = ["x", "dw_weight", "dw_bias", "ln_weight", "ln_bias", "fc1_weight", "fc1_bias",
         "fc2_weight", "fc2_bias", "gamma"]


def _grads(fn, leaves, dy, want):
    """Gradients of <fn(*leaves), dy> for the leaves whose index is in `want` (others constant)."""
    ls = [None if t is None else t.detach().clone().requires_grad_(i in want)
          for i, t in enumerate(leaves)]
    fn(*ls).backward(dy.to(ls[0].dtype))
    return [None if t is None or i not in want else t.grad for i, t in enumerate(ls)]


def _check(got, lowp, gold, dtype, what, names=NAMES, factor=2.0, floor=None):
    """Each gradient: our error (vs the fp64 gold) within `factor` x the error of the other
    autograd run (`lowp`: the reference or eager, in the same dtype), plus a small floor (default
    FLOOR[dtype]); dtypes and shapes those of the input; no gradient where the gold has none."""
    floor = FLOOR[dtype] if floor is None else floor
    for name, a, b, g in zip(names, got, lowp, gold):
        if g is None:
            assert a is None, f"{what} d{name}: expected no gradient"
            continue
        assert a is not None and a.dtype == dtype and a.shape == g.shape, f"{what} d{name}"
        scale = g.abs().max().item() + 1e-12
        err = (a.double() - g).abs().max().item() / scale
        err_ref = (b.double() - g).abs().max().item() / scale
        assert err <= factor * err_ref + floor, \
            f"{what} d{name}: error {err:.3g} vs the other autograd {err_ref:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("shape", [(2, 5, 7, 24), (1, 9, 5, 40), (1, 3, 1, 13)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias,gamma", [(True, True), (False, False), (True, False)])
def test_block_grads_vs_fp64(device, dtype, shape, bias, gamma):
    C = shape[-1]
    p = make_params(C, 4 * C, dtype, device, bias=bias, gamma=gamma, seed=2)
    leaves = [make_x(shape, dtype, device, seed=3), *block_args(p)]
    dy = make_x(shape, dtype, device, seed=4)
    want = set(range(10))
    got = _grads(lambda *a: ops.convnext_block(*a, 1e-6), leaves, dy, want)
    lowp = _grads(lambda *a: ref.convnext_block(*a, 1e-6), leaves, dy, want)
    gold = _grads(lambda *a: ref.convnext_block(*a, 1e-6),
                  [None if t is None else t.double() for t in leaves], dy.double(), want)
    _check(got, lowp, gold, dtype, f"block {dtype} {shape}")


@pytest.mark.parametrize("want", [{0}, {5, 7}, {9}, {1, 3}, {6, 8}], ids=str)
def test_block_partial_requires_grad(want):
    """Only some inputs need a gradient: the others get none, and those asked for equal the
    gradients of a full backward (the skipped GEMMs / kernels do not feed them)."""
    p = make_params(24, 96, torch.float32, "cpu", seed=5)
    leaves = [make_x((1, 7, 5, 24), torch.float32, "cpu", seed=6), *block_args(p)]
    dy = make_x((1, 7, 5, 24), torch.float32, "cpu", seed=7)
    got = _grads(lambda *a: ops.convnext_block(*a, 1e-6), leaves, dy, want)
    full = _grads(lambda *a: ops.convnext_block(*a, 1e-6), leaves, dy, set(range(10)))
    for i in range(10):
        if i in want:
            torch.testing.assert_close(got[i], full[i], rtol=1e-6, atol=1e-6)
        else:
            assert got[i] is None


@pytest.mark.parametrize("gamma", [True, False])
def test_block_grads_vs_hf_layer(gamma):
    """transformers' ConvNextLayer (NCHW, eager autograd, fp32) and convnext_block give the same
    gradients for the input and every parameter, odd H, W and C."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.convnext.modeling_convnext import ConvNextLayer
    C, H, W = 20, 9, 7
    cfg = transformers.ConvNextConfig(hidden_act="gelu", layer_scale_init_value=1.0 if gamma else 0.0)
    layer = ConvNextLayer(cfg, C).train()
    p = make_params(C, 4 * C, torch.float32, "cpu", gamma=gamma, seed=8)
    mods = {"dw": layer.dwconv, "ln": layer.layernorm, "fc1": layer.pwconv1, "fc2": layer.pwconv2}
    with torch.no_grad():
        for k, m in mods.items():
            w = p[f"{k}_weight"]
            m.weight.copy_(w if k != "dw" else w.reshape(m.weight.shape))
            m.bias.copy_(p[f"{k}_bias"])
        if gamma:
            layer.layer_scale_parameter.copy_(p["gamma"])
    x = make_x((2, H, W, C), torch.float32, "cpu", seed=9)
    dy = make_x((2, H, W, C), torch.float32, "cpu", seed=10)
    xh = x.permute(0, 3, 1, 2).clone().requires_grad_(True)
    layer(xh).backward(dy.permute(0, 3, 1, 2))
    got = _grads(lambda *a: ops.convnext_block(*a, 1e-6), [x, *block_args(p)], dy, set(range(10)))
    hf = [xh.grad.permute(0, 2, 3, 1), layer.dwconv.weight.grad, layer.dwconv.bias.grad,
          layer.layernorm.weight.grad, layer.layernorm.bias.grad, layer.pwconv1.weight.grad,
          layer.pwconv1.bias.grad, layer.pwconv2.weight.grad, layer.pwconv2.bias.grad,
          layer.layer_scale_parameter.grad if gamma else None]
    for name, a, b in zip(NAMES, got, hf):
        if b is None:
            assert a is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=name)


def test_block_empty_batch():
    p = make_params(16, 64, torch.float32, "cpu")
    x = torch.zeros((0, 5, 3, 16), requires_grad=True)
    ps = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    ops.convnext_block(x, *block_args(ps), 1e-6).sum().backward()
    assert x.grad.shape == x.shape
    assert all(v.grad is not None and not v.grad.any() for v in ps.values())


# ---- convnext_mlp ------------------------------------------------------------------------------
def _mlp_leaves(lead, C, Fh, dtype, bias, gamma, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dtype)

    return [r(*lead, C), r(Fh, C, scale=C ** -0.5), r(Fh, scale=0.2) if bias else None,
            r(C, Fh, scale=Fh ** -0.5), r(C, scale=0.2) if bias else None,
            r(C, scale=0.5) if gamma else None, r(*lead, C)]


MLP_NAMES = ["x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "gamma", "residual"]


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("lead,C,Fh", [((2, 3, 5), 24, 96), ((7,), 13, 40), ((1, 4, 3), 40, 160)],
                         ids=str)
@pytest.mark.parametrize("bias,gamma", [(True, True), (False, False), (False, True)])
def test_mlp_grads_vs_fp64(dtype, lead, C, Fh, bias, gamma):
    leaves = _mlp_leaves(lead, C, Fh, dtype, bias, gamma)
    dy = _mlp_leaves(lead, C, Fh, dtype, False, False, seed=1)[0]
    want = set(range(7))
    got = _grads(ops.convnext_mlp, leaves, dy, want)
    lowp = _grads(ref.convnext_mlp, leaves, dy, want)
    # gold: fp64 autograd of the reference's formula, the GELU output rounded where its forward
    # rounds it (fp16/bf16; the rounding's derivative taken as 1, as the reference's autograd)
    gold = _grads(lambda *a: _ref_mlp_rounded(dtype, *a),
                  [None if t is None else t.double() for t in leaves], dy.double(), want)
    _check(got, lowp, gold, dtype, f"mlp {dtype}", names=MLP_NAMES)


def _ref_mlp_rounded(dtype, x, w1, b1, w2, b2, gamma, res):
    F = torch.nn.functional
    h = F.gelu(F.linear(x, w1, b1))
    if dtype != torch.float32:
        h = h + (h.to(dtype).double() - h).detach()     # forward rounded, derivative 1
    h = F.linear(h, w2, b2)
    return res + (h if gamma is None else gamma * h)


@pytest.mark.parametrize("want", [{0}, {1, 3}, {5}, {6}, {2, 4}], ids=str)
def test_mlp_partial_requires_grad(want):
    leaves = _mlp_leaves((3, 5), 24, 96, torch.float32, True, True, seed=2)
    dy = _mlp_leaves((3, 5), 24, 96, torch.float32, False, False, seed=3)[0]
    got = _grads(ops.convnext_mlp, leaves, dy, want)
    full = _grads(ops.convnext_mlp, leaves, dy, set(range(7)))
    for i in range(7):
        if i in want:
            torch.testing.assert_close(got[i], full[i], rtol=1e-6, atol=1e-6)
        else:
            assert got[i] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_chunks(dtype):
    """The MLP backward's row chunks (one chunk at small M) accumulate to the same gradients (bf16:
    each chunk's GEMM output rounded, then summed in fp32): the backward ops called with 4 rows per
    chunk (the last one partial) against one chunk."""
    leaves = _mlp_leaves((5, 7), 16, 64, dtype, True, True, seed=4)[:6]
    dy = _mlp_leaves((5, 7), 16, 64, dtype, False, False, seed=5)[0]
    p = make_params(16, 64, dtype, "cpu", seed=6)
    bl = [make_x((1, 5, 7, 16), dtype, "cpu", seed=7), *block_args(p)]
    mlp = torch.ops.hires_lmm.convnext_mlp_backward
    blk = torch.ops.hires_lmm.convnext_block_backward
    one = [*mlp(dy, *leaves, [True] * 6, 1 << 22), *blk(dy.reshape(1, 5, 7, 16), *bl, 1e-6, [True] * 10, 1 << 22)]
    many = [*mlp(dy, *leaves, [True] * 6, 4 * 64), *blk(dy.reshape(1, 5, 7, 16), *bl, 1e-6, [True] * 10, 4 * 64)]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert len(one) == len(many) == 16
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


# ---- fp16 / bf16: eager autograd's roundings -----------------------------------------------------
def _eager_block(x, dww, dwb, lnw, lnb, w1, b1, w2, b2, g, eps):
    """HF ConvNextLayer's computation in x's dtype (eager autograd: every op rounds)."""
    F = torch.nn.functional
    C = x.shape[-1]
    y = F.conv2d(x.permute(0, 3, 1, 2), dww, dwb, padding=3, groups=C).permute(0, 2, 3, 1)
    h = F.linear(F.gelu(F.linear(F.layer_norm(y, (C,), lnw, lnb, eps), w1, b1)), w2, b2)
    return x + (h if g is None else g * h)


def _eager_mlp(x, w1, b1, w2, b2, g, res):
    F = torch.nn.functional
    h = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    return res + (h if g is None else g * h)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("what", ["block", "mlp"])
@pytest.mark.parametrize("bias,gamma", [(True, True), (False, False)])
def test_lowp_grads_vs_eager(dtype, what, bias, gamma):
    """fp16 / bf16 gradients (GEMMs in the input dtype, _mlp_backward): each within 3x the error
    of eager autograd in the same dtype (HF's formulation) against the fp64 gold, plus a small
    floor; fp32 GEMMs measured 0.4-1.1x, these 1.0-2.2x, a wrong formula orders of magnitude."""
    floor = FLOOR[dtype] / 8
    if what == "block":
        C = 48
        p = make_params(C, 4 * C, dtype, "cpu", bias=bias, gamma=gamma, seed=11)
        leaves = [make_x((1, 11, 9, C), dtype, "cpu", seed=12), *block_args(p)]
        dy = make_x((1, 11, 9, C), dtype, "cpu", seed=13)
        fn, eager, names, n = (lambda *a: ops.convnext_block(*a, 1e-6),
                               lambda *a: _eager_block(*a, 1e-6), NAMES, 10)
        gold_fn = lambda *a: ref.convnext_block(*a, 1e-6)    # noqa: E731
    else:
        leaves = _mlp_leaves((3, 37), 40, 160, dtype, bias, gamma, seed=14)
        dy = _mlp_leaves((3, 37), 40, 160, dtype, False, False, seed=15)[0]
        fn, eager, names, n = ops.convnext_mlp, _eager_mlp, MLP_NAMES, 7
        gold_fn = lambda *a: _ref_mlp_rounded(dtype, *a)    # noqa: E731
    want = set(range(n))
    got = _grads(fn, leaves, dy, want)
    eag = _grads(eager, leaves, dy, want)
    gold = _grads(gold_fn, [None if t is None else t.double() for t in leaves], dy.double(), want)
    _check(got, eag, gold, dtype, f"{what} {dtype} vs eager", names=names, factor=3.0, floor=floor)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_ops_opcheck(device):
    """The backward ops (csrc/convnext_bwd.cpp): schema and fake kernels (opcheck), None where a
    gradient is not asked for, and what they return equals autograd's gradients."""
    p = make_params(16, 64, torch.float32, device, bias=True, gamma=True, seed=21)
    x = make_x((1, 5, 3, 16), torch.float32, device, seed=22)
    dy = make_x((1, 5, 3, 16), torch.float32, device, seed=23)
    bargs = (dy, x, *block_args(p), 1e-6, [True, False, True, True, False, True, False, True, True, False], 1 << 22)
    margs = (dy, x, p["fc1_weight"], p["fc1_bias"], p["fc2_weight"], None, p["gamma"],
             [False, True, True, True, False, True], 1 << 22)
    dargs = (dy, x, p["dw_weight"], p["dw_bias"], p["ln_weight"], None, 1e-6, [True, True, False, True, False])
    for op, args in ((torch.ops.hires_lmm.convnext_block_backward, bargs),
                     (torch.ops.hires_lmm.convnext_mlp_backward, margs),
                     (torch.ops.hires_lmm.dwconv_layernorm_backward, dargs)):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
        got = op(*args)
        need = args[-2] if op is not torch.ops.hires_lmm.dwconv_layernorm_backward else args[-1]
        assert len(got) == len(need)
        assert [g is not None for g in got] == [bool(n) and t is not None for n, t in
                                                zip(need, args[1:1 + len(need)])]
    leaves = [x, *block_args(p)]
    want = {i for i, n in enumerate(bargs[-2]) if n}
    auto = _grads(lambda *a: ops.convnext_block(*a, 1e-6), leaves, dy, want)
    for a, b in zip(torch.ops.hires_lmm.convnext_block_backward(*bargs), auto):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DT)
def test_fused_gelu_pass(dtype):
    """The MLP backward's GELU value + derivative (torch.ops.hires_lmm._gelu_fwd_bwd: fp32 CPU the
    fused pass of csrc/cpu/gelu.cpp, fp16 / bf16 ATen's): against an fp64 erfc gold, at least as
    accurate as ATen's gelu / gelu_backward in the same dtype (plus a few fp32 ulps: the erfc
    polynomial's 1.5e-7), NaN in -> NaN out, odd lengths (vector tail), no gradient input."""
    g = torch.Generator().manual_seed(3)
    u = torch.cat([torch.randn(1001, generator=g) * 3, torch.linspace(-12, 12, 97),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, float("nan")])]).to(dtype)
    dh = torch.randn(u.shape, generator=g).to(dtype)
    gu, du = torch.ops.hires_lmm._gelu_fwd_bwd(u, dh)
    gu_only, none = torch.ops.hires_lmm._gelu_fwd_bwd(u, None)
    assert none is None and torch.equal(gu_only.nan_to_num(), gu.nan_to_num())
    assert gu.dtype == du.dtype == dtype and gu.shape == u.shape
    assert gu[-1].isnan() and du[-1].isnan() and not gu[:-1].isnan().any() and not du[:-1].isnan().any()
    u64, dh64 = u[:-1].double(), dh[:-1].double()
    cdf = 0.5 * torch.special.erfc(-u64 / 2 ** 0.5)      # no 1 + erf cancellation for u << 0
    gold_g = u64 * cdf
    gold_d = dh64 * (cdf + u64 * torch.exp(-0.5 * u64 * u64) / (2 * torch.pi) ** 0.5)
    aten_g = torch.nn.functional.gelu(u[:-1])
    aten_d = torch.ops.aten.gelu_backward(dh[:-1], u[:-1])
    floor = {torch.float32: 2e-7, torch.bfloat16: 0.0, torch.float16: 0.0}[dtype]
    for ours, aten, gold in ((gu[:-1], aten_g, gold_g), (du[:-1], aten_d, gold_d)):
        err = (ours.double() - gold).abs()
        err_aten = (aten.double() - gold).abs()
        tol = err_aten + floor * (1 + gold.abs()) + gold.abs() * torch.finfo(dtype).eps
        assert (err <= tol).all(), (err - tol).max().item()
