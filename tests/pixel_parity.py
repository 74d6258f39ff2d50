"""What the pixel-parity tests share (tests/test_images.py for the PIL back end, tests/torchvision_backend/ for
torchvision's): CLIP's normalisation, odd image sizes, and noise images."""

from __future__ import annotations

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ODD_SIZES = [(64, 48), (37, 101), (1, 500), (4000, 3), (300, 225)]  # (width, height)


def noise(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(width * 10_007 + height)  # noise: any one-pixel shift of the resize shows
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
