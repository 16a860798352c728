"""The CPU dwconv_backward's AVX2 loops (default path, C % 8 == 0; csrc/cpu/dwconv_bwd.cpp) against
its portable twin (HIRES_LMM_CPU_TWIN=1): dx, d dw_weight, d dw_bias bitwise equal (the same fp32
products and sums in the same order), and against ATen's depthwise convolution_backward in fp64."""
import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, H, W, C): smaller than the kernel (every tap partly on the padding), one chunk per image row,
# B*H = 134 rows (3 rows per chunk, the last chunk short), a wide row
SHAPES = [(1, 3, 2, 8), (2, 9, 11, 16), (67, 2, 3, 8), (1, 13, 40, 24)]


def _run(dy, x, w, bias, monkeypatch, twin):
    if twin:
        monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "1")
    else:
        monkeypatch.delenv("HIRES_LMM_CPU_TWIN", raising=False)
    return torch.ops.hires_lmm.dwconv_backward(dy, x, w, bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_avx2_matches_twin_bitwise(dtype, shape, monkeypatch):
    g = torch.Generator().manual_seed(sum(shape))
    C = shape[-1]
    x = torch.randn(*shape, generator=g).to(dtype)
    w = torch.randn(C, 1, 7, 7, generator=g).to(dtype)
    dy = torch.randn(*shape, generator=g)
    dy[0, 0, 0, 3] = float("nan")          # reaches dx around it and d w / d b of channel 3
    x[-1, -1, -1, 5] = float("inf")        # d w of channel 5 (inf * g, and NaN where g is 0)
    for bias in (True, False):
        fast = _run(dy, x, w, bias, monkeypatch, False)
        twin = _run(dy, x, w, bias, monkeypatch, True)
        for name, a, b in zip(("dx", "dw", "db"), fast, twin):
            assert a.dtype == b.dtype == dtype and a.shape == b.shape, name
            assert torch.equal(a.isnan(), b.isnan()), name
            assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)), name


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_avx2_against_fp64(shape, monkeypatch):
    g = torch.Generator().manual_seed(7 + sum(shape))
    C = shape[-1]
    x, dy = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    w = torch.randn(C, 1, 7, 7, generator=g)
    gx, gw, gb = _run(dy, x, w, True, monkeypatch, False)
    ex, ew, eb = torch.ops.aten.convolution_backward(
        dy.double().permute(0, 3, 1, 2), x.double().permute(0, 3, 1, 2), w.double(), [C],
        [1, 1], [3, 3], [1, 1], False, [0, 0], C, [True, True, True])
    torch.testing.assert_close(gx.double(), ex.permute(0, 2, 3, 1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gw.double(), ew, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gb.double(), eb, atol=1e-4, rtol=1e-4)
