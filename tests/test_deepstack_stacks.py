"""DeepStack stack builder (hires_lmm.models.deepstack) against explicit loops."""
import pytest
import torch

from hires_lmm.models import deepstack_stacks_from_crops, dilated_stacks, mosaic_crops


def _loop_stacks(hires, sh, sw):
    """stack i*sw + j, token y*W + x = hires[b, y*sh + i, x*sw + j]."""
    B, HH, WW, C = hires.shape
    H, W = HH // sh, WW // sw
    out = torch.empty(sh * sw, B, H * W, C, dtype=hires.dtype)
    for i in range(sh):
        for j in range(sw):
            for b in range(B):
                for y in range(H):
                    for x in range(W):
                        out[i * sw + j, b, y * W + x] = hires[b, y * sh + i, x * sw + j]
    return out


def _loop_mosaic(crops, gh, gw):
    n, PP, C = crops.shape
    P = int(PP ** 0.5)
    out = torch.empty(gh * P, gw * P, C, dtype=crops.dtype)
    for r in range(gh):
        for c in range(gw):
            for y in range(P):
                for x in range(P):
                    out[r * P + y, c * P + x] = crops[r * gw + c, y * P + x]
    return out


@pytest.mark.parametrize("s", [1, 2, 3, (2, 3), (1, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dilated_stacks_match_loop(s, dtype):
    sh, sw = (s, s) if isinstance(s, int) else s
    H, W = 5, 3                                    # odd, non-square stacks
    hires = torch.randn(2, H * sh, W * sw, 6).to(dtype)
    got = dilated_stacks(hires, s)
    assert got.shape == (sh * sw, 2, H * W, 6) and got.dtype == dtype
    assert torch.equal(got, _loop_stacks(hires, sh, sw))
    # the paper's slicing form
    for i in range(sh):
        for j in range(sw):
            assert torch.equal(got[i * sw + j], hires[:, i::sh, j::sw].flatten(1, 2))


def test_tokens_with_grid_and_noncontiguous():
    hires = torch.randn(2, 6, 8, 4).transpose(1, 2)            # (2, 8, 6, 4) non-contiguous
    assert not hires.is_contiguous()
    assert torch.equal(dilated_stacks(hires, 2), _loop_stacks(hires.contiguous(), 2, 2))
    tokens = hires.reshape(2, 48, 4)
    assert torch.equal(dilated_stacks(tokens, 2, grid=(8, 6)), dilated_stacks(hires, 2))


def test_dilated_stacks_bad_input():
    with pytest.raises(ValueError, match="'s'"):
        dilated_stacks(torch.randn(1, 5, 4, 2), 2)
    with pytest.raises(ValueError, match="grid"):
        dilated_stacks(torch.randn(1, 20, 2), 2)
    with pytest.raises(ValueError, match="grid"):
        dilated_stacks(torch.randn(1, 20, 2), 2, grid=(4, 4))
    with pytest.raises(ValueError, match="hires"):
        dilated_stacks(torch.randn(4, 4), 2)


@pytest.mark.parametrize("gh,gw", [(2, 2), (1, 3), (3, 2)])
def test_mosaic_matches_loop(gh, gw):
    crops = torch.randn(gh * gw, 9, 5)                        # P = 3
    assert torch.equal(mosaic_crops(crops, gh, gw), _loop_mosaic(crops, gh, gw))
    batched = torch.stack([crops, crops * 2])
    assert torch.equal(mosaic_crops(batched, gh, gw)[1], _loop_mosaic(crops * 2, gh, gw))
    with pytest.raises(ValueError, match="crop_feats"):
        mosaic_crops(torch.randn(gh * gw + 1, 9, 5), gh, gw)
    with pytest.raises(ValueError, match="crop_feats"):
        mosaic_crops(torch.randn(gh * gw, 8, 5), gh, gw)


def test_stacks_from_crops_pads_and_orders():
    # DeepStack-VL: per sample mosaic -> M[i::grid_h, j::grid_w], stack i*grid_w + j, zero pad
    P, C = 4, 3
    grids = [(2, 2), (1, 2), (1, 1)]
    feats = [torch.randn(gh * gw, P * P, C) for gh, gw in grids]
    got = deepstack_stacks_from_crops(feats, grids, num_crops=4)
    assert got.shape == (4, 3, P * P, C)
    for b, ((gh, gw), f) in enumerate(zip(grids, feats)):
        M = _loop_mosaic(f, gh, gw)
        for i in range(gh):
            for j in range(gw):
                assert torch.equal(got[i * gw + j, b], M[i::gh, j::gw].reshape(-1, C))
        assert torch.count_nonzero(got[gh * gw:, b]) == 0
    # a 2x2 grid: stack token k is the nearest neighbour of global token k (each from a
    # different crop only at crop borders); 4 stacks cover the hi-res map exactly once
    st = got[:, 0].reshape(-1, C)
    hi = _loop_mosaic(feats[0], 2, 2).reshape(-1, C)
    assert torch.equal(st.sort(0).values, hi.sort(0).values)
    with pytest.raises(ValueError, match="num_crops"):
        deepstack_stacks_from_crops([torch.randn(9, 4, 2)], [(3, 3)], num_crops=4)
