"""LLaVA-NeXT AnyRes: a large image becomes a base view plus a grid of tiles, read as one feature map.

    image (H, W) --best pinpoint (h, w)--> resize to fit, pad black --> (h/S) x (w/S) tiles of S x S px
                 --the processor's own transform--> base view of S x S px
    crops (1 + rows*cols, 3, S, S) --tower, projector--> (1 + rows*cols, g*g, D)
    tile tokens laid out as one (rows*g, cols*g) map --unpad: drop the rows/cols that saw only padding-->
    (H', W', D) --`image_newline` after each row--> H' * (W' + 1) tokens, after the base view's g*g tokens

Each step follows transformers' LlavaNextImageProcessor and LlavaNextModel (`select_best_resolution`,
`get_patch_output_size`, `unpad_image`, `pack_image_features`) to the same float expressions, so the number
of tokens of an image and their order agree with LLaVA-NeXT checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from minillava.images import resize_bicubic

Size = tuple[int, int]  # (height, width)


def parse_pinpoints(text: str) -> list[list[int]]:
    """Canvases as HEIGHTxWIDTH in px: "672x336,336x672" -> [[672, 336], [336, 672]]."""
    pinpoints = []
    for item in text.split(","):
        h, sep, w = item.strip().lower().partition("x")
        if not (sep and h.isdigit() and w.isdigit()):
            raise ValueError(f"grid pinpoint {item.strip()!r} is not HEIGHTxWIDTH in px, e.g. 672x336")
        pinpoints.append([int(h), int(w)])
    return pinpoints


def select_best_resolution(size: Size, pinpoints: tuple[Size, ...]) -> Size:
    """The canvas that shows the most of the image's pixels and, among equals, wastes the fewest."""
    height, width = size
    best, most_shown, least_wasted = pinpoints[0], 0, float("inf")
    for canvas_h, canvas_w in pinpoints:
        scale = min(canvas_w / width, canvas_h / height)
        shown = min(int(width * scale) * int(height * scale), width * height)  # upscaling adds no detail
        wasted = canvas_h * canvas_w - shown
        if shown > most_shown or (shown == most_shown and wasted < least_wasted):
            best, most_shown, least_wasted = (canvas_h, canvas_w), shown, wasted
    return best


def fit_size(size: Size, canvas: Size) -> Size:
    """The image's size scaled to fit the canvas with its aspect kept (rounded up, as transformers does)."""
    height, width = size
    canvas_h, canvas_w = canvas
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), canvas_h), canvas_w
    return canvas_h, min(math.ceil(width * scale_h), canvas_w)


def unpad_slices(size: Size, grid: Size) -> tuple[slice, slice]:
    """The rows and cols of a feature map of the padded canvas that cover the image, not the padding.

    `size` is the original image's (height, width), `grid` the map's (rows, cols); transformers' `unpad_image`.
    """
    height, width = size
    rows, cols = grid
    if width / height > cols / rows:  # wider than the canvas: bars above and below
        pad = (rows - int(round(height * (cols / width), 7))) // 2
        return slice(pad, rows - pad), slice(0, cols)
    pad = (cols - int(round(width * (rows / height), 7))) // 2
    return slice(0, rows), slice(pad, cols - pad)


