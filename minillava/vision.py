"""Vision tower: pixels (B, 3, H, W) -> patch features (B, P, Dv) from one hidden layer.

LLaVA-1.5 reads the penultimate layer (`select_layer=-2`) and drops the CLS token: the LLM gets one token
per image patch. The tower is frozen by default (eval mode, no gradients). It runs only the layers up to the
selected one: the demo reads DINOv2-S's layer 6 of 12, so half the tower's cost would be wasted otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, CLIPVisionModel, Dinov2Model, PreTrainedModel, SiglipVisionModel, ViTModel

from minillava.config import VisionConfig

# model_type in a checkpoint's config.json -> the transformers class holding just the image encoder.
HF_TOWERS: dict[str, type[PreTrainedModel]] = {
    "clip": CLIPVisionModel,
    "clip_vision_model": CLIPVisionModel,
    "siglip": SiglipVisionModel,
    "siglip_vision_model": SiglipVisionModel,
    "dinov2": Dinov2Model,
    "vit": ViTModel,
}
TORCHVISION_WEIGHTS = "torchvision_vit_b_16.safetensors"


class VisionTower(nn.Module):
    """Common interface over transformers encoders and torchvision's ViT."""

    hidden_size: int
    patch_grid: tuple[int, int]  # (rows, cols) of patches at the tower's input size
    prefix_tokens: int  # CLS + register tokens before the patches
    image_size: int

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if config.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"select_feature must be 'patch' or 'cls_patch', got {config.select_feature!r}")
        self.config = config

    @property
    def extra_tokens(self) -> int:
        """Tokens per image beyond the patch grid that reach the projector."""
        return self.prefix_tokens if self.config.select_feature == "cls_patch" else 0

    @property
    def num_layers(self) -> int:
        raise NotImplementedError

    @property
    def selected_layer(self) -> int:
        """`select_layer` as an index into `hidden_states` (0: the embeddings, i: after layer i)."""
        k = self.config.select_layer
        index = k if k >= 0 else self.num_layers + 1 + k
        if not 0 <= index <= self.num_layers:
            raise ValueError(f"select_layer {k} is out of range for a vision tower with {self.num_layers} layers")
        return index

    def hidden_states(self, pixel_values: torch.Tensor, layers: int | None = None) -> tuple[torch.Tensor, ...]:
        """The embeddings and the output of each layer, of the first `layers` layers only if given."""
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, P [+prefix], Dv)
        k = self.selected_layer
        # at least one layer: transformers records the embeddings' output only when a layer runs after them
        h = self.hidden_states(pixel_values, layers=max(k, 1))[k]  # (B, prefix + P, Dv)
        return h[:, self.prefix_tokens :] if self.config.select_feature == "patch" else h

    def parameters_in_use(self) -> list[nn.Parameter]:
        """The parameters the selected layer's features depend on. The layers above it and the final norms never
        reach the projector: tuned, they would get no gradient (and DDP waits for one of every trainable
        parameter). Found by one backward pass through a blank image, so it holds for any tower."""
        params = list(self.parameters())
        flags = [p.requires_grad for p in params]
        first = params[0]
        blank = torch.zeros(1, 3, self.image_size, self.image_size, dtype=first.dtype, device=first.device)
        try:
            with torch.enable_grad():
                for p in params:
                    p.requires_grad_(True)
                grads = torch.autograd.grad(self(blank).sum(), params, allow_unused=True)
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)
        return [p for p, g in zip(params, grads, strict=True) if g is not None]

    def save_pretrained(self, directory: Path) -> None:
        raise NotImplementedError


class HFVisionTower(VisionTower):
    def __init__(self, config: VisionConfig, model: PreTrainedModel) -> None:
        super().__init__(config)
        self.model = model
        vc = model.config
        self.hidden_size = vc.hidden_size
        self.image_size = config.image_size or _processor_size(model.name_or_path) or vc.image_size
        side = self.image_size // vc.patch_size
        self.patch_grid = (side, side)
        has_cls = vc.model_type not in ("siglip", "siglip_vision_model")
        self.prefix_tokens = int(has_cls) + getattr(vc, "num_register_tokens", 0)
        self.layer_list = _layer_list(model)  # found once: each forward swaps in the layers it needs

    @classmethod
    def from_dir(cls, config: VisionConfig, directory: Path, dtype: torch.dtype) -> HFVisionTower:
        model_type = AutoConfig.from_pretrained(directory).model_type
        if model_type not in HF_TOWERS:
            raise ValueError(
                f"{directory}: unsupported vision model type {model_type!r}; supported: {', '.join(HF_TOWERS)}"
            )
        return cls(config, HF_TOWERS[model_type].from_pretrained(directory, dtype=dtype))

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    def hidden_states(self, pixel_values: torch.Tensor, layers: int | None = None) -> tuple[torch.Tensor, ...]:
        kwargs = {"interpolate_pos_encoding": True} if self.image_size != self.model.config.image_size else {}
        pixel_values = pixel_values.to(self.model.dtype)
        owner, name = self.layer_list
        encoder = self.model.get_submodule(owner)
        every = getattr(encoder, name)
        # transformers runs every layer of the list: hand it the first `layers` for this call (not thread-safe:
        # one forward at a time per tower, as in training, evaluation and the server's single batching worker)
        setattr(encoder, name, every if layers is None else every[:layers])
        try:
            return self.model(pixel_values=pixel_values, output_hidden_states=True, **kwargs).hidden_states
        finally:
            setattr(encoder, name, every)

    def save_pretrained(self, directory: Path) -> None:
        self.model.save_pretrained(directory)


