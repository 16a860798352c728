"""ConvLLaVA image preprocessing (specs/convllava.md section 1.6), with pillow and numpy.

    pixels = convllava_preprocess(Image.open("doc.png"), 1536)   # (1, 3, 1536, 1536) float32

The steps of LLaVA's `process_images` with `image_aspect_ratio="pad"` followed by the tower's
`CLIPImageProcessor`:
  1. convert to RGB; pad to a square, the image centred ((side - w) // 2, (side - h) // 2), with
     the background int(255 * CLIP mean) = (122, 116, 104)  (LLaVA's expand2square);
  2. resize to size x size, bicubic (PIL resample=3; the shortest-edge resize of a square), the
     centre crop of size x size is then the identity;
  3. rescale by 1/255 (in float64, then float32, as transformers does) and normalise with the
     OpenAI CLIP mean/std;
  4. HWC -> (1, 3, size, size).
"""
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

__all__ = ["CLIP_MEAN", "CLIP_STD", "PAD_COLOR", "expand2square", "convllava_preprocess"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(255 * m) for m in CLIP_MEAN)   # (122, 116, 104)


def expand2square(image: Image.Image, background=PAD_COLOR) -> Image.Image:
    """Pad to a square (side = max(w, h)) with `background`, the image centred (LLaVA)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), tuple(background))
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def _one(image, size: int) -> np.ndarray:
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        image = Image.open(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"convllava_preprocess: argument 'image' must be a PIL image or a path, "
                        f"got {type(image).__name__}")
    image = expand2square(image.convert("RGB"))
    image = image.resize((size, size), resample=Image.BICUBIC)
    x = (np.asarray(image, dtype=np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return x.transpose(2, 0, 1)


def convllava_preprocess(image: Union[Image.Image, str, Sequence], size: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One image (PIL image or path) -> (1, 3, size, size); a list of images -> (B, 3, size, size).
    size: the tower's resolution (768, 1024 or 1536 for ConvLLaVA)."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"convllava_preprocess: argument 'size' must be a positive int, got {size!r}")
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    return torch.from_numpy(np.stack([_one(im, size) for im in images])).to(dtype)
