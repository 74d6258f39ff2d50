"""What an exported model (ONNX Runtime, llama.cpp) shares: MiniLlava's generation surface over a decoder that
runs outside torch.

`generate.decode` asks a model for a prefill with images, then one token at a time on its cache; a subclass answers
by running its runtime, while the splice of image tokens into the text stays minillava's own. So `Generator`,
`minillava generate` and `minillava eval` run an export with the torch model's prompt rendering, left padding,
positions, stop tokens and sampling, and their answers can be compared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minillava.anyres import AnyResPacker
from minillava.processor import Processor
from minillava.splice import features_per_row, splice_image_features

# each export's manifest file (minillava.interop.onnx_export.MANIFEST, gguf_export.MANIFEST): importing those
# modules would pull torch.onnx and gguf into every load
ONNX_MANIFEST, GGUF_MANIFEST = "minillava_onnx.json", "minillava_gguf.json"


@dataclass
class ExportedConfig:
    """The two fields of ModelConfig that generation reads."""

    image_token_id: int
    fusion: str = "splice"


class ExportedModel(nn.Module):
    """A model behind MiniLlava's forward signature (inference, batch-first, float32 CPU tensors in and out).

    An nn.Module only so that code written for a MiniLlava (`.eval()`, `.modules()`) runs unchanged."""

    def __init__(self, image_token_id: int, tokens_per_image: int, anyres: AnyResPacker | None = None) -> None:
        super().__init__()
        self.config = ExportedConfig(image_token_id=image_token_id)
        self.tokens_per_image = tokens_per_image
        self.anyres = anyres  # lays out each image's crops, as MiniLlava.project does

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def reserve(self, rows: int, tokens_per_row: int) -> None:
        """The next generation's batch size and longest row (prompt + new tokens), said before its prefill: a
        runtime that sizes its cache up front (llama.cpp) sizes it here; the others need nothing."""

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (I, 3, H, W) -> (I, N, D)
        raise NotImplementedError

    def text_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, D)
        raise NotImplementedError

    def embed(
        self,
        input_ids: torch.Tensor,  # (B, T)
        pixel_values: torch.Tensor | None = None,  # (I, 3, H, W); AnyRes: (C crops, 3, H, W)
        image_counts: torch.Tensor | None = None,  # (B,)
        image_sizes: torch.Tensor | None = None,  # (I, 2): AnyRes only
    ) -> torch.Tensor:  # (B, T, D)
        """Text embeddings with each image's N tokens at its N placeholders, as MiniLlava.embed."""
        features = None if pixel_values is None else self.encode_images(pixel_values)
        per_image = [] if features is None else [self.tokens_per_image] * features.shape[0]
        if self.anyres is not None and features is not None:
            if image_sizes is None:
                raise ValueError("an AnyRes model needs image_sizes, one (height, width) per image, with its pixels")
            features = self.anyres(features, image_sizes)  # (sum_i N_i, D)
            per_image = [self.anyres.layout.num_tokens((int(h), int(w))) for h, w in image_sizes.tolist()]
        elif image_sizes is not None:
            raise ValueError("image_sizes: this export has no AnyRes layout")
        per_row = None if image_counts is None else features_per_row(image_counts, per_image)
        text = self.text_embeddings(input_ids)
        return splice_image_features(input_ids, text, features, self.config.image_token_id, per_row)


def load_for_inference(
    directory: str, dtype: str = "float32", device: str | None = None, quantize: str | None = None
) -> tuple[nn.Module, Processor]:
    """(model, processor) for `Generator`, as `generate`, `eval` and `chat` load them: an ONNX export on
    onnxruntime, a GGUF export on llama.cpp, else a minillava or transformers Llava directory (int8 if asked, or
    stored by `minillava quantize`)."""
    from minillava.interop.llamacpp_runtime import load_gguf
    from minillava.interop.onnx_runtime import load_onnx
    from minillava.quantize import load

    kind = export_kind(directory)
    if kind == "onnx":
        return load_onnx(directory, dtype, quantize)
    if kind == "gguf":
        return load_gguf(directory, dtype, quantize)
    return load(directory, dtype, device, quantize=quantize)


def export_kind(directory: str | Path) -> str | None:
    """"onnx" or "gguf" for a directory written by `minillava export --format onnx|gguf` (its manifest), else None."""
    for kind, manifest in (("onnx", ONNX_MANIFEST), ("gguf", GGUF_MANIFEST)):
        if (Path(directory) / manifest).is_file():
            return kind
    return None


def is_export_dir(directory: str | Path) -> bool:
    return export_kind(directory) is not None


def read_manifest(directory: Path, kind: str, version: int) -> dict[str, Any]:
    """An export's manifest, checked to be of `kind` ("onnx" / "gguf") and no newer than `version`."""
    path = directory / (ONNX_MANIFEST if kind == "onnx" else GGUF_MANIFEST)
    manifest = json.loads(path.read_text())
    found, fmt = manifest.get("format_version"), f"minillava-{kind}"
    if manifest.get("format") != fmt or not isinstance(found, int) or found > version:
        raise ValueError(
            f"{path}: format {manifest.get('format')!r} version {found!r}; this minillava reads {fmt} up to "
            f"version {version}"
        )
    return manifest
