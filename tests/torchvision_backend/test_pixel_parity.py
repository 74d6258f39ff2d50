"""Pixel parity with transformers' torchvision-backed image processors on odd sizes, with `resize_backend="torchvision"`
(the PIL back end, with `resize_backend="pil"`: tests/test_images.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pixel_parity import CLIP_MEAN, CLIP_STD, ODD_SIZES, noise

from minillava.images import ImageTransform
from minillava.interop.hf import _image_processor_dict

# Same uint8 pixels after the resize; transformers then normalises with mean and std fused with the 1/255 rescale,
# we rescale first: a few float32 ulps of values in [-2.2, 2.7]. One grey level off would be 1/255/0.27 = 0.015.
PIXEL_TOL = 1e-5


@pytest.mark.parametrize("aspect", ["center_crop", "resize", "pad"])
@pytest.mark.parametrize("width, height", ODD_SIZES)
def test_pixels_equal_the_torchvision_processors_on_odd_sizes(width, height, aspect):
    import transformers

    transform = ImageTransform(224, CLIP_MEAN, CLIP_STD, aspect, resize_backend="torchvision")
    cfg = _image_processor_dict(transform, None)
    hf = getattr(transformers, cfg.pop("image_processor_type"))(**cfg)
    expected = torch.as_tensor(np.asarray(hf(noise(width, height), return_tensors="pt")["pixel_values"][0]))
    ours = transform(noise(width, height))
    assert ours.shape == expected.shape == (3, 224, 224)
    diff = (ours - expected).abs().max().item()
    assert diff <= PIXEL_TOL, f"{width}x{height} {aspect}: max |diff| {diff}"


@pytest.mark.parametrize("width, height", ODD_SIZES)
def test_the_pil_backend_is_not_what_torchvision_computes(width, height):
    """The two back ends really differ (so the parity above is not vacuous): PIL's bicubic is a few grey levels off."""
    import transformers

    transform = ImageTransform(224, CLIP_MEAN, CLIP_STD, "resize", resize_backend="pil")
    cfg = _image_processor_dict(transform, None)
    hf = getattr(transformers, cfg.pop("image_processor_type"))(**cfg)
    expected = torch.as_tensor(np.asarray(hf(noise(width, height), return_tensors="pt")["pixel_values"][0]))
    assert (transform(noise(width, height)) - expected).abs().max().item() > 0.01


@pytest.mark.parametrize("size", [(100, 30), (40, 90), (5, 7), (300, 200)])  # (height, width)
def test_anyres_tiles_equal_the_torchvision_llava_next_processor(asset_dir, size):
    """AnyRes cuts its tiles from a canvas resized with the same back end: base view and tiles equal theirs."""
    from transformers import LlavaNextImageProcessor

    from minillava.config import ModelConfig, VisionConfig
    from minillava.model import MiniLlava

    pinpoints = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
    cfg = ModelConfig(
        vision=VisionConfig(source=str(asset_dir("vision", "clip"))), llm_source=str(asset_dir("llm", "llama")),
        aspect="resize", resize_backend="torchvision", image_grid_pinpoints=pinpoints,
    )  # fmt: skip
    _, processor = MiniLlava.build(cfg)
    t = processor.image_transform
    hf = LlavaNextImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints,
        image_mean=list(t.mean), image_std=list(t.std),
    )  # fmt: skip
    image = noise(size[1], size[0])
    ours = processor.pixels([image])
    theirs = hf(image, return_tensors="pt")["pixel_values"][0, : len(ours)]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= PIXEL_TOL
