"""Export a MiniLlava to ONNX as the three-graph split that VLM runtimes consume (SmolVLM's layout):

    vision.onnx        pixel_values (B, 3, H, W) --tower, feature selection, projector--> image tokens (B, N, D)
    anyres.safetensors with AnyRes only: the learned `image_newline` (D,); the runtime lays each image's crops
                       out (base view, then the unpadded tile map with a newline ending each row), as the manifest
                       says, so an image's token count follows its size
    embed_tokens.onnx  input_ids (B, T) --the LLM's input embedding--> (B, T, D)
    decoder.onnx       inputs_embeds (B, T, D), attention_mask (B, past + T), position_ids (B, T),
                       past_key_values.{i}.key / .value (B, kv_heads, past, head_dim)
                       --causal LM--> logits (B, T, V), present.{i}.key / .value (B, kv_heads, past + T, head_dim)

The splice between the first two and the decoder stays outside the graphs, as in SmolVLM: each `<image>`
placeholder's embedding is replaced by the image tokens, in order (minillava_onnx.json says so for other
runtimes; `minillava.interop.onnx_runtime` does it for `minillava generate` / `eval`). The tokenizer and
minillava's processor config go beside the graphs, so prompts are rendered exactly as minillava renders them.

What has no such split is refused with `ExportError`: xattn fusion (the image is cross-attended inside the
decoder, not spliced) and LLMs with sliding-window or non key/value caches. LoRA adapters are merged first.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from minillava.fileio import atomic_dir
from minillava.generate import stop_token_ids
from minillava.interop.exported import ONNX_MANIFEST
from minillava.interop.hf import ExportError, _merged_llm
from minillava.model import MiniLlava, _cache_keyword
from minillava.processor import PROCESSOR_CONFIG, Processor

FORMAT_VERSION = 1
MANIFEST = ONNX_MANIFEST
VISION, EMBED, DECODER, NEWLINE = "vision.onnx", "embed_tokens.onnx", "decoder.onnx", "anyres.safetensors"
QUANT_SCHEMES = ("none", "int8")
OPSET = 18
SUPPORTED = "fusion splice (AnyRes too), any projector, LLMs with a plain key/value cache"
# protobuf caps a single file at 2 GiB: bigger graphs keep their weights in a `.data` file beside them
SINGLE_FILE_BYTES = 1_500_000_000
INT8_BLOCK = 32  # inputs per weight scale in the int8 decoder


def export_onnx(model: MiniLlava, processor: Processor, out_dir: str | Path, quantize: str | None = None) -> Path:
    """Write vision.onnx, embed_tokens.onnx, decoder.onnx, the processor (tokenizer included) and the manifest."""
    scheme = "none" if quantize is None else quantize
    if scheme not in QUANT_SCHEMES:
        raise ExportError(f"unknown ONNX quantization {quantize!r}; use one of {', '.join(QUANT_SCHEMES)}")
    check_exportable(model)
    model = _float32_cpu(model)
    llm = _merged_llm(model.llm)
    out_dir = Path(out_dir)
    with _eval_mode(model, llm), atomic_dir(out_dir) as tmp:
        cache = cache_layout(llm)
        export_vision(model, tmp / VISION)
        if model.anyres is not None:
            save_file({"image_newline": model.anyres.image_newline.detach().contiguous()}, tmp / NEWLINE)
        export_embed(llm, tmp / EMBED)
        export_decoder(llm, cache, tmp / DECODER)
        if scheme == "int8":
            quantize_int8(tmp / DECODER)
        processor.save_pretrained(tmp)
        manifest = build_manifest(model, processor, llm, cache, scheme)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def check_exportable(model: MiniLlava) -> None:
    """Refuse, in one line naming what is supported, what the three-graph split cannot express."""
    if model.config.fusion != "splice":
        raise ExportError(f"fusion {model.config.fusion!r} cannot be exported to ONNX; supported: {SUPPORTED}")
    layer_types = getattr(model.llm.config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ExportError(
            f"LLM layer types {sorted(set(layer_types))} cannot be exported to ONNX; supported: {SUPPORTED}"
        )


def _float32_cpu(model: MiniLlava) -> MiniLlava:
    """ONNX graphs are written in float32 on the CPU; a copy when the model is elsewhere, so the caller's stays."""
    if model.dtype == torch.float32 and model.device.type == "cpu":
        return model
    return copy.deepcopy(model).to("cpu", torch.float32)


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Export the inference graph (no dropout), then give every submodule its mode back: a caller may be training."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Errors only from a library logger for the duration: exporting is chatty."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---- the three graphs -------------------------------------------------------------------------------------