@dataclass(frozen=True)
class AnyRes:
    """The geometry of AnyRes: what the processor needs to count tokens and the model to lay them out."""

    pinpoints: tuple[Size, ...]  # candidate canvases (height, width) in px, multiples of `tile`
    tile: int  # the vision tower's input side in px
    grid: Size  # tokens of one crop as (rows, cols): the tower's patch grid

    def __post_init__(self) -> None:
        if not self.pinpoints:
            raise ValueError("AnyRes needs at least one grid pinpoint")
        for h, w in self.pinpoints:
            if h <= 0 or w <= 0 or h % self.tile or w % self.tile:
                raise ValueError(
                    f"AnyRes grid pinpoint {h}x{w} is not a positive multiple of the vision tower's {self.tile}px input"
                )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnyRes:
        return cls(tuple((int(h), int(w)) for h, w in d["pinpoints"]), int(d["tile"]), tuple(d["grid"]))

    def to_dict(self) -> dict[str, Any]:
        return {"pinpoints": [list(p) for p in self.pinpoints], "tile": self.tile, "grid": list(self.grid)}

    def tile_grid(self, size: Size) -> Size:
        """(rows, cols) of tiles for an image of `size`."""
        canvas_h, canvas_w = select_best_resolution(size, self.pinpoints)
        return canvas_h // self.tile, canvas_w // self.tile

    def num_crops(self, size: Size) -> int:
        rows, cols = self.tile_grid(size)
        return 1 + rows * cols  # the base view, then the tiles

    def feature_slices(self, size: Size) -> tuple[slice, slice]:
        """Which rows and cols of the tiles' joint token map survive unpadding."""
        rows, cols = self.tile_grid(size)
        return unpad_slices(size, (rows * self.grid[0], cols * self.grid[1]))

    def num_tokens(self, size: Size) -> int:
        """Tokens of one image: the base view's grid, then each kept row of the tile map plus its newline."""
        kept_rows, kept_cols = self.feature_slices(size)
        height, width = kept_rows.stop - kept_rows.start, kept_cols.stop - kept_cols.start
        return self.grid[0] * self.grid[1] + height * (width + 1)

    def cut_tiles(self, image: Image.Image, resize_backend: str = "pil") -> list[Image.Image]:
        """Resize the image to fit its best canvas, centre it on black, and cut the canvas into tiles, row-major."""
        size = (image.height, image.width)
        canvas_h, canvas_w = select_best_resolution(size, self.pinpoints)
        fit_h, fit_w = fit_size(size, (canvas_h, canvas_w))
        canvas = Image.new("RGB", (canvas_w, canvas_h), (0, 0, 0))
        fitted = resize_bicubic(image, (fit_w, fit_h), resize_backend)
        canvas.paste(fitted, ((canvas_w - fit_w) // 2, (canvas_h - fit_h) // 2))
        s = self.tile
        return [canvas.crop((x, y, x + s, y + s)) for y in range(0, canvas_h, s) for x in range(0, canvas_w, s)]


class AnyResPacker(nn.Module):
    """Per-crop image tokens -> one token sequence per image, and the learned `image_newline` that ends each row."""

    def __init__(self, layout: AnyRes, dim: int) -> None:
        super().__init__()
        self.layout = layout
        # transformers' init: the scale of a token embedding, N(0, 1/sqrt(D))
        self.image_newline = nn.Parameter(torch.randn(dim) / math.sqrt(dim))

    def forward(self, tokens: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """(C, g*g, D) tokens of all crops, image by image, and (I, 2) image sizes -> (sum_i N_i, D)."""
        sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
        counts = [self.layout.num_crops(s) for s in sizes]
        if sum(counts) != tokens.shape[0]:
            raise ValueError(
                f"AnyRes: {tokens.shape[0]} crops were encoded but the {len(sizes)} image sizes call for {sum(counts)}"
            )
        # The one per-image loop: each image has its own tile grid and unpadding.
        return torch.cat([self.pack(t, s) for t, s in zip(tokens.split(counts), sizes, strict=True)])

    def pack(self, tokens: torch.Tensor, size: Size) -> torch.Tensor:  # (1 + rows*cols, g*g, D) -> (N, D)
        rows, cols = self.layout.tile_grid(size)
        g_rows, g_cols = self.layout.grid
        tiles = tokens[1:].reshape(rows, cols, g_rows, g_cols, -1)
        tile_map = tiles.permute(0, 2, 1, 3, 4).reshape(rows * g_rows, cols * g_cols, -1)  # (R, C, D), as the image
        kept_rows, kept_cols = self.layout.feature_slices(size)
        tile_map = tile_map[kept_rows, kept_cols]  # (H', W', D)
        newline = self.image_newline.to(tile_map.dtype).expand(tile_map.shape[0], 1, -1)  # (H', 1, D)
        return torch.cat([tokens[0], torch.cat([tile_map, newline], dim=1).flatten(0, 1)])
