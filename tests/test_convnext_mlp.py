"""convnext_mlp (the fused ConvNeXt MLP, kernels/convnext/fused_mlp.cuh): the op against
hires_lmm.reference and HF ConvNextLayer's MLP on the CPU twin (HIRES_LMM_CPU_TWIN=1) and the
default CPU path, every dtype, every width the CUDA kernel takes plus widths it does not, odd M
(not a multiple of the block's BM rows), bad input; a lane-level numpy emulation of the kernel's
fragment plumbing (ldmatrix / mma.m16n8k16 / the hidden through shared memory / the fp32 staging
of the output) and its cp.async ring; GPU tests of the CUDA kernel (skip without a GPU)."""
import numpy as np
import pytest
import torch

from hires_lmm import ops, reference as ref

from conftest import DEVICES, DTYPES, HAS_CUDA, NO_CUDA_REASON, tol

KERNEL_WIDTHS = [96, 128, 192, 256, 384]  # kFusedMlpWidths (kernels/convnext/fused_mlp.h)


def bm_of(C):  # fused_mlp_bm
    return 128 if C <= 192 else 64


def bh_of(C):  # fused_mlp_bh
    return 64 if C <= 256 else 32


def make(M, C, Fh, dtype, device="cpu", bias=True, gamma=True, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype=dtype, device=device)

    shape = (M, C) if lead is None else (*lead, C)
    x = r(*shape)
    args = (r(Fh, C, scale=C ** -0.5), r(Fh, scale=0.2) if bias else None,
            r(C, Fh, scale=Fh ** -0.5), r(C, scale=0.2) if bias else None,
            r(C, scale=0.5) if gamma else None, r(*shape))
    return x, args


def assert_close(got, want, dtype):
    atol, rtol = tol(dtype)
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


@pytest.fixture(params=["twin", "default", "fp32-fallback"])
def cpu_path(request, monkeypatch):
    """twin: HIRES_LMM_CPU_TWIN=1; default: the oneDNN path (GEMMs in x's dtype) where this torch
    has it; fp32-fallback: HIRES_LMM_CPU_ONEDNN_MLP=0, the fp32 ATen path the default falls back to."""
    monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "1" if request.param == "twin" else "0")
    monkeypatch.setenv("HIRES_LMM_CPU_ONEDNN_MLP", "0" if request.param == "fp32-fallback" else "1")
    return request.param


# ---- the op on CPU: twin and default path -----------------------------------------------------
# M: odd, not a multiple of BM (128 or 64), one more than BM, and a single row.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", KERNEL_WIDTHS)
def test_kernel_widths(cpu_path, dtype, C):
    M = bm_of(C) + 3 if C <= 128 else 37
    x, args = make(M, C, 4 * C, dtype)
    got = ops.convnext_mlp(x, *args)
    want = ref.convnext_mlp(x, *args)
    assert got.shape == x.shape and got.dtype == dtype and got.is_contiguous()
    assert_close(got, want, dtype)


# Widths / hidden sizes the CUDA kernel does not take (C not in the list; F % BH != 0: the twin's
# partial last chunk), no bias / no gamma, leading dims (NHWC), M = 1.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,C,Fh,bias,gamma,lead", [
    (1, 96, 384, True, True, None),
    (131, 80, 320, True, True, None),       # C not a kernel width (ConvNeXt-nano stage 1)
    (70, 24, 100, False, True, None),       # F % BH != 0
    (0, 96, 384, True, True, (2, 0, 3)),    # empty
    (None, 96, 384, False, False, (2, 5, 7)),
])
def test_other_shapes(cpu_path, dtype, M, C, Fh, bias, gamma, lead):
    x, args = make(M, C, Fh, dtype, bias=bias, gamma=gamma, lead=lead)
    got = ops.convnext_mlp(x, *args)
    want = ref.convnext_mlp(x, *args)
    assert got.shape == x.shape and got.dtype == dtype
    assert_close(got, want, dtype)


def test_non_contiguous(cpu_path):
    x, args = make(None, 96, 384, torch.bfloat16, lead=(2, 6, 5))
    xt = x.transpose(1, 2)  # (2, 5, 6, 96), a view
    args = args[:5] + (args[5].transpose(1, 2),)
    got = ops.convnext_mlp(xt, *args)
    assert_close(got, ref.convnext_mlp(xt, *args), torch.bfloat16)


