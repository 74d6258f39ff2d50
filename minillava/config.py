"""Dataclass configs. A model directory's `minillava.json` is `ModelConfig.to_dict()`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CONFIG_NAME = "minillava.json"


@dataclass
class VisionConfig:
    """Which encoder reads the pixels, and which of its hidden states become image tokens."""

    source: str = "builtin:dinov2-small"
    backend: str = "hf"  # "hf" (CLIP / SigLIP / DINOv2 / ViT) or "torchvision" (vit_b_16)
    select_layer: int = -2  # LLaVA-1.5: penultimate layer
    select_feature: str = "patch"  # "patch" drops CLS/register tokens; "cls_patch" keeps them
    image_size: int | None = None  # None: the encoder's own input size


@dataclass
class ProjectorConfig:
    """The only bridge from vision features to LLM embeddings."""

    name: str = "mlp2x_gelu"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class XattnConfig:
    """Flamingo fusion (`fusion="xattn"`): a gated cross-attention block before every `every`-th decoder layer."""

    every: int = 1
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm_source: str = "builtin:smollm2-135m-instruct"
    template: str = "auto"  # "auto": the tokenizer's chat template if it has one, else vicuna_v1
    aspect: str = "pad"  # pad | resize | center_crop (with AnyRes: of the base view; LLaVA-NeXT's is resize)
    resize_backend: str = "pil"  # whose bicubic: "pil" (LLaVA's, transformers 4) or "torchvision" (transformers 5)
    # LLaVA-NeXT AnyRes: candidate canvases [height, width] in px, multiples of the tower's input size.
    # None: one crop per image. Set: a base view plus tiles, their token count set by each image's size.
    image_grid_pinpoints: list[list[int]] | None = None
    image_token: str = "<image>"
    image_token_id: int = -1  # set when the token is added to the tokenizer
    fusion: str = "splice"  # splice: N image embeddings in the text | xattn: one marker + gated cross-attention
    xattn: XattnConfig = field(default_factory=XattnConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        vision = VisionConfig(**d.pop("vision", {}))
        projector = ProjectorConfig(**d.pop("projector", {}))
        xattn = XattnConfig(**d.pop("xattn", {}))
        return cls(vision=vision, projector=projector, xattn=xattn, **d)

    def save(self, directory: str | Path) -> None:
        Path(directory, CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(directory, CONFIG_NAME).read_text()))
