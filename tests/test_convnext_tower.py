"""ConvNeXtTower forward: parity with transformers.ConvNextModel (5 stages, random layer scales),
non-square and non-multiple-of-64 inputs, both backends, fp32 and bf16, autograd, bad input."""
import pytest
import torch

import hires_lmm
from hires_lmm.models import ConvNeXtConfig, ConvNeXtTower

from conftest import DEVICES
from convnext_hf_utils import BACKENDS, HIDDEN, SIZES, hf_tokens, make_hf, rel_err

RTOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def hf():
    return make_hf()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", SIZES)
def test_parity_with_hf(hf, device, backend, dtype, size):
    hires_lmm.set_backend(backend)
    tower = ConvNeXtTower.from_state_dict(hf.state_dict(), dtype=dtype, device=device)
    torch.manual_seed(1)
    x = torch.randn(2, 3, *size)
    ref = hf_tokens(hf, x)                       # fp32 HF on CPU: the truth
    with torch.no_grad():
        out = tower(x.to(device))
    h, w = tower.config.grid(*size)
    assert out.shape == (2, h * w, HIDDEN[-1]) == ref.shape
    assert out.dtype == dtype and out.device.type == device
    assert rel_err(out.cpu(), ref) < RTOL[dtype]


def test_grid_follows_conv_arithmetic(hf):
    cfg = ConvNeXtTower.from_state_dict(hf.state_dict()).config
    for H, W in [(64, 64), (127, 64), (211, 150), (1536, 1536), (1536, 1024)]:
        hh, ww = H // 4, W // 4
        for _ in range(4):
            hh, ww = hh // 2, ww // 2
        assert cfg.grid(H, W) == (hh, ww)
    big = ConvNeXtConfig(hidden_sizes=(192, 384, 768, 1536, 3072), depths=(3, 3, 27, 3, 6),
                         num_stages=5)
    assert [big.grid(s, s)[0] ** 2 for s in (768, 1024, 1536)] == [144, 256, 576]


def test_raster_order_and_features(hf):
    """Token n = y * w + x of the last map (HF's permute(0,2,3,1).reshape)."""
    hires_lmm.set_backend("reference")
    tower = ConvNeXtTower.from_state_dict(hf.state_dict())
    x = torch.randn(1, 3, 211, 150)
    with torch.no_grad():
        fmap = tower.forward_features(x)               # (1, 3, 2, C)
        toks = tower(x)
        ref = hf(x).last_hidden_state[0]              # (C, 3, 2)
    assert fmap.shape == (1, 3, 2, HIDDEN[-1])
    for y in range(3):
        for xx in range(2):
            torch.testing.assert_close(toks[0, y * 2 + xx], fmap[0, y, xx])
            assert rel_err(toks[0, y * 2 + xx], ref[:, y, xx]) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_layer_scale_four_stages(backend):
    hires_lmm.set_backend(backend)
    hf = make_hf(hidden=[8, 12, 16, 20], depths=[1, 2, 1, 1], layer_scale=0.0, seed=3)
    tower = ConvNeXtTower.from_state_dict(hf.state_dict())
    assert not tower.config.layer_scale and tower.stages[0].blocks[0].gamma is None
    x = torch.randn(1, 3, 71, 45)
    with torch.no_grad():
        out = tower(x)
    assert rel_err(out, hf_tokens(hf, x)) < 1e-4


def test_batch_rows_independent(hf):
    hires_lmm.set_backend("reference")
    tower = ConvNeXtTower.from_state_dict(hf.state_dict())
    x = torch.randn(3, 3, 97, 65)
    with torch.no_grad():
        full = tower(x)
        one = tower(x[1:2])
    torch.testing.assert_close(full[1:2], one, atol=1e-5, rtol=1e-5)


def test_non_contiguous_input(hf):
    """An NHWC-backed (channels-last or permuted) input gives the same tokens."""
    hires_lmm.set_backend("reference")
    tower = ConvNeXtTower.from_state_dict(hf.state_dict())
    x = torch.randn(1, 97, 65, 3).permute(0, 3, 1, 2)     # non-contiguous NCHW view
    with torch.no_grad():
        a = tower(x)
        b = tower(x.contiguous())
    torch.testing.assert_close(a, b)


def test_autograd_reference_backend(hf):
    hires_lmm.set_backend("reference")
    tower = ConvNeXtTower.from_state_dict(hf.state_dict())
    x = torch.randn(1, 3, 64, 96, requires_grad=True)
    tower(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert tower.stages[4].blocks[0].fc2_weight.grad is not None


def test_bad_input(hf):
    hires_lmm.set_backend("reference")
    tower = ConvNeXtTower.from_state_dict(hf.state_dict())
    with pytest.raises(ValueError, match="pixel_values"):
        tower(torch.randn(1, 4, 64, 64))                # wrong channel count
    with pytest.raises(ValueError, match="pixel_values"):
        tower(torch.randn(3, 64, 64))                   # no batch dim
    with pytest.raises(ValueError, match="pixel_values.*64"):
        tower(torch.randn(1, 3, 63, 200))               # smaller than the total stride


def test_random_init_and_config_validation():
    cfg = ConvNeXtConfig(hidden_sizes=(8, 16), depths=(1, 1), num_stages=2)
    tower = ConvNeXtTower(cfg)
    assert tower.stages[0].down is None and tower.stages[1].down.weight.shape == (16, 8, 2, 2)
    assert torch.all(tower.stages[1].blocks[0].gamma == 1e-6)
    with pytest.raises(ValueError, match="depths"):
        ConvNeXtConfig(hidden_sizes=(8, 16), depths=(1,), num_stages=2)
    with pytest.raises(ValueError, match="hidden_act"):
        ConvNeXtConfig(hidden_sizes=(8,), depths=(1,), num_stages=1, hidden_act="gelu_new")
    # an HF dict: lists longer than num_stages are cut as HF builds them
    d = {"model_type": "convnext", "num_stages": 2, "hidden_sizes": [8, 16, 32], "depths": [1, 1, 1],
         "layer_scale_init_value": 0.0, "image_size": 768}
    c = ConvNeXtConfig.from_dict(d)
    assert c.hidden_sizes == (8, 16) and c.depths == (1, 1) and not c.layer_scale
    assert c.image_size == 768


def test_benchmark_quick_cases_run():
    """The tower benchmark's CPU smoke cases build, run, and agree with HF."""
    from hires_lmm.bench.bench_convnext_tower import CONVLLAVA_1536, cases, tower_macs
    assert round(tower_macs(CONVLLAVA_1536, 1536, 1536) / 1e9) == 1888   # spec 1.7: 1.89 TMAC
    for case in cases("cpu", quick=True):
        assert case.ours().shape == case.references["hf_eager"]().flatten(2).transpose(1, 2).shape
        assert case.max_err() <= case.tol


def test_compiled_norms_with_reference_blocks(hf, monkeypatch):
    """The kernels backend's stem/downsampling path (compiled hires_lmm.layer_norm, channels-last
    convs) with the block op swapped for its reference: runs before the block kernel exists."""
    monkeypatch.setattr(hires_lmm.ops, "convnext_block", hires_lmm.reference.convnext_block)
    tower = ConvNeXtTower.from_state_dict(hf.state_dict())
    assert hires_lmm.get_backend() == "kernels"
    for dtype, rtol in RTOL.items():
        x = torch.randn(1, 3, 211, 150)
        with torch.no_grad():
            out = tower.to(dtype)(x)
        assert rel_err(out, hf_tokens(hf, x)) < rtol
