"""Pixel parity with transformers' torchvision-backed image processors on odd sizes (the PIL back end, matched
exactly: tests/test_images.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from minillava.images import ImageTransform
from minillava.interop.hf import _image_processor_dict

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ODD_SIZES = [(64, 48), (37, 101), (1, 500), (4000, 3), (300, 225)]  # (width, height)
# Not exact: torchvision's antialiased bicubic resize on tensors rounds differently from PIL's (which we use, and which
# the PIL back end matches to 1e-5): measured up to two grey levels of one resized pixel (transformers 5.25,
# torchvision 0.29.1). The bound is exactly that, two levels in the channel with the smallest std, plus float32 ulps.
PIXEL_TOL = 2 / 255 / min(CLIP_STD) + 1e-5


def _noise(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(width * 10_007 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("aspect", ["center_crop", "resize", "pad"])
@pytest.mark.parametrize("width, height", ODD_SIZES)
def test_pixels_equal_the_torchvision_processors_on_odd_sizes(width, height, aspect):
    import transformers

    transform = ImageTransform(224, CLIP_MEAN, CLIP_STD, aspect)
    cfg = _image_processor_dict(transform, None)
    hf = getattr(transformers, cfg.pop("image_processor_type"))(**cfg)
    expected = torch.as_tensor(np.asarray(hf(_noise(width, height), return_tensors="pt")["pixel_values"][0]))
    ours = transform(_noise(width, height))
    assert ours.shape == expected.shape == (3, 224, 224)
    diff = (ours - expected).abs().max().item()
    assert diff <= PIXEL_TOL, f"{width}x{height} {aspect}: max |diff| {diff}"
