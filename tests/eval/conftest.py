"""Fixtures for the evaluation tests: a tiny saved model whose answers depend on the input, and images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from tiny_models import louden


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """Tiny matmuls on two shared cores: intra-op threads fighting each other cost 10x or more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}


@pytest.fixture(scope="session")
def eval_model(build_tiny):
    """The default tiny model with louder LLM weights (the stock random init answers the same to everything)."""
    model, processor = build_tiny()
    louden(model)
    return model.eval(), processor


@pytest.fixture(scope="session")
def eval_model_dir(eval_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, processor = eval_model
    directory = tmp_path_factory.mktemp("eval") / "tiny"
    model.save_pretrained(directory, processor)
    return directory


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32x32 PNGs, one per colour, with a differently placed inner square: images/<colour>.png."""
    root = tmp_path_factory.mktemp("eval-images") / "images"
    root.mkdir()
    for i, (name, rgb) in enumerate(COLORS.items()):
        img = Image.new("RGB", (32 + 8 * i, 32), rgb)  # varied sizes: the processor pads them to square
        ImageDraw.Draw(img).rectangle([2 + 5 * i, 4, 12 + 5 * i, 20], fill=(255 - rgb[0], 255 - rgb[1], 255 - rgb[2]))
        img.save(root / f"{name}.png")
    return root