class TorchvisionViT(VisionTower):
    """The seed tutorial's encoder: torchvision `vit_b_16`, patch tokens of `encoder`'s layers, no CLS."""

    def __init__(self, config: VisionConfig, weights: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(config)
        try:
            from torchvision.models import vit_b_16
        except ImportError as e:
            raise ImportError(
                "the torchvision vision backend needs torchvision: pip install torch==2.14.1 torchvision==0.29.1"
            ) from e
        self.model = vit_b_16(weights=None)
        self.model.heads = nn.Identity()
        if weights is not None:
            self.model.load_state_dict(weights, strict=True)
        self.hidden_size = self.model.hidden_dim
        self.image_size = self.model.image_size
        side = self.image_size // self.model.patch_size
        self.patch_grid = (side, side)
        self.prefix_tokens = 1

    @property
    def num_layers(self) -> int:
        return len(self.model.encoder.layers)

    def hidden_states(self, pixel_values: torch.Tensor, layers: int | None = None) -> tuple[torch.Tensor, ...]:
        vit = self.model
        x = vit._process_input(pixel_values.to(vit.conv_proj.weight.dtype))  # (B, P, D)
        x = torch.cat([vit.class_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + P, D)
        x = vit.encoder.dropout(x + vit.encoder.pos_embedding)
        states = [x]
        for layer in vit.encoder.layers[:layers]:
            x = layer(x)
            states.append(x)
        return tuple(states)

    def save_pretrained(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, directory / TORCHVISION_WEIGHTS)
        (directory / "config.json").write_text(json.dumps({"backend": "torchvision", "arch": "vit_b_16"}) + "\n")


def _layer_list(model: PreTrainedModel) -> tuple[str, str]:
    """Where the encoder's layer list is: (the owning module's name, the list's attribute), e.g. ("encoder",
    "layer") in DINOv2 and ViT, ("encoder", "layers") in CLIP and SigLIP."""
    for owner, module in model.named_modules():
        for name in ("layer", "layers"):
            if isinstance(getattr(module, name, None), nn.ModuleList):
                return owner, name
    raise ValueError(f"{type(model).__name__}: no encoder layer list found")


def _processor_size(directory: str) -> int | None:
    """The input size the checkpoint's image processor crops to (DINOv2's config says 518, its recipe 224)."""
    path = Path(directory, "preprocessor_config.json")
    if not directory or not path.exists():
        return None
    cfg = json.loads(path.read_text())
    crop, size = cfg.get("crop_size"), cfg.get("size")
    for entry in (crop if cfg.get("do_center_crop", crop is not None) else None, size):
        if isinstance(entry, int):
            return entry
        if isinstance(entry, dict):
            return entry.get("height") or entry.get("shortest_edge")
    return None


def load_vision_tower(config: VisionConfig, directory: Path | None, dtype: torch.dtype) -> VisionTower:
    """`directory` is a resolved source; for torchvision, None means random init (no hub downloads)."""
    if config.backend == "torchvision":
        weights = None
        if directory is not None and (directory / TORCHVISION_WEIGHTS).exists():
            weights = load_file(directory / TORCHVISION_WEIGHTS)
        tower: VisionTower = TorchvisionViT(config, weights).to(dtype)
    elif config.backend == "hf":
        if directory is None:
            raise ValueError("the hf vision backend needs a model directory")
        tower = HFVisionTower.from_dir(config, directory, dtype)
    else:
        raise ValueError(f"unknown vision backend {config.backend!r}; use 'hf' or 'torchvision'")
    tower.requires_grad_(False)
    return tower.eval()