def test_twin_rounds_the_hidden_once(monkeypatch):
    """The twin and the default path round the hidden to bf16 as the reference does: with a
    hidden value whose rounding matters (1 + 2^-9 is not a bf16), an fp32 hidden would differ."""
    C, Fh = 96, 384
    x = torch.zeros(3, C, dtype=torch.bfloat16)
    w1 = torch.zeros(Fh, C, dtype=torch.bfloat16)
    b1 = torch.zeros(Fh, dtype=torch.bfloat16)
    w2 = torch.zeros(C, Fh, dtype=torch.bfloat16)
    x[:, 0] = 1.0
    w1[0, 0] = 8.0
    b1[0] = 2 ** -6         # S = 8 + 2^-6 -> GELU = 8.015625 (exact in fp32) -> bf16 8.0
    w2[:, 0] = 1.0
    res = torch.zeros(3, C, dtype=torch.bfloat16)
    for twin in ("1", "0"):
        monkeypatch.setenv("HIRES_LMM_CPU_TWIN", twin)
        got = ops.convnext_mlp(x, w1, b1, w2, None, None, res)
        assert torch.equal(got, torch.full((3, C), 8.0, dtype=torch.bfloat16)), twin


def test_against_hf_convnext_mlp(cpu_path):
    """HF ConvNextLayer's pwconv1 -> GELU -> pwconv2 -> layer scale (fp32) on an LN output, plus
    the residual: our op in fp32 (tight) and bf16 (bf16 tolerance)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.convnext.modeling_convnext import ConvNextLayer
    C = 192
    torch.manual_seed(0)
    layer = ConvNextLayer(transformers.ConvNextConfig(hidden_act="gelu", layer_scale_init_value=0.5), C).eval()
    with torch.no_grad():
        layer.layer_scale_parameter.uniform_(0.2, 1.0)
        layer.pwconv1.bias.normal_(0, 0.2)
        layer.pwconv2.bias.normal_(0, 0.2)
    x = torch.randn(2, 5, 13, C)  # NHWC, 130 pixels (> BM = 128)
    res = torch.randn(2, 5, 13, C)
    with torch.no_grad():
        want = res + layer.layer_scale_parameter * layer.pwconv2(layer.act(layer.pwconv1(x)))
    for dtype in (torch.float32, torch.bfloat16):
        args = [t.detach().to(dtype) for t in (layer.pwconv1.weight, layer.pwconv1.bias,
                                                 layer.pwconv2.weight, layer.pwconv2.bias,
                                                 layer.layer_scale_parameter)]
        got = ops.convnext_mlp(x.to(dtype), *args, res.to(dtype))
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        else:  # bf16 inputs, the hidden and the output rounded: compare with bf16 tolerance x 2
            atol, rtol = tol(dtype)
            torch.testing.assert_close(got.float(), want, atol=2 * atol, rtol=2 * rtol)


def test_block_uses_the_fused_twin(monkeypatch):
    """convnext_block's CPU twin runs the fused MLP twin at kernel widths (as CUDA dispatches)."""
    monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "1")
    from test_convnext_ops import block_args, make_params, make_x
    for C in (96, 256):
        p = make_params(C, 4 * C, torch.bfloat16, "cpu")
        x = make_x((1, 9, 15, C), torch.bfloat16, "cpu")  # 135 px: > 128, partial last block
        got = ops.convnext_block(x, *block_args(p), 1e-6)
        want = ref.convnext_block(x, *block_args(p), 1e-6)
        atol, rtol = tol(torch.bfloat16)
        torch.testing.assert_close(got.float(), want.float(), atol=2 * atol, rtol=2 * rtol)


def test_non_finite_stays_in_its_row(cpu_path):
    """README "Non-finite values": a NaN in x row 3 or an inf in residual[7, 5] reaches only the
    outputs whose formula reads it (rows are independent; the kernel's zero-filled rows too)."""
    x, args = make(2 * bm_of(96) + 5, 96, 384, torch.bfloat16)
    x[3, 10] = float("nan")
    res = args[5].clone()
    res[7, 5] = float("inf")
    got = ops.convnext_mlp(x, *args[:5], res)
    bad = ~torch.isfinite(got)
    assert bad[3].all() and bad[7, 5] and bad.sum() == 96 + 1


# ---- the default CPU path: oneDNN GEMMs in x's dtype (csrc/cpu/fused_mlp.h) -------------------
def _onednn_available():
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


