"""Images at the edge: safe decoding, then the vision tower's own preprocessing.

Every file a user hands us is checked here, with an error naming it; the model can then trust its input.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = str | Path | bytes | Image.Image
DEFAULT_MAX_PIXELS = 64_000_000  # decompression-bomb guard: ~8000 x 8000
ASPECT_MODES = ("pad", "resize", "center_crop")
# Which transformers image-processor back end the bicubic resize reproduces, value for value: "pil" (its PIL
# processors, transformers 4's default and LLaVA's own) or "torchvision" (its torchvision processors, transformers
# 5's default where torchvision is installed). The two differ by up to a few grey levels per pixel.
RESIZE_BACKENDS = ("pil", "torchvision")


class ImageError(ValueError):
    """An image could not be used; the message names it and says why."""


def _describe(image: ImageInput, name: str | None) -> str:
    if name:
        return name
    return str(image) if isinstance(image, (str, Path)) else f"<{type(image).__name__}>"


def load_image(image: ImageInput, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a path, bytes or PIL image into an upright RGB image, or raise ImageError."""
    label = _describe(image, name)
    if isinstance(image, Image.Image):
        img = image
    else:
        try:
            source = io.BytesIO(image) if isinstance(image, bytes) else open(image, "rb")  # noqa: SIM115
        except OSError as e:
            raise ImageError(f"{label}: cannot open image: {e.strerror or e}") from None
        with source:
            try:
                img = Image.open(source)
                _check_pixels(img, label, max_pixels)
                img.load()
            except ImageError:
                raise
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                raise ImageError(f"{label}: not a readable image ({e})") from None
    _check_pixels(img, label, max_pixels)
    if img.width == 0 or img.height == 0:
        raise ImageError(f"{label}: image is empty ({img.width}x{img.height})")
    return to_rgb(ImageOps.exif_transpose(img))


def _check_pixels(img: Image.Image, label: str, max_pixels: int) -> None:
    if img.width * img.height > max_pixels:
        raise ImageError(
            f"{label}: image has {img.width}x{img.height} = {img.width * img.height} pixels, over the limit of "
            f"{max_pixels} (raise max_pixels if you trust this file)"
        )


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited on white rather than dropped to black."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit greyscale: scale the real value range to 8 bits instead of clipping at 255.
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = ((a - lo) / max(hi - lo, 1e-12) * 255).round().astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if img.mode == "P" or img.mode in ("LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


@dataclass
class ImageTransform:
    """RGB image -> normalised tensor (3, H, W), following the vision tower's image-processor config."""

    size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    aspect: str = "pad"
    resize_backend: str = "pil"

    def __post_init__(self) -> None:
        if self.aspect not in ASPECT_MODES:
            raise ValueError(f"aspect must be one of {ASPECT_MODES}, got {self.aspect!r}")
        if self.resize_backend not in RESIZE_BACKENDS:
            raise ValueError(f"resize_backend must be one of {RESIZE_BACKENDS}, got {self.resize_backend!r}")

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.aspect == "pad":
            img = expand_to_square(img, tuple(int(m * 255) for m in self.mean))
        if self.aspect == "center_crop":
            img = resize_bicubic(img, shortest_edge_size(img.size, self.size), self.resize_backend)
            left, top = (img.width - self.size) // 2, (img.height - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
        else:
            img = resize_bicubic(img, (self.size, self.size), self.resize_backend)
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3)
        x = x.permute(2, 0, 1).float() / 255.0  # (3, H, W) in [0, 1]
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    @classmethod
    def from_dir(cls, directory: Path, size: int, aspect: str, resize_backend: str = "pil") -> ImageTransform:
        """Mean/std from the tower's `preprocessor_config.json` (CLIP, SigLIP and DINOv2 all differ).

        Without one the normalisation is unknown: guessing ImageNet's would feed a CLIP or SigLIP tower inputs
        shifted from the ones it was trained on, silently, so this is an error."""
        path = directory / "preprocessor_config.json"
        if not path.exists():
            raise ValueError(
                f"{directory}: no preprocessor_config.json: the vision tower's image_mean / image_std are unknown "
                "(copy the image processor config it was trained with into the directory)"
            )
        cfg = json.loads(path.read_text())
        if "image_mean" not in cfg or "image_std" not in cfg:
            raise ValueError(f"{path}: needs image_mean and image_std")
        return cls(size, tuple(cfg["image_mean"]), tuple(cfg["image_std"]), aspect, resize_backend)

    def to_hf_dict(self) -> dict:
        """The same settings as a transformers image-processor config (what the vision dir ships)."""
        return {
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "size": {"height": self.size, "width": self.size},
            "crop_size": {"height": self.size, "width": self.size},
            "do_center_crop": self.aspect == "center_crop",
        }

    def to_dict(self) -> dict:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std), "aspect": self.aspect,
                "resize_backend": self.resize_backend}  # fmt: skip


def expand_to_square(img: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """LLaVA-1.5 `pad`: centre the image on a square of the mean colour, so nothing is cropped away."""
    side = max(img.size)
    if img.width == img.height:
        return img
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return canvas


def shortest_edge_size(size: tuple[int, int], edge: int) -> tuple[int, int]:
    """(w, h) with the shortest edge at `edge`, the other floored as transformers' `get_resize_output_image_size`
    does (`int(edge * long / short)`): rounding instead made a 64 x 48 image 299 x 224, not 298 x 224."""
    short, long = sorted(size)
    new_long = int(edge * long / short)
    return (edge, new_long) if size[0] <= size[1] else (new_long, edge)


def resize_bicubic(img: Image.Image, size: tuple[int, int], backend: str = "pil") -> Image.Image:
    """Bicubic resize to (w, h) as transformers' `backend` image processors compute it (see RESIZE_BACKENDS).
    torchvision resizes a uint8 image on CPU with torch's own antialiased bicubic kernel: no torchvision needed."""
    if img.size == size:
        return img
    if backend == "pil":
        return img.resize(size, Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].contiguous()  # (1, 3, H, W) uint8
    y = torch.nn.functional.interpolate(x, size=(size[1], size[0]), mode="bicubic", antialias=True, align_corners=False)
    return Image.fromarray(y[0].permute(1, 2, 0).numpy())
