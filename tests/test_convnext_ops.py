"""dwconv_layernorm and convnext_block against hires_lmm.reference (fp32): every dtype, odd H, W
and C (vector and scalar paths of the CUDA kernel, C % 8 != 0 falls back from CUTLASS), the
checkpoint widths, non-contiguous inputs, both backends, bad input, autograd, opcheck."""
import pytest
import torch
import torch.nn.functional as F

import hires_lmm
from hires_lmm import ops, reference as ref

from conftest import DEVICES, DTYPES, tol


@pytest.fixture(autouse=True)
def _cpu_twin(monkeypatch):
    """CPU calls in this file run the CPU twin of the CUDA kernel (HIRES_LMM_CPU_TWIN=1: the proof
    of the CUDA tiling); tests/test_cpu_paths.py runs these tests on the default CPU path."""
    monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "1")


# (B, H, W, C): odd spatial sizes (1 -> every tap but the centre is padding; 5, 13 -> tails of the
# kernel's pixel segments), C multiples of 8 (vector path) and not (scalar path / fallback).
SHAPES = [(1, 1, 1, 8), (2, 5, 13, 24), (1, 13, 5, 40), (1, 7, 9, 96), (1, 5, 3, 192),
          (1, 6, 11, 20), (2, 3, 4, 12)]


def make_params(C, Fh, dtype, device, bias=True, gamma=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype=dtype, device=device)

    p = dict(
        dw_weight=r(C, 1, 7, 7, scale=0.2),
        dw_bias=r(C, scale=0.5) if bias else None,
        ln_weight=r(C, scale=0.3, shift=1.0),
        ln_bias=r(C, scale=0.2) if bias else None,
        fc1_weight=r(Fh, C, scale=C ** -0.5),
        fc1_bias=r(Fh, scale=0.2) if bias else None,
        fc2_weight=r(C, Fh, scale=Fh ** -0.5),
        fc2_bias=r(C, scale=0.2) if bias else None,
        gamma=r(C, scale=0.5) if gamma else None,
    )
    return p


def dwln_args(p):
    return (p["dw_weight"], p["dw_bias"], p["ln_weight"], p["ln_bias"])


def block_args(p):
    return (p["dw_weight"], p["dw_bias"], p["ln_weight"], p["ln_bias"], p["fc1_weight"],
            p["fc1_bias"], p["fc2_weight"], p["fc2_bias"], p["gamma"])


def make_x(shape, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)


def assert_close(got, want, dtype, scale=1.0):
    atol, rtol = tol(dtype)
    torch.testing.assert_close(got.float(), want.float(), atol=atol * scale, rtol=rtol * scale)


# ---- dwconv_layernorm ------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_dwconv_layernorm(device, dtype, shape, bias):
    C = shape[-1]
    p = make_params(C, 4 * C, dtype, device, bias=bias)
    x = make_x(shape, dtype, device)
    got = ops.dwconv_layernorm(x, *dwln_args(p), 1e-6)
    want = ref.dwconv_layernorm(x, *dwln_args(p), 1e-6)
    assert got.shape == x.shape and got.dtype == dtype and got.is_contiguous()
    assert_close(got, want, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [384, 768, 1536, 3072])
def test_dwconv_layernorm_checkpoint_widths(device, C):
    dtype = torch.bfloat16
    p = make_params(C, 8, dtype, device)  # fc weights unused here
    x = make_x((1, 3, 5, C), dtype, device)
    got = ops.dwconv_layernorm(x, *dwln_args(p), 1e-6)
    assert_close(got, ref.dwconv_layernorm(x, *dwln_args(p), 1e-6), dtype)