class VisionGraph(nn.Module):
    """pixel_values (B, 3, H, W) -> image tokens (B, N, D): MiniLlava.encode_images, crop by crop with AnyRes (whose
    layout of the crops is the runtime's)."""

    def __init__(self, model: MiniLlava) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.model.vision(pixel_values)
        return self.model.projector(features.to(self.model.projector_dtype))


class EmbedGraph(nn.Module):
    """input_ids (B, T) -> (B, T, D): the LLM's input embedding, which MiniLlava.embed splices into."""

    def __init__(self, embedding: nn.Module) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)


class DecoderGraph(nn.Module):
    """The causal LM on flat cache tensors: ONNX has no cache object, so the past comes in as 2L tensors
    (key, value per layer), becomes a DynamicCache for the LLM, and the updated cache goes out flat again."""

    def __init__(self, llm: PreTrainedModel) -> None:
        super().__init__()
        self.base = llm.base_model
        self.head = llm.get_output_embeddings()
        self.cap = getattr(llm.config, "final_logit_softcapping", None)  # as MiniLlava.lm_head
        self.cache_kw = _cache_keyword(type(self.base))

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # (B, T, D)
        attention_mask: torch.Tensor,  # (B, past + T), 0 on left padding
        position_ids: torch.Tensor,  # (B, T), counting real tokens only
        past: tuple[torch.Tensor, ...],  # 2L x (B, kv_heads, past, head_dim): key, value of layer 0, 1, ...
    ) -> tuple[torch.Tensor, ...]:  # logits (B, T, V), then 2L presents (B, kv_heads, past + T, head_dim)
        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2], strict=True)))
        out = self.base(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=True, **{self.cache_kw: cache})  # fmt: skip
        logits = self.head(out.last_hidden_state)
        if self.cap:
            logits = torch.tanh(logits / self.cap) * self.cap
        return (logits, *flat_cache(getattr(out, self.cache_kw)))


def flat_cache(cache: DynamicCache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def cache_layout(llm: PreTrainedModel) -> dict[str, int]:
    """Layers, kv heads and head dim as the LLM's own cache holds them (read from one token, not the config:
    configs spell head_dim and kv heads differently across architectures)."""
    base = llm.base_model
    embeds = torch.zeros(1, 1, llm.get_input_embeddings().embedding_dim)
    with torch.no_grad():
        out = base(inputs_embeds=embeds, use_cache=True, **{_cache_keyword(type(base)): DynamicCache()})
    cache = getattr(out, _cache_keyword(type(base)))
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        raise ExportError(f"the LLM's cache ({type(cache).__name__}) is not per-layer keys and values; "
                          f"supported: {SUPPORTED}")  # fmt: skip
    shapes = {tuple(t.shape) for t in flat_cache(cache)}
    if len(shapes) != 1:
        raise ExportError(f"the LLM's cache layers differ in shape {sorted(shapes)}; supported: {SUPPORTED}")
    _, heads, _, head_dim = shapes.pop()
    return {"num_layers": len(layers), "num_kv_heads": heads, "head_dim": head_dim}


def past_names(num_layers: int, prefix: str = "past_key_values") -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def _export(module: nn.Module, args: tuple, path: Path, names: tuple[list[str], list[str]], dynamic: Any) -> None:
    """torch.export-based (dynamo) ONNX export; weights in the file unless protobuf's 2 GiB cap forbids it."""
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    # the exporter warns at WARNING that torchvision's ops cannot be registered when torchvision is absent
    with torch.no_grad(), warnings.catch_warnings(), _quiet("torch.onnx._internal.exporter._registration"):
        # dims that torch.export proves equal (e.g. every graph input's batch) keep one name; nothing to act on
        warnings.filterwarnings("ignore", message=".*axis name: .* will not be used", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)  # torch's own internals
        torch.onnx.export(
            module, args, str(path), dynamo=True, input_names=names[0], output_names=names[1],
            dynamic_shapes=dynamic, opset_version=OPSET, external_data=size > SINGLE_FILE_BYTES, verbose=False,
        )  # fmt: skip


def export_vision(model: MiniLlava, path: Path) -> None:
    size = model.vision.image_size
    pixels = torch.zeros(2, 3, size, size)  # batch 2: a size-1 example would be specialised to 1
    _export(VisionGraph(model).eval(), (pixels,), path, (["pixel_values"], ["image_features"]), ({0: "batch"},))


def export_embed(llm: PreTrainedModel, path: Path) -> None:
    ids = torch.zeros(2, 3, dtype=torch.long)
    _export(EmbedGraph(llm.get_input_embeddings()).eval(), (ids,), path, (["input_ids"], ["inputs_embeds"]),
            ({0: "batch", 1: "sequence"},))  # fmt: skip


def export_decoder(llm: PreTrainedModel, cache: dict[str, int], path: Path) -> None:
    batch, seq, past = 2, 3, 2  # all above 1, so torch.export keeps them symbolic
    n = cache["num_layers"]
    embeds = torch.zeros(batch, seq, llm.get_input_embeddings().embedding_dim)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq)[None].expand(batch, seq)
    kv = tuple(torch.zeros(batch, cache["num_kv_heads"], past, cache["head_dim"]) for _ in range(2 * n))
    inputs = ["inputs_embeds", "attention_mask", "position_ids", *past_names(n)]
    outputs = ["logits", *past_names(n, "present")]
    dynamic = (
        {0: "batch", 1: "sequence"},
        {0: "batch", 1: "total_sequence"},
        {0: "batch", 1: "sequence"},
        tuple({0: "batch", 2: "past_sequence"} for _ in range(2 * n)),
    )
    _export(DecoderGraph(llm).eval(), (embeds, mask, positions, kv), path, (inputs, outputs), dynamic)


