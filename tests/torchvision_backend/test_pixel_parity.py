"""Pixel parity with transformers' torchvision-backed image processors on odd sizes (the PIL back end, matched
exactly: tests/test_images.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pixel_parity import CLIP_MEAN, CLIP_STD, ODD_SIZES, noise

from minillava.images import ImageTransform
from minillava.interop.hf import _image_processor_dict

# Not exact: torchvision's antialiased bicubic resize on tensors rounds differently from PIL's (which we use, and which
# the PIL back end matches to 1e-5): measured up to two grey levels of one resized pixel (transformers 5.25,
# torchvision 0.29.1). The bound is exactly that, two levels in the channel with the smallest std, plus float32 ulps.
PIXEL_TOL = 2 / 255 / min(CLIP_STD) + 1e-5


@pytest.mark.parametrize("aspect", ["center_crop", "resize", "pad"])
@pytest.mark.parametrize("width, height", ODD_SIZES)
def test_pixels_equal_the_torchvision_processors_on_odd_sizes(width, height, aspect):
    import transformers

    transform = ImageTransform(224, CLIP_MEAN, CLIP_STD, aspect)
    cfg = _image_processor_dict(transform, None)
    hf = getattr(transformers, cfg.pop("image_processor_type"))(**cfg)
    expected = torch.as_tensor(np.asarray(hf(noise(width, height), return_tensors="pt")["pixel_values"][0]))
    ours = transform(noise(width, height))
    assert ours.shape == expected.shape == (3, 224, 224)
    diff = (ours - expected).abs().max().item()
    assert diff <= PIXEL_TOL, f"{width}x{height} {aspect}: max |diff| {diff}"