needs_onednn = pytest.mark.skipif(not _onednn_available(),
                                  reason="this torch has no oneDNN mkldnn::_linear_pointwise")


def onednn_sequence(x, w1, b1, w2, b2, gamma, res):
    """The default path's documented sequence, in Python, on row chunks whose hidden is 16 MB:
    fc1+bias+GELU (one rounding), then with gamma: fc2+bias rounded, res + gamma * p rounded
    once; without: fc2+bias+res rounded once."""
    lp = torch.ops.mkldnn._linear_pointwise
    C = x.shape[-1]
    x2, r2 = x.reshape(-1, C).contiguous(), res.reshape(-1, C).contiguous()
    rows = max(1, (16 << 20) // (w1.shape[0] * x.element_size()))
    outs = []
    for i in range(0, x2.shape[0], rows):
        h = lp(x2[i:i + rows], w1, b1, "gelu", [], "none")
        if gamma is None:
            outs.append(lp.binary(h, r2[i:i + rows], w2, b2, "add"))
        else:
            outs.append(torch.addcmul(r2[i:i + rows], gamma, lp(h, w2, b2, "none", [], "none")))
    return torch.cat(outs).reshape(x.shape)


@needs_onednn
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [True, False])
def test_default_path_is_the_onednn_sequence(monkeypatch, dtype, gamma):
    """The default CPU path runs the oneDNN sequence (bitwise), the switch turns it off (the fp32
    path: bf16 results differ from it, and match the reference)."""
    monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "0")
    monkeypatch.setenv("HIRES_LMM_CPU_ONEDNN_MLP", "1")
    # fp32 takes oneDNN above M*C*F = 2^24 (below it ATen's fp32 path, cheaper per call)
    x, args = make(None, 96, 384, dtype, gamma=gamma,
                   lead=(4, 7, 19) if dtype == torch.float32 else (2, 7, 19))
    xt = x.transpose(1, 2)  # a non-contiguous view: the op copies it first
    args = args[:5] + (args[5].transpose(1, 2),)
    got = ops.convnext_mlp(xt, *args)
    want = onednn_sequence(xt, *args)
    assert torch.equal(got, want)
    assert_close(got, ref.convnext_mlp(xt, *args), dtype)
    monkeypatch.setenv("HIRES_LMM_CPU_ONEDNN_MLP", "0")
    off = ops.convnext_mlp(xt, *args)
    assert_close(off, ref.convnext_mlp(xt, *args), dtype)
    if dtype == torch.bfloat16 and gamma:  # the extra rounding of the fc2 product shows
        assert not torch.equal(off, got)


@needs_onednn
@pytest.mark.parametrize("gamma", [True, False])
def test_onednn_row_chunks(monkeypatch, gamma):
    """M over the 16 MB hidden chunk (F = 8192 bf16: 1024 rows; M = 2500: 1024 + 1024 + 452)."""
    monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "0")
    monkeypatch.setenv("HIRES_LMM_CPU_ONEDNN_MLP", "1")
    x, args = make(2500, 8, 8192, torch.bfloat16, gamma=gamma, seed=5)
    got = ops.convnext_mlp(x, *args)
    assert torch.equal(got, onednn_sequence(x, *args))
    assert_close(got, ref.convnext_mlp(x, *args), torch.bfloat16)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_onednn_error_vs_fp64_no_worse_than_eager(monkeypatch, dtype):
    """The default path's one extra rounding (the fc2 product, when gamma is given) against the
    fp64 formula: no worse than eager PyTorch's Linear -> GELU -> Linear -> * gamma -> + res in
    the same dtype (max and mean error), within the op's tolerance, and the exact-rounding paths
    (fp32 fallback, twin) stay at least as accurate."""
    monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "0")
    monkeypatch.setenv("HIRES_LMM_CPU_ONEDNN_MLP", "1")
    C = 192
    x, (w1, b1, w2, b2, g, res) = make(512, C, 4 * C, dtype, seed=3)
    h = torch.nn.functional.gelu(torch.nn.functional.linear(x.double(), w1.double(), b1.double()))
    want = res.double() + g.double() * torch.nn.functional.linear(h.to(dtype).double(), w2.double(),
                                                                  b2.double())
    got = ops.convnext_mlp(x, w1, b1, w2, b2, g, res)
    eager = res + g * torch.nn.functional.linear(
        torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, b1)), w2, b2)
    monkeypatch.setenv("HIRES_LMM_CPU_ONEDNN_MLP", "0")
    exact = ops.convnext_mlp(x, w1, b1, w2, b2, g, res)
    err = {k: (v.double() - want).abs() for k, v in (("ours", got), ("eager", eager), ("exact", exact))}
    assert err["ours"].max() <= err["eager"].max() and err["ours"].mean() < err["eager"].mean()
    assert err["exact"].max() <= err["ours"].max() and err["exact"].mean() < err["ours"].mean()
    atol, rtol = tol(dtype)
    assert (err["ours"] / (atol + rtol * want.abs())).max() < 0.75  # margin inside the tolerance