# The tiled kernel's tile shapes (DwconvLnTiling, kernels/convnext/dwconv_layernorm.h): each C at
# the last width of one shape and the first of the next (80 KiB budget: 2x32 tiles up to C = 244,
# 2x16 up to 464, 2x8 up to 832, then 1x8), with tail channel chunks (248 = 128 + 120, 472 =
# 256 + 216, 840 = 3 x 256 + 72), H and W not multiples of the tile (W = 37: 2x32 tiles with a tail
# of 5; 17: 2x16 with 1; 13: 2x8 with 5; odd H: a half tile), batch 2 and borders on every side.
TILE_EDGES = [(2, 5, 37, 240), (1, 3, 37, 248), (2, 3, 17, 464), (1, 5, 17, 472),
              (1, 3, 13, 832), (2, 3, 13, 840), (1, 2, 3, 1672)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", TILE_EDGES, ids=lambda s: "x".join(map(str, s)))
def test_dwconv_layernorm_tile_edges(device, dtype, shape):
    C = shape[-1]
    p = make_params(C, 8, dtype, device, seed=C)
    x = make_x(shape, dtype, device, seed=C + 1)
    got = ops.dwconv_layernorm(x, *dwln_args(p), 1e-6)
    assert_close(got, ref.dwconv_layernorm(x, *dwln_args(p), 1e-6), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_dwconv_layernorm_padding_taps(device):
    """Only the taps on the zero padding of the tile's borders are skipped: weights of 1 on a single
    tap (kh, kw) make the conv a shift, zero exactly where the shifted pixel is padding, in every
    tile of a 2x32 grid (W = 70: three tiles, H = 5: three row tiles)."""
    C = 16
    x = make_x((2, 5, 70, C), torch.float32, device)
    for kh, kw in [(0, 0), (6, 6), (0, 6), (3, 0), (6, 3)]:
        w = torch.zeros(C, 1, 7, 7, device=device)
        w[:, 0, kh, kw] = 1.0
        ones, zeros = torch.ones(C, device=device), torch.zeros(C, device=device)
        # LayerNorm of the shifted pixel (eps = 1: a zero pixel stays exactly 0)
        got = ops.dwconv_layernorm(x, w, None, ones, zeros, 1.0)
        assert_close(got, ref.dwconv_layernorm(x, w, None, ones, zeros, 1.0), torch.float32)
        dh, dw = kh - 3, kw - 3
        H, W = 5, 70
        hs = [h for h in range(H) if not 0 <= h + dh < H]
        ws = [w_ for w_ in range(W) if not 0 <= w_ + dw < W]
        assert (got[:, hs] == 0).all() and (got[:, :, ws] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dwconv_layernorm_noncontiguous(device, dtype):
    C = 24
    p = make_params(C, 4 * C, dtype, device)
    # (a) a strided NHWC view with unit channel stride (the kernel reads the strides)
    big = make_x((2, 11, 17, C), dtype, device)
    x = big[:, 1:-2, ::2, :]
    assert not x.is_contiguous() and x.stride(3) == 1
    assert_close(ops.dwconv_layernorm(x, *dwln_args(p)), ref.dwconv_layernorm(x, *dwln_args(p)), dtype)
    # (b) NHWC view of an NCHW tensor (channel stride != 1: copied first)
    xn = make_x((2, C, 6, 9), dtype, device).permute(0, 2, 3, 1)
    assert xn.stride(3) != 1
    assert_close(ops.dwconv_layernorm(xn, *dwln_args(p)), ref.dwconv_layernorm(xn, *dwln_args(p)), dtype)
    # (c) non-contiguous parameters
    w = make_x((C, 2, 7, 7), dtype, device)[:, :1]
    args = (w, p["dw_bias"], p["ln_weight"], p["ln_bias"])
    assert_close(ops.dwconv_layernorm(xn, *args), ref.dwconv_layernorm(xn, *args), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2, 70, 8), (1, 2, 7, 4096), (1, 2, 3, 12288)])
def test_dwconv_layernorm_segments(device, dtype, shape):
    """CUDA launch geometry (tests/test_kernel_tiling_emulation.py models it): W > P gives two
    pixel segments per row (P = 64, tail 6); C = 4096 gives P = 3 < kRun; C = 12288 (the limit)
    gives P = 1 and 48 KiB of shared memory."""
    C = shape[-1]
    p = make_params(C, 8, dtype, device)
    x = make_x(shape, dtype, device)
    assert_close(ops.dwconv_layernorm(x, *dwln_args(p)), ref.dwconv_layernorm(x, *dwln_args(p)), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_storage(device, dtype):
    """x at a 1-element storage offset (C % 8 == 0): the CUDA dwconv kernel takes its scalar path
    and convnext_block its fallback GEMMs; fc weights with hidden % 8 != 0 take the fallback."""
    C = 16
    p = make_params(C, 4 * C, dtype, device)
    n = 2 * 5 * 9 * C
    x = make_x((n + 1,), dtype, device)[1:].view(2, 5, 9, C)
    assert_close(ops.dwconv_layernorm(x, *dwln_args(p)), ref.dwconv_layernorm(x, *dwln_args(p)), dtype)
    assert_close(ops.convnext_block(x, *block_args(p)), ref.convnext_block(x, *block_args(p)), dtype,
                 BLOCK_SCALE[dtype])
    q = make_params(C, 4 * C - 4, dtype, device)
    xa = make_x((2, 5, 9, C), dtype, device)
    assert_close(ops.convnext_block(xa, *block_args(q)), ref.convnext_block(xa, *block_args(q)), dtype,
                 BLOCK_SCALE[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_dwconv_layernorm_matches_hf_math(device):
    """HF ConvNextLayer's first half: NCHW conv2d, permute, LayerNorm(eps=1e-6)."""
    C = 40
    p = make_params(C, 4 * C, torch.float32, device)
    xn = make_x((2, C, 9, 7), torch.float32, device)
    y = F.conv2d(xn, p["dw_weight"], p["dw_bias"], padding=3, groups=C).permute(0, 2, 3, 1)
    want = F.layer_norm(y, (C,), p["ln_weight"], p["ln_bias"], 1e-6)
    got = ops.dwconv_layernorm(xn.permute(0, 2, 3, 1).contiguous(), *dwln_args(p), 1e-6)
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_dwconv_layernorm_empty(device):
    p = make_params(8, 32, torch.float32, device)
    x = torch.empty(0, 3, 3, 8, device=device)
    assert ops.dwconv_layernorm(x, *dwln_args(p)).shape == x.shape


# ---- convnext_block --------------------------------------------------------------------------
# fp16/bf16: the LayerNorm and GELU outputs are rounded to the dtype before each GEMM (as the
# CUDA path and a bf16 PyTorch model do), so the error against the fp32 reference is a few ulps
# of the MLP's intermediate values: twice the per-dtype tolerance.
BLOCK_SCALE = {torch.float32: 1.0, torch.float16: 2.0, torch.bfloat16: 2.0}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 5, 13, 24), (1, 13, 5, 40), (1, 3, 7, 20),
                                   (1, 5, 3, 96)])
@pytest.mark.parametrize("bias,gamma", [(True, True), (False, False), (True, False)])
def test_convnext_block(device, dtype, shape, bias, gamma):
    C = shape[-1]
    p = make_params(C, 4 * C, dtype, device, bias=bias, gamma=gamma)
    x = make_x(shape, dtype, device)
    got = ops.convnext_block(x, *block_args(p), 1e-6)
    want = ref.convnext_block(x, *block_args(p), 1e-6)
    assert got.shape == x.shape and got.dtype == dtype
    assert_close(got, want, dtype, BLOCK_SCALE[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C", [192, 384, 768, 1536, 3072])
def test_convnext_block_checkpoint_widths(device, dtype, C):
    p = make_params(C, 4 * C, dtype, device)
    x = make_x((1, 3, 3, C), dtype, device)
    got = ops.convnext_block(x, *block_args(p), 1e-6)
    assert_close(got, ref.convnext_block(x, *block_args(p), 1e-6), dtype, BLOCK_SCALE[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("device", DEVICES[1:])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M_hw", [(1, 1), (9, 15), (24, 24), (33, 7)])
@pytest.mark.parametrize("C", [192, 200])
def test_convnext_block_gemm_tiles(device, dtype, M_hw, C):
    """CUDA: M = H*W from 1 to ~1k crosses the GEMM tile tails (M, and N = 4C, C = 192); C = 200
    adds an N tail to fc1 (800 = 6 * 128 + 32, with CTAs of the 8-wide swizzle past the last
    column), a K tail to fc1 (200 = 6 * 32 + 8) and an N tail to fc2."""
    p = make_params(C, 4 * C, dtype, device)
    x = make_x((2, *M_hw, C), dtype, device)
    got = ops.convnext_block(x, *block_args(p), 1e-6)
    assert_close(got, ref.convnext_block(x, *block_args(p), 1e-6), dtype, BLOCK_SCALE[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_convnext_block_noncontiguous(device, dtype):
    C = 24
    p = make_params(C, 4 * C, dtype, device)
    xn = make_x((2, C, 5, 7), dtype, device).permute(0, 2, 3, 1)
    got = ops.convnext_block(xn, *block_args(p))
    assert_close(got, ref.convnext_block(xn, *block_args(p)), dtype, BLOCK_SCALE[dtype])
    big = make_x((1, 9, 12, C), dtype, device)
    x = big[:, ::2, 1:, :]
    got = ops.convnext_block(x, *block_args(p))
    assert_close(got, ref.convnext_block(x, *block_args(p)), dtype, BLOCK_SCALE[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_convnext_block_matches_hf_layer(device):
    """Against transformers' ConvNextLayer (NCHW module) with random layer scale."""
    from transformers import ConvNextConfig
    from transformers.models.convnext.modeling_convnext import ConvNextLayer

    C = 24
    torch.manual_seed(0)
    layer = ConvNextLayer(ConvNextConfig(hidden_act="gelu", layer_scale_init_value=1.0), C).eval()
    with torch.no_grad():
        layer.layer_scale_parameter.copy_(torch.randn(C) * 0.5)
        layer.layernorm.bias.copy_(torch.randn(C) * 0.1)
    layer = layer.to(device)
    xn = torch.randn(2, C, 7, 5, device=device)
    with torch.no_grad():
        want = layer(xn)
        got = ops.convnext_block(
            xn.permute(0, 2, 3, 1).contiguous(), layer.dwconv.weight, layer.dwconv.bias,
            layer.layernorm.weight, layer.layernorm.bias, layer.pwconv1.weight, layer.pwconv1.bias,
            layer.pwconv2.weight, layer.pwconv2.bias, layer.layer_scale_parameter, 1e-6)
    assert_close(got.permute(0, 3, 1, 2), want, torch.float32, 10.0)


# ---- backends --------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_backends_agree(device):
    C = 24
    p = make_params(C, 4 * C, torch.float32, device)
    x = make_x((1, 5, 6, C), torch.float32, device)
    k1 = ops.dwconv_layernorm(x, *dwln_args(p))
    k2 = ops.convnext_block(x, *block_args(p))
    with hires_lmm.use_backend("reference"):
        r1 = ops.dwconv_layernorm(x, *dwln_args(p))
        r2 = ops.convnext_block(x, *block_args(p))
    assert torch.equal(r1, ref.dwconv_layernorm(x, *dwln_args(p)))
    assert_close(k1, r1, torch.float32)
    assert_close(k2, r2, torch.float32)


# ---- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(device):
    C = 24
    p = make_params(C, 4 * C, torch.float32, device)
    x = make_x((1, 5, 6, C), torch.float32, device)
    # NCHW passed as NHWC: the last dim is W, not C
    with pytest.raises(RuntimeError, match="argument 'x'.*dw_weight"):
        ops.dwconv_layernorm(make_x((1, C, 5, 6), torch.float32, device), *dwln_args(p))
    with pytest.raises(RuntimeError, match="argument 'x'.*dw_weight"):
        ops.convnext_block(make_x((1, C, 5, 6), torch.float32, device), *block_args(p))
    # wrong kernel size
    w3 = p["dw_weight"][:, :, 2:5, 2:5]
    with pytest.raises(RuntimeError, match="argument 'dw_weight'.*7x7"):
        ops.dwconv_layernorm(x, w3, p["dw_bias"], p["ln_weight"], p["ln_bias"])
    # not depthwise
    with pytest.raises(RuntimeError, match="argument 'dw_weight'"):
        ops.dwconv_layernorm(x, p["dw_weight"].expand(C, 2, 7, 7), p["dw_bias"], p["ln_weight"],
                             p["ln_bias"])
    # rank
    with pytest.raises(RuntimeError, match="argument 'x'.*4-D"):
        ops.dwconv_layernorm(x[0], *dwln_args(p))
    # dtypes
    with pytest.raises(RuntimeError, match="argument 'x'"):
        ops.dwconv_layernorm(x.to(torch.int32), *dwln_args(p))
    with pytest.raises(RuntimeError, match="argument 'ln_weight'.*dtype"):
        ops.dwconv_layernorm(x, p["dw_weight"], p["dw_bias"], p["ln_weight"].double(), p["ln_bias"])
    with pytest.raises(RuntimeError, match="argument 'dw_weight'.*dtype"):
        ops.dwconv_layernorm(x, p["dw_weight"].half(), p["dw_bias"], p["ln_weight"], p["ln_bias"])
    # parameter shapes
    with pytest.raises(RuntimeError, match="argument 'ln_bias'"):
        ops.dwconv_layernorm(x, p["dw_weight"], p["dw_bias"], p["ln_weight"], p["ln_bias"][:-1])
    with pytest.raises(RuntimeError, match="argument 'dw_bias'"):
        ops.dwconv_layernorm(x, p["dw_weight"], p["dw_bias"][:-1], p["ln_weight"], p["ln_bias"])
    a = list(block_args(p))
    for i, name, bad in [(4, "fc1_weight", p["fc1_weight"][:, :-1]), (5, "fc1_bias", p["fc1_bias"][:-1]),
                         (6, "fc2_weight", p["fc2_weight"][:, :-1]), (7, "fc2_bias", p["fc2_bias"][:-1]),
                         (8, "gamma", p["gamma"][:-1]), (8, "gamma", p["gamma"].half())]:
        b = list(a)
        b[i] = bad
        with pytest.raises(RuntimeError, match=f"argument '{name}'"):
            ops.convnext_block(x, *b)
    with pytest.raises(RuntimeError, match="argument 'eps'"):
        ops.dwconv_layernorm(x, *dwln_args(p), -1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("device", DEVICES[1:])
def test_bad_device(device):
    C = 8
    p = make_params(C, 4 * C, torch.float32, device)
    x = make_x((1, 3, 3, C), torch.float32, device)
    with pytest.raises(RuntimeError, match="argument 'ln_weight'.*device"):
        ops.dwconv_layernorm(x, p["dw_weight"], p["dw_bias"], p["ln_weight"].cpu(), p["ln_bias"])


# ---- autograd, opcheck, compile --------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_autograd(device):
    C = 8
    p = make_params(C, 4 * C, torch.float32, device)
    x = make_x((1, 4, 5, C), torch.float32, device)

    def grads(fn):
        xs = x.clone().requires_grad_(True)
        ps = {k: (v.clone().requires_grad_(True) if v is not None else None) for k, v in p.items()}
        out = fn(xs, *block_args(ps))
        out.square().sum().backward()
        return [xs.grad] + [ps[k].grad for k in ("dw_weight", "ln_weight", "fc1_weight", "gamma")]

    for a, b in zip(grads(ops.convnext_block), grads(ref.convnext_block)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

    xs = x.clone().requires_grad_(True)
    ops.dwconv_layernorm(xs, *dwln_args(p)).sum().backward()
    xr = x.clone().requires_grad_(True)
    ref.dwconv_layernorm(xr, *dwln_args(p)).sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    C = 8
    p = make_params(C, 4 * C, torch.float32, device)
    x = make_x((1, 3, 5, C), torch.float32, device).requires_grad_(True)
    torch.library.opcheck(torch.ops.hires_lmm.dwconv_layernorm.default, (x, *dwln_args(p), 1e-6))
    torch.library.opcheck(torch.ops.hires_lmm.convnext_block.default, (x, *block_args(p), 1e-6))
    p2 = make_params(C, 4 * C, torch.float32, device, bias=False, gamma=False)
    torch.library.opcheck(torch.ops.hires_lmm.convnext_block.default, (x, *block_args(p2), 1e-6))


def test_build_info_lists_kernels():
    k = hires_lmm.build_info()["kernels"]
    assert "cpu" in k["dwconv_layernorm"] and "cpu" in k["convnext_block"]


def _is_hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.gpu
@pytest.mark.parametrize("device", DEVICES[1:])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C,hw", [(192, (9, 15)), (384, (24, 24)), (3072, (3, 5)), (24, (1, 1))])
@pytest.mark.parametrize("bias,gamma", [(True, True), (False, False)])
def test_convnext_block_sm90(device, dtype, C, hw, bias, gamma, monkeypatch):
    """CUDA: the opt-in Hopper GEMMs (HIRES_LMM_CONVNEXT_SM90=1) against the reference."""
    if not hires_lmm.build_info()["sm90a_kernels"] or not _is_hopper():
        pytest.skip("needs a build with sm_90a kernels and a compute capability 9.x device")
    monkeypatch.setenv("HIRES_LMM_CONVNEXT_SM90", "1")
    p = make_params(C, 4 * C, dtype, device, bias=bias, gamma=gamma)
    x = make_x((2, *hw, C), dtype, device)
    got = ops.convnext_block(x, *block_args(p), 1e-6)
    assert_close(got, ref.convnext_block(x, *block_args(p), 1e-6), dtype, BLOCK_SCALE[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    """The fake kernels let torch.compile trace both ops without graph breaks."""
    C = 16
    p = make_params(C, 4 * C, torch.float32, device)
    x = make_x((1, 5, 4, C), torch.float32, device)

    def f(x):
        h = ops.dwconv_layernorm(x, *dwln_args(p))
        return ops.convnext_block(h, *block_args(p))

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert_close(got, f(x), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_backward(device):
    """torch.compile (aot_eager) of a training step through the three ops: the traced backward
    (the CompositeImplicitAutograd backward ops of csrc/convnext_bwd.cpp) gives eager's gradients."""
    C = 16
    p = make_params(C, 4 * C, torch.float32, device)
    x = make_x((1, 5, 4, C), torch.float32, device)
    res = make_x((1, 5, 4, C), torch.float32, device, seed=5)

    def f(x, p):
        h = ops.dwconv_layernorm(x, *dwln_args(p))
        h = ops.convnext_block(h, *block_args(p))
        return ops.convnext_mlp(h, p["fc1_weight"], p["fc1_bias"], p["fc2_weight"], p["fc2_bias"],
                                p["gamma"], res)

    def grads(fn):
        xs = x.clone().requires_grad_(True)
        ps = {k: v.clone().requires_grad_(True) for k, v in p.items()}
        fn(xs, ps).square().sum().backward()
        return [xs.grad] + [ps[k].grad for k in sorted(ps)]

    for a, b in zip(grads(torch.compile(f, fullgraph=True, backend="aot_eager")), grads(f)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
