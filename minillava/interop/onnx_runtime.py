"""Run a `minillava export --format onnx` directory on onnxruntime, through minillava's own generation code
(`minillava.interop.exported`): the three graphs answer the calls `generate.decode` makes of a MiniLlava.

    prefill:  embed_tokens(ids) (B, T, D), vision(pixels) (I, N, D) --splice--> decoder(past of length 0)
              (AnyRes: vision(crops) (C, N, D) --base view + unpadded tile map + newlines--> (sum_i N_i, D) first)
    step:     embed_tokens(token) (B, 1, D) --> decoder(past) --> logits (B, 1, V), presents (past + 1)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from minillava.anyres import AnyRes, AnyResPacker
from minillava.interop.exported import ExportedModel, export_kind, read_manifest
from minillava.interop.onnx_export import FORMAT_VERSION, past_names
from minillava.model import Output, positions_from_mask
from minillava.processor import Processor


def is_onnx_dir(path: str | Path) -> bool:
    """A directory written by `minillava export --format onnx` (it holds minillava_onnx.json)."""
    return export_kind(path) == "onnx"


class OnnxModel(ExportedModel):
    """The exported graphs behind MiniLlava's forward signature; the past travels as the decoder's flat numpy
    presents."""

    def __init__(self, directory: str | Path, providers: list[str] | None = None) -> None:
        import onnxruntime as ort  # optional dependency: `pip install minillava[onnx]`

        directory = Path(directory)
        m = read_manifest(directory, "onnx", FORMAT_VERSION)
        super().__init__(m["image"]["token_id"], m["image"]["tokens_per_image"], _anyres(directory, m))
        self.directory, self.manifest = directory, m
        self.quantization = (m.get("quantization") or {}).get("scheme", "none")
        providers = providers or ["CPUExecutionProvider"]
        files = {name: str(self.directory / file) for name, file in m["files"].items()}
        self.vision = ort.InferenceSession(files["vision"], providers=providers)
        self.embed_tokens = ort.InferenceSession(files["embed_tokens"], providers=providers)
        self.decoder = ort.InferenceSession(files["decoder"], providers=providers)
        dec = m["decoder"]
        self.past_names = past_names(dec["num_layers"])
        self.kv_shape = (dec["num_kv_heads"], dec["head_dim"])

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (I, 3, H, W) -> (I, N, D)
        (features,) = self.vision.run(None, {"pixel_values": _np(pixel_values, np.float32)})
        return torch.from_numpy(features)

    def text_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, D)
        (text,) = self.embed_tokens.run(None, {"input_ids": _np(input_ids, np.int64)})
        return torch.from_numpy(text)

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
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, -input_ids.shape[1] :]
        embeds = self.embed(input_ids, pixel_values, image_counts, image_sizes)
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


def _anyres(directory: Path, m: dict[str, Any]) -> AnyResPacker | None:
    """The AnyRes layout and learned newline of an export that has them."""
    if not m.get("anyres"):
        return None
    newline = load_file(directory / m["files"]["anyres_newline"])["image_newline"]
    packer = AnyResPacker(AnyRes.from_dict(m["anyres"]), newline.shape[0])
    packer.image_newline.data.copy_(newline)
    return packer.requires_grad_(False).eval()


def _np(t: torch.Tensor, dtype: type) -> np.ndarray:
    return t.detach().cpu().numpy().astype(dtype, copy=False)


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