@needs_onednn
def test_onednn_fp16_overflow_of_the_product_falls_back(monkeypatch):
    """fp16: the fc2 product overflows fp16 (|h W2^T| ~ 1e5 > 65504) but gamma = 2^-4 brings the
    result back in range: the formula's output is finite, so the default path must not return the
    oneDNN sequence's inf (its non-finite output sends the call to the fp32 path)."""
    monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "0")
    monkeypatch.setenv("HIRES_LMM_CPU_ONEDNN_MLP", "1")
    C, Fh, dt = 16, 64, torch.float16
    x = torch.ones(5, C, dtype=dt)
    w1 = torch.full((Fh, C), 2.0, dtype=dt)          # hidden = GELU(32) = 32
    w2 = torch.full((C, Fh), 64.0, dtype=dt)         # product = 64 * 64 * 32 = 131072 > 65504
    g = torch.full((C,), 2.0 ** -4, dtype=dt)
    res = torch.zeros(5, C, dtype=dt)
    assert not torch.isfinite(onednn_sequence(x, w1, None, w2, None, g, res)).all()
    got = ops.convnext_mlp(x, w1, None, w2, None, g, res)
    assert torch.equal(got, torch.full((5, C), 8192.0, dtype=dt))


@needs_onednn
@pytest.mark.parametrize("C", [96, 768])
def test_block_default_path_is_the_onednn_sequence(monkeypatch, C):
    """convnext_block's default CPU path: dwconv_layernorm, then the same oneDNN MLP sequence
    (any width); HIRES_LMM_CPU_ONEDNN_MLP=0 gives the fp32 path, both close to the reference."""
    monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "0")
    monkeypatch.setenv("HIRES_LMM_CPU_ONEDNN_MLP", "1")
    from test_convnext_ops import block_args, make_params, make_x
    p = make_params(C, 4 * C, torch.bfloat16, "cpu")
    x = make_x((1, 5, 7, C), torch.bfloat16, "cpu")
    a = block_args(p)
    got = ops.convnext_block(x, *a, 1e-6)
    h = ops.dwconv_layernorm(x, *a[:4], 1e-6)
    assert torch.equal(got, onednn_sequence(h, *a[4:], x))
    want = ref.convnext_block(x, *a, 1e-6)
    atol, rtol = tol(torch.bfloat16)
    torch.testing.assert_close(got.float(), want.float(), atol=2 * atol, rtol=2 * rtol)
    monkeypatch.setenv("HIRES_LMM_CPU_ONEDNN_MLP", "0")
    off = ops.convnext_block(x, *a, 1e-6)
    torch.testing.assert_close(off.float(), want.float(), atol=2 * atol, rtol=2 * rtol)