def quantize_int8(path: Path) -> None:
    """Weight-only int8 for the decoder's MatMuls (onnxruntime's MatMulNBits, 8 bits): symmetric int8 weights
    with a float scale per output channel and block of INT8_BLOCK inputs, float32 activations and accumulation.

    Not `quantize_dynamic`, which also rounds the activations to 8 bits per tensor: on SmolLM2-135M it moved the
    next-token logits by 5-115 % (relative L2, one prompt's positions) against 1-3 % for this (docs/deploy.md).
    Only the decoder: it is what each new token reads; the embedding is a gather of T rows."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(path)), bits=8, block_size=INT8_BLOCK, is_symmetric=True,
        accuracy_level=1,  # 1: float32 compute (4 would quantize the activations too)
        op_types_to_quantize=("MatMul",),
    )  # fmt: skip
    with _quiet("onnxruntime.quantization.matmul_nbits_quantizer"):  # a line per node at INFO
        quantizer.process()
    external = path.with_name(path.name + ".data").exists()  # torch's name for weights kept beside the graph
    for stale in path.parent.glob(path.name + "*"):
        stale.unlink()
    quantizer.model.save_model_to_file(str(path), use_external_data_format=external)


# ---- the manifest -------------------------------------------------------------------------------------------


def build_manifest(
    model: MiniLlava, processor: Processor, llm: PreTrainedModel, cache: dict[str, int], scheme: str
) -> dict[str, Any]:
    """What a runtime needs beyond the graphs: how to splice, when to stop, how the cache is laid out."""
    tok = processor.tokenizer
    transform = processor.image_transform
    return {
        "format": "minillava-onnx",
        "format_version": FORMAT_VERSION,
        "files": {"vision": VISION, "embed_tokens": EMBED, "decoder": DECODER,
                  **({"anyres_newline": NEWLINE} if model.anyres is not None else {})},  # fmt: skip
        "dtype": "float32",
        "quantization": None if scheme == "none" else _quantization_info(scheme),
        "image": {
            "token": processor.image_token,
            "token_id": processor.image_token_id,
            "tokens_per_image": model.tokens_per_image,
            "size": transform.size,
            "mean": list(transform.mean),
            "std": list(transform.std),
            "aspect": transform.aspect,
            "resize_backend": transform.resize_backend,
        },
        "splice": "the processor expands each <image> to tokens_per_image placeholder ids (image.token_id); replace "
        "the embedding at each placeholder, in order (row-major over the batch), with vision.onnx's image tokens, "
        "image 0's tokens first",
        "anyres": None if model.anyres is None else {
            **model.anyres.layout.to_dict(),
            "layout": "each image is cut into a base view and a grid of tiles (minillava.anyres.AnyRes.cut_tiles); its "
            "tokens are the base view's, then the tiles' tokens as one map of the image (tile rows x grid rows, "
            "tile columns x grid columns), cropped to the image's unpadded area, each row followed by image_newline",
        },  # fmt: skip
        "decoder": {
            **cache,
            "hidden_size": llm.get_input_embeddings().embedding_dim,
            "vocab_size": llm.get_output_embeddings().out_features,
            "position_ids": "per row, the number of attention_mask ones before each position (left padding ignored)",
            "empty_past": "past_key_values.* of shape (B, num_kv_heads, 0, head_dim) for the first call",
        },
        "chat_template": processor.template.name,
        "eos_token_ids": stop_token_ids(processor),
        "pad_token_id": processor.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "tokenizer": "llm",
        "processor_config": PROCESSOR_CONFIG,
    }


def _quantization_info(scheme: str) -> dict[str, Any]:
    return {
        "scheme": scheme,
        "method": "onnxruntime MatMulNBits, weight-only",
        "bits": 8,
        "block_size": INT8_BLOCK,  # a float scale per output channel and block of this many inputs
        "symmetric": True,
        "activations": "float32",
        "graphs": ["decoder"],
    }
