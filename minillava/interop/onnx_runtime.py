"""Run a `minillava export --format onnx` directory on onnxruntime, through minillava's own generation code.

`OnnxModel` answers the calls `generate.decode` makes of a MiniLlava (a prefill with images, then one token
at a time on the KV cache) by running the three exported graphs; the splice between them is minillava's
own. So `Generator`, `minillava generate` and `minillava eval` run an export with the same prompt rendering,
left padding, positions, stop tokens and sampling as the torch model, and their answers can be compared.

    prefill:  embed_tokens(ids) (B, T, D), vision(pixels) (I, N, D) --splice--> decoder(past of length 0)
    step:     embed_tokens(token) (B, 1, D) --> decoder(past) --> logits (B, 1, V), presents (past + 1)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from minillava.interop.onnx_export import FORMAT_VERSION, MANIFEST, past_names
from minillava.model import Output, positions_from_mask
from minillava.processor import Processor
from minillava.splice import splice_image_features


def is_onnx_dir(path: str | Path) -> bool:
    """A directory written by `minillava export --format onnx` (it holds minillava_onnx.json)."""
    return (Path(path) / MANIFEST).is_file()


@dataclass
class OnnxConfig:
    """The two fields of ModelConfig that generation reads."""

    image_token_id: int
    fusion: str = "splice"


class OnnxModel(nn.Module):
    """The exported graphs behind MiniLlava's forward signature (inference, batch-first, CPU tensors in and out).

    An nn.Module with no parameters only so that code written for a MiniLlava (`.eval()`, `.modules()`) runs
    unchanged; the past travels as the decoder's flat numpy presents."""

    def __init__(self, directory: str | Path, providers: list[str] | None = None) -> None:
        super().__init__()
        import onnxruntime as ort  # optional dependency: `pip install minillava[onnx]`

        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        m = self.manifest
        self.config = OnnxConfig(image_token_id=m["image"]["token_id"])
        self.tokens_per_image = m["image"]["tokens_per_image"]
        self.quantization = (m.get("quantization") or {}).get("scheme", "none")
        providers = providers or ["CPUExecutionProvider"]
        files = {name: str(self.directory / file) for name, file in m["files"].items()}
        self.vision = ort.InferenceSession(files["vision"], providers=providers)
        self.embed_tokens = ort.InferenceSession(files["embed_tokens"], providers=providers)
        self.decoder = ort.InferenceSession(files["decoder"], providers=providers)
        dec = m["decoder"]
        self.past_names = past_names(dec["num_layers"])
        self.kv_shape = (dec["num_kv_heads"], dec["head_dim"])

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (I, 3, H, W) -> (I, N, D)
        (features,) = self.vision.run(None, {"pixel_values": _np(pixel_values, np.float32)})
        return torch.from_numpy(features)

    def embed(
        self,
        input_ids: torch.Tensor,  # (B, T)
        pixel_values: torch.Tensor | None = None,  # (I, 3, H, W)
        image_counts: torch.Tensor | None = None,  # (B,)
    ) -> torch.Tensor:  # (B, T, D)
        """Text embeddings with each image's N tokens at its N placeholders: MiniLlava.embed on the graphs."""
        (text,) = self.embed_tokens.run(None, {"input_ids": _np(input_ids, np.int64)})
        features = None if pixel_values is None else self.encode_images(pixel_values)
        per_row = None if image_counts is None else [int(c) * self.tokens_per_image for c in image_counts.tolist()]
        return splice_image_features(input_ids, torch.from_numpy(text), features, self.config.image_token_id, per_row)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: list[np.ndarray] | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        image_sizes: torch.Tensor | None = None,
        image_counts: torch.Tensor | None = None,
        **_: Any,  # media, labels ...: nothing an ONNX splice model reads
    ) -> Output:
        if image_sizes is not None:
            raise ValueError("image_sizes: AnyRes models are not exported to ONNX")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, -input_ids.shape[1] :]
        embeds = self.embed(input_ids, pixel_values, image_counts)
        past = past_key_values if past_key_values is not None else self.empty_past(input_ids.shape[0])
        feed = {
            "inputs_embeds": embeds.numpy(),
            "attention_mask": _np(attention_mask, np.int64),
            "position_ids": _np(position_ids, np.int64),
            **dict(zip(self.past_names, past, strict=True)),
        }
        logits, *presents = self.decoder.run(None, feed)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return Output(logits=torch.from_numpy(logits), past_key_values=presents if use_cache else None)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """2L arrays (B, kv_heads, 0, head_dim): the prefill's cache holds nothing yet."""
        heads, head_dim = self.kv_shape
        return [np.zeros((batch, heads, 0, head_dim), np.float32) for _ in self.past_names]


def _np(t: torch.Tensor, dtype: type) -> np.ndarray:
    return t.detach().cpu().numpy().astype(dtype, copy=False)


def read_manifest(directory: Path) -> dict[str, Any]:
    manifest = json.loads((directory / MANIFEST).read_text())
    version = manifest.get("format_version")
    if manifest.get("format") != "minillava-onnx" or not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{directory / MANIFEST}: format {manifest.get('format')!r} version {version!r}; this minillava reads "
            f"minillava-onnx up to version {FORMAT_VERSION}"
        )
    return manifest


def load_onnx(
    directory: str | Path, dtype: str = "auto", quantize: str | None = None, providers: list[str] | None = None
) -> tuple[OnnxModel, Processor]:
    """An export directory as (model, processor) for `Generator`. Its dtype and quantization were fixed at export,
    so asking for others here is an error, not a silent no-op."""
    if dtype not in ("auto", "float32"):
        raise ValueError(f"{directory}: an ONNX export runs in the dtype it was exported in (float32), not {dtype}")
    if quantize not in (None, "none"):
        raise ValueError(
            f"{directory}: an ONNX export is quantized when exported (`minillava export --format onnx --quantize "
            f"{quantize}`), not when loaded"
        )
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ImportError("running an ONNX export needs onnxruntime: pip install 'minillava[onnx]'") from None
    return OnnxModel(directory, providers).eval(), Processor.from_pretrained(directory)


def load_for_inference(
    directory: str, dtype: str = "float32", device: str | None = None, quantize: str | None = None
) -> tuple[nn.Module, Processor]:
    """(model, processor) for `Generator`, as `generate` and `eval` load them: an ONNX export on onnxruntime,
    else a minillava or transformers Llava directory (int8 if asked, or stored by `minillava quantize`)."""
    from minillava.quantize import load

    if is_onnx_dir(directory):
        return load_onnx(directory, dtype, quantize)
    return load(directory, dtype, device, quantize=quantize)