# ---- bad input ----------------------------------------------------------------------------------
def test_bad_input():
    x, (w1, b1, w2, b2, g, res) = make(5, 32, 128, torch.float32)
    good = [x, w1, b1, w2, b2, g, res]
    names = ["x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "gamma", "residual"]
    bad = {
        "x": [x.to(torch.int32), torch.tensor(1.0)],
        "fc1_weight": [w1[:, :16], w1.double(), w1[None]],
        "fc1_bias": [b1[:64], b1.half()],
        "fc2_weight": [w2[:, :64], w2.t().contiguous(), w2.bfloat16()],
        "fc2_bias": [b2[:8]],
        "gamma": [g[:8], g.half()],
        "residual": [res[:4], res.half(), res[None]],
    }
    for name, values in bad.items():
        for v in values:
            args = list(good)
            args[names.index(name)] = v
            with pytest.raises(RuntimeError, match=f"convnext_mlp: argument '{name}'"):
                ops.convnext_mlp(*args)
    with pytest.raises(RuntimeError, match="argument 'residual'.*device"):
        ops.convnext_mlp(x, w1, b1, w2, b2, g, res.to("meta"))


def test_meta_and_opcheck():
    x, args = make(None, 32, 128, torch.float32, lead=(2, 3, 5))
    meta = [None if a is None else a.to("meta") for a in (x, *args)]
    out = ops.convnext_mlp(*meta)
    assert out.shape == x.shape and out.device.type == "meta"
    torch.library.opcheck(torch.ops.hires_lmm.convnext_mlp.default, (x, *args))


def test_autograd():
    x, args = make(7, 16, 64, torch.float32)
    leaves = [x.requires_grad_()] + [a.requires_grad_() for a in args]
    ops.convnext_mlp(*leaves).square().sum().backward()
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    ref.convnext_mlp(*leaves).square().sum().backward()
    for a, b in zip(got, leaves):
        torch.testing.assert_close(a, b.grad, atol=1e-5, rtol=1e-5)


# ---- lane-level emulation of the kernel (no GPU needed) ----------------------------------------
class Tile:
    """Python mirror of FusedMlpTile<C> (kernels/convnext/fused_mlp.cuh); keep in sync."""

    def __init__(self, C):
        self.C, self.BM, self.BH = C, bm_of(C), bh_of(C)
        self.warps, self.threads, self.S = 8, 256, 3
        self.WM1, self.WN1 = 4, 2
        self.MT1, self.NP1 = self.BM // self.WM1 // 16, self.BH // self.WN1 // 16
        self.WM2 = self.BM // 32
        self.WN2 = self.warps // self.WM2
        self.MT2, self.NP2 = 2, C // self.WN2 // 16
        self.LdX, self.LdH, self.LdO = C + 8, self.BH + 8, C + 8
        self.XE = self.BM * self.LdX
        self.SLOT = max(self.BH * self.LdX, C * self.LdH)
        self.HE = self.BM * self.LdH
        self.smem = 2 * (self.XE + self.S * self.SLOT + self.HE)


def test_mirror_matches_the_kernel_source():
    """The Python mirror (Tile, bm_of, bh_of, the lane formulas of emulate_block) states the
    kernel's constants; fail when the kernel source changes them without this file."""
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1] / "kernels" / "convnext"
    h = (root / "fused_mlp.h").read_text()
    cuh = " ".join((root / "fused_mlp.cuh").read_text().split())
    assert "return C <= 192 ? 128 : 64;" in h and "return C <= 256 ? 64 : 32;" in h
    assert "kFusedMlpWidths[] = {96, 128, 192, 256, 384};" in h
    for text in ("kWarps = 8;", "kStages = 3;", "kWM1 = 4, kWN1 = 2;", "kMT2 = 2;",
                 "kWM2 = kBM / 32, kWN2 = kWarps / kWM2;", "kLdX = kC + 8;", "kLdH = kBH + 8;",
                 "kLdO = kC + 8;", "const int a_row = lane % 16, a_col = (lane / 16) * 8;",
                 "const int b_row = lane % 8 + ((lane / 8) >> 1) * 8, b_col = ((lane / 8) & 1) * 8;",
                 "const int r1 = (warp / Tile::kWN1) * (Tile::kMT1 * 16);",
                 "const int c1 = (warp % Tile::kWN1) * (Tile::kNP1 * 16);",
                 "const int r2 = (warp / Tile::kWN2) * (Tile::kMT2 * 16);",
                 "const int c2 = (warp % Tile::kWN2) * (Tile::kNP2 * 16);",
                 "sH + (r1 + mt * 16 + g + 8 * hf) * LdH + c1 + nt * 8 + 2 * t4",
                 "sO + (r2 + mt * 16 + g + 8 * hf) * LdO + n",
                 "cp_async_wait<S - 2>();"):
        assert text in cuh, text


# The table of the header comment ("Sizing"): smem bytes per block.
HEADER_SMEM = {96: 86528, 128: 108544, 192: 152576, 256: 153600, 384: 147456}


