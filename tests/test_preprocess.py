"""ConvLLaVA preprocessing: pad to square with (122,116,104), bicubic resize, CLIP mean/std,
against a pipeline written here with numpy + PIL, and against transformers' CLIP processor."""
import numpy as np
import pytest
import torch
from PIL import Image

from hires_lmm.models import convllava_preprocess, expand2square
from hires_lmm.models.convllava_preprocess import CLIP_MEAN, CLIP_STD, PAD_COLOR

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


def _image(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def _by_hand(img, size):
    rgb = np.asarray(img.convert("RGB"))
    h, w, _ = rgb.shape
    side = max(h, w)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = (122, 116, 104)
    y0, x0 = (side - h) // 2, (side - w) // 2
    canvas[y0:y0 + h, x0:x0 + w] = rgb
    resized = np.asarray(Image.fromarray(canvas).resize((size, size), Image.BICUBIC), np.float64)
    out = (resized / 255.0 - MEAN) / STD
    return torch.from_numpy(out.transpose(2, 0, 1)[None]).float()


def test_constants():
    assert PAD_COLOR == (122, 116, 104)
    np.testing.assert_allclose(CLIP_MEAN, MEAN)
    np.testing.assert_allclose(CLIP_STD, STD)


@pytest.mark.parametrize("h,w,size", [(37, 80, 48), (81, 30, 64), (50, 50, 32), (33, 34, 96),
                                      (1, 7, 16)])
def test_matches_hand_pipeline(h, w, size):
    img = _image(h, w)
    out = convllava_preprocess(img, size)
    assert out.shape == (1, 3, size, size) and out.dtype == torch.float32
    torch.testing.assert_close(out, _by_hand(img, size), atol=1e-5, rtol=0)


def test_pad_regions_hold_the_background():
    img = _image(10, 40)                          # wide: 15 rows of padding above, 15 below
    sq = expand2square(img)
    assert sq.size == (40, 40)
    arr = np.asarray(sq)
    assert (arr[:15] == PAD_COLOR).all() and (arr[25:] == PAD_COLOR).all()
    assert (arr[15:25] == np.asarray(img)).all()
    tall = expand2square(_image(41, 10))          # tall, odd remainder: 15 left, 16 right
    arr = np.asarray(tall)
    assert (arr[:, :15] == PAD_COLOR).all() and (arr[:, 25:] == PAD_COLOR).all()
    assert expand2square(img.resize((7, 7))).size == (7, 7)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_other_modes_convert_to_rgb(mode):
    img = _image(20, 31, mode=mode)
    torch.testing.assert_close(convllava_preprocess(img, 24), _by_hand(img, 24), atol=1e-5, rtol=0)


def test_list_path_and_dtype(tmp_path):
    a, b = _image(20, 30, seed=1), _image(30, 20, seed=2)
    a.save(tmp_path / "a.png")
    batch = convllava_preprocess([tmp_path / "a.png", b], 32, dtype=torch.bfloat16)
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == torch.bfloat16
    torch.testing.assert_close(batch[1:].float(), _by_hand(b, 32), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(convllava_preprocess(str(tmp_path / "a.png"), 32), _by_hand(a, 32),
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="size"):
        convllava_preprocess(a, 0)
    with pytest.raises(TypeError, match="image"):
        convllava_preprocess(np.zeros((4, 4, 3)), 8)


def test_matches_transformers_clip_processor():
    """LLaVA's path: expand2square, then the tower's CLIPImageProcessor (shortest edge + centre
    crop, bicubic)."""
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    size = 64
    proc = cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
               resample=3, do_convert_rgb=True)
    img = _image(45, 77, seed=3)
    ref = proc(expand2square(img), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(convllava_preprocess(img, size), ref.float(), atol=1e-5, rtol=0)