@pytest.mark.parametrize("C", KERNEL_WIDTHS)
def test_tile_budget(C):
    t = Tile(C)
    assert t.smem == HEADER_SMEM[C] and t.smem <= 166912
    assert t.BM * t.LdO * 4 <= t.smem                      # fp32 staging fits
    assert t.MT2 * 2 * t.NP2 * 4 == t.BM * C // 256 <= 96    # accumulator registers per thread
    assert t.BM == t.WM1 * t.MT1 * 16 and t.BH == t.WN1 * t.NP1 * 16
    assert t.BM == t.WM2 * 32 and C == t.WN2 * t.NP2 * 16
    for n in (t.BM * C // 8, t.BH * C // 8):
        assert n % t.threads == 0


LANE = np.arange(32)
G, T4 = LANE // 4, LANE % 4


def ldsm_x4(sm, addrs):
    """ldmatrix.m8n8.x4.b16: matrix i from the rows at the addresses of lanes 8i..8i+7; lane L
    receives row L/4, columns 2(L%4), 2(L%4)+1 of each matrix -> (32, 4, 2)."""
    addrs = np.asarray(addrs)
    assert (addrs % 8 == 0).all()  # 16-byte aligned rows (element offsets of 16-bit T)
    rows = sm[addrs[:, None] + np.arange(8)]  # (32, 8)
    out = np.empty((32, 4, 2))
    for i in range(4):
        m = rows[8 * i:8 * i + 8]
        out[:, i, 0] = m[G, 2 * T4]
        out[:, i, 1] = m[G, 2 * T4 + 1]
    return out


def ldsm_conflicts(addrs):
    """Bank conflicts of the 4 phases (one 8x8 matrix each): 8 rows of 16 B must hit 8 distinct
    16-byte bank groups (2-byte elements: byte address 2 * addr)."""
    addrs = np.asarray(addrs)
    return sum(len({(2 * a // 16) % 8 for a in addrs[8 * i:8 * i + 8]}) != 8 for i in range(4))


def mma(d, a, b0, b1):
    """mma.m16n8k16 row.col: d (32, 4) += A (16x16 from a (32,4,2)) . B (16x8 from b0, b1 (32,2))."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for j in range(2):
        A[G, 2 * T4 + j] = a[:, 0, j]
        A[G + 8, 2 * T4 + j] = a[:, 1, j]
        A[G, 2 * T4 + 8 + j] = a[:, 2, j]
        A[G + 8, 2 * T4 + 8 + j] = a[:, 3, j]
        B[2 * T4 + j, G] = b0[:, j]
        B[2 * T4 + 8 + j, G] = b1[:, j]
    D = A @ B
    d[:, 0] += D[G, 2 * T4]
    d[:, 1] += D[G, 2 * T4 + 1]
    d[:, 2] += D[G + 8, 2 * T4]
    d[:, 3] += D[G + 8, 2 * T4 + 1]


def gelu(v):
    from math import erf
    return 0.5 * v * (1 + np.vectorize(erf)(v / np.sqrt(2)))


def emulate_block(C, Fh, M, x, w1, b1, w2, b2, gamma, res):
    """One block (blockIdx 0) of fused_mlp_kernel, lane by lane, with the kernel's formulas.
    T = fp16 (the rounding of H is np.float16). Returns out (M, C) and the conflict count."""
    t = Tile(C)
    BM, BH, S, LdX, LdH, LdO = t.BM, t.BH, t.S, t.LdX, t.LdH, t.LdO
    sm = np.full(t.XE + S * t.SLOT + t.HE, np.nan)  # NaN: a read of anything not written shows
    sX, sW, sH = 0, t.XE, t.XE + S * t.SLOT
    conflicts = 0
    # load_x: 16-byte chunks, rows past M zero-filled
    for i in range(BM * C // 8):
        r, c = i // (C // 8), (i % (C // 8)) * 8
        sm[sX + r * LdX + c: sX + r * LdX + c + 8] = x[r, c:c + 8] if r < M else 0.0

    def load_tile(tt):
        dst = sW + (tt % S) * t.SLOT
        sm[dst:dst + t.SLOT] = np.nan
        h0 = (tt // 2) * BH
        if tt % 2 == 0:
            for i in range(BH * C // 8):
                r, c = i // (C // 8), (i % (C // 8)) * 8
                sm[dst + r * LdX + c: dst + r * LdX + c + 8] = w1[h0 + r, c:c + 8]
        else:
            for i in range(C * BH // 8):
                r, c = i // (BH // 8), (i % (BH // 8)) * 8
                sm[dst + r * LdH + c: dst + r * LdH + c + 8] = w2[r, h0 + c:h0 + c + 8]

    ntiles = Fh // BH * 2
    for s in range(S - 1):
        if s < ntiles:
            load_tile(s)
    a_row, a_col = LANE % 16, (LANE // 16) * 8
    b_row, b_col = LANE % 8 + ((LANE // 8) >> 1) * 8, ((LANE // 8) & 1) * 8
    acc = np.zeros((t.warps, t.MT2, 2 * t.NP2, 32, 4))
    for tt in range(0, ntiles, 2):
        # begin_tile(tt): the prefetch goes to the slot of tile tt-1, never the one read now
        assert (tt + S - 1) % S != tt % S
        if tt + S - 1 < ntiles:
            load_tile(tt + S - 1)
        h0 = (tt // 2) * BH
        sm[sH:sH + t.HE] = np.nan
        sW1 = sW + (tt % S) * t.SLOT
        written = np.zeros((BM, BH), int)
        for warp in range(t.warps):
            r1 = (warp // t.WN1) * (t.MT1 * 16)
            c1 = (warp % t.WN1) * (t.NP1 * 16)
            s = np.zeros((t.MT1, 2 * t.NP1, 32, 4))
            for kk in range(0, C, 16):
                a = []
                for mt in range(t.MT1):
                    ad = sX + (r1 + mt * 16 + a_row) * LdX + kk + a_col
                    conflicts += ldsm_conflicts(ad)
                    a.append(ldsm_x4(sm, ad))
                for np_ in range(t.NP1):
                    ad = sW1 + (c1 + np_ * 16 + b_row) * LdX + kk + b_col
                    conflicts += ldsm_conflicts(ad)
                    b = ldsm_x4(sm, ad)
                    for mt in range(t.MT1):
                        mma(s[mt, 2 * np_], a[mt], b[:, 0], b[:, 1])
                        mma(s[mt, 2 * np_ + 1], a[mt], b[:, 2], b[:, 3])
            for mt in range(t.MT1):
                for nt in range(2 * t.NP1):
                    col = c1 + nt * 8 + 2 * T4
                    for hf in range(2):
                        row = r1 + mt * 16 + G + 8 * hf
                        words = (sH + row * LdH + col) // 2      # 4-byte word of the STS.32
                        assert len({w % 32 for w in words}) == 32  # conflict-free store
                        for j in range(2):
                            v = gelu(s[mt, nt, :, 2 * hf + j] + b1[h0 + col + j])
                            sm[sH + row * LdH + col + j] = v.astype(np.float16).astype(np.float64)
                            written[row, col + j] += 1
        assert (written == 1).all()  # every element of H exactly once per chunk
        # begin_tile(tt + 1)
        if tt + S < ntiles:
            load_tile(tt + S)
        sW2 = sW + ((tt + 1) % S) * t.SLOT
        for warp in range(t.warps):
            r2 = (warp // t.WN2) * 32
            c2 = (warp % t.WN2) * (t.NP2 * 16)
            for kk in range(0, BH, 16):
                a = []
                for mt in range(2):
                    ad = sH + (r2 + mt * 16 + a_row) * LdH + kk + a_col
                    conflicts += ldsm_conflicts(ad)
                    a.append(ldsm_x4(sm, ad))
                for np_ in range(t.NP2):
                    ad = sW2 + (c2 + np_ * 16 + b_row) * LdH + kk + b_col
                    conflicts += ldsm_conflicts(ad)
                    b = ldsm_x4(sm, ad)
                    for mt in range(2):
                        mma(acc[warp, mt, 2 * np_], a[mt], b[:, 0], b[:, 1])
                        mma(acc[warp, mt, 2 * np_ + 1], a[mt], b[:, 2], b[:, 3])
    # final epilogue: fp32 staging [BM][LdO] (aliases the smem from byte 0), then 16-byte rows
    assert BM * LdO * 4 <= t.smem
    sO = np.full(BM * LdO, np.nan)
    for warp in range(t.warps):
        r2 = (warp // t.WN2) * 32
        c2 = (warp % t.WN2) * (t.NP2 * 16)
        for nt in range(2 * t.NP2):
            n = c2 + nt * 8 + 2 * T4
            for mt in range(2):
                for hf in range(2):
                    row = r2 + mt * 16 + G + 8 * hf
                    off = row * LdO + n
                    for half in range(2):  # a float2 store is split into half-warps
                        ln = slice(16 * half, 16 * half + 16)
                        banks = {(o + j) % 32 for o in off[ln] for j in range(2)}
                        assert len(banks) == 32
                    for j in range(2):
                        g_ = 1.0 if gamma is None else gamma[n + j]
                        sO[off + j] = (acc[warp, mt, nt, :, 2 * hf + j] + b2[n + j]) * g_
    out = np.full((M, C), np.nan)
    for i in range(BM * C // 8):
        r, c = i // (C // 8), (i % (C // 8)) * 8
        if r >= M:
            continue
        assert (r * LdO + c) % 4 == 0  # LDS.128 alignment
        out[r, c:c + 8] = res[r, c:c + 8] + sO[r * LdO + c: r * LdO + c + 8]
    return out, conflicts


@pytest.mark.parametrize("C,M", [(96, 77), (128, 128), (192, 130), (256, 64), (384, 33)])
def test_kernel_emulation(C, M):
    """The kernel's index formulas, lane by lane, give the fused MLP (fp16 rounding of H),
    read only what was written (NaN elsewhere), with conflict-free ldmatrix / STS phases. Two
    hidden chunks (F = 2 BH) exercise the ring; M < BM (a partial block) where BM > M."""
    rng = np.random.default_rng(C)
    t = Tile(C)
    M = min(M, t.BM)
    Fh = 2 * t.BH if C != 384 else 3 * t.BH  # 3 chunks: the ring wraps (slot reuse)
    f16 = lambda a: a.astype(np.float16).astype(np.float64)
    x = f16(rng.standard_normal((M, C)))
    w1 = f16(rng.standard_normal((Fh, C)) * C ** -0.5)
    b1 = f16(rng.standard_normal(Fh) * 0.2)
    w2 = f16(rng.standard_normal((C, Fh)) * Fh ** -0.5)
    b2 = f16(rng.standard_normal(C) * 0.2)
    gamma = f16(rng.standard_normal(C) * 0.5)
    res = f16(rng.standard_normal((M, C)))
    got, conflicts = emulate_block(C, Fh, M, x, w1, b1, w2, b2, gamma, res)
    H = f16(gelu(x @ w1.T + b1))
    want = res + gamma * (H @ w2.T + b2)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    assert conflicts == 0


def test_pipeline_group_accounting():
    """cp.async groups: before tile t, (S-1)+t groups are committed (group i holds tile i);
    wait_group(S-2) leaves the S-2 newest pending, so tile t has landed; the slot refilled at
    tile t held tile t-1, which every warp finished before the barrier."""
    S = 3
    for ntiles in (2, 4, 6, 24):
        slot_of = {}
        committed = 0
        for s in range(S - 1):
            if s < ntiles:
                slot_of[s] = s % S
            committed += 1
        for tt in range(ntiles):
            landed = committed - (S - 2)       # groups 0 .. landed-1 complete
            assert tt < landed
            assert slot_of[tt] == tt % S
            nxt = tt + S - 1
            if nxt < ntiles:
                prev = [k for k, v in slot_of.items() if v == nxt % S and k < nxt]
                assert not prev or max(prev) == tt - 1 or tt == 0 and max(prev) < 0
                slot_of[nxt] = nxt % S
            committed += 1


# ---- CUDA (skip without a GPU) -----------------------------------------------------------------
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("C", KERNEL_WIDTHS)
@pytest.mark.parametrize("M", [1, 129, 1000])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_cuda_kernel(dtype, C, M, bias):
    x, args = make(M, C, 4 * C, dtype, "cuda", bias=bias, gamma=bias)
    got = ops.convnext_mlp(x, *args)
    want = ref.convnext_mlp(x, *args)
    assert_close(got, want, dtype)


@pytest.mark.parametrize("C,Fh", [(80, 320), (96, 200), (768, 3072)])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_cuda_fallback_shapes(C, Fh):
    """Shapes the kernel does not take run the fp32 ATen path on CUDA, same answer."""
    x, args = make(70, C, Fh, torch.bfloat16, "cuda")
    assert_close(ops.convnext_mlp(x, *args), ref.convnext_mlp(x, *args), torch.bfloat16)


@pytest.mark.parametrize("C", [96, 192, 384])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_cuda_block_fused_path(C):
    from test_convnext_ops import block_args, make_params, make_x
    p = make_params(C, 4 * C, torch.bfloat16, "cuda")
    x = make_x((1, 13, 11, C), torch.bfloat16, "cuda")
    got = ops.convnext_block(x, *block_args(p), 1e-6)
    want = ref.convnext_block(x, *block_args(p), 1e-6)
    atol, rtol = tol(torch.bfloat16)
    torch.testing.assert_close(got.float(), want.float(), atol=2 * atol, rtol=2 * rtol)
