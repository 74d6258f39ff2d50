"""Flamingo-style fusion: gated cross-attention blocks in front of the LLM's decoder layers.

    text hidden x (B, T, D) --x + tanh(a) * xattn(x -> latest preceding image's media)
                            --x + tanh(f) * FFN(x) --> the original decoder layer

Unlike the splice, an image stays ONE `<image>` marker token in the text; its Perceiver latents (I, L, Dm)
are read through cross-attention instead. Both tanh gates start at 0, so an untrained model computes exactly
the bare LLM's logits. A token attends only to the latest image at or before it (OpenFlamingo's
`only_attend_immediate_media`); tokens before the first image read nothing.

The wrapping is explicit and happens once, at construction: `add_xattn` replaces `layers[i]` by an
`XattnLayer(xattn_block, original_layer)`. The media travel with each forward call: transformers' decoder
models (Llama, Qwen2, OPT, ... in 5.x) hand their `**kwargs` to every decoder layer, so `MiniLlava.forward`
passes `media=` and `media_index=` to the base model and each `XattnLayer` takes them out of the kwargs before
calling the layer it wraps. No module keeps per-call state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from minillava.config import XattnConfig
from minillava.resampler import feed_forward

XATTN_WEIGHTS = "xattn.safetensors"


@dataclass
class MediaState:
    """What a KV-cached continuation needs from its prefill: the media, and each row's latest image so far."""

    media: torch.Tensor | None  # (B, M, L, D); None when the prefill had no image
    last: torch.Tensor  # (B,) row-local index of the latest image; -1: none yet


class MaskedCrossAttention(nn.Module):
    def __init__(self, dim: int, media_dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(media_dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(
        self, x: torch.Tensor, media: torch.Tensor, media_index: torch.Tensor
    ) -> torch.Tensor:  # (B, T, D), (B, M, L, Dm), (B, T) -> (B, T, D)
        q, k, v = self.qkv(x, media)
        sees, no_media = self.mask(media, media_index)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=sees)
        out = out.transpose(1, 2).flatten(2).masked_fill(no_media[..., None], 0.0)  # (B, T, H*Dh)
        return self.to_out(out)  # bias-free: a zero row stays zero

    def attention(
        self, x: torch.Tensor, media: torch.Tensor, media_index: torch.Tensor
    ) -> torch.Tensor:  # -> (B, H, T, M*L)
        """The probabilities `forward` weighs the media values with, written out because the fused kernel never
        materialises them; rows of tokens before the first image are 0, as those tokens read nothing. For
        visualisation only."""
        q, k, _ = self.qkv(x, media)
        sees, no_media = self.mask(media, media_index)
        scores = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~sees, -torch.inf)
        return scores.softmax(-1).masked_fill(no_media[:, None, :, None], 0.0)

    def qkv(
        self, x: torch.Tensor, media: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # q (B, H, T, Dh), k and v (B, H, M*L, Dh)
        q = self.to_q(self.norm(x))  # (B, T, H*Dh)
        k, v = self.to_kv(media.flatten(1, 2)).chunk(2, dim=-1)  # (B, M*L, H*Dh) each
        return tuple(t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))

    @staticmethod
    def mask(
        media: torch.Tensor, media_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:  # attention mask (B, 1, T, M*L), no media (B, T)
        """Each token sees the latents of its latest image only."""
        m, n_latents = media.shape[1:3]
        key_image = torch.arange(m, device=media.device).repeat_interleave(n_latents)  # (M*L,): the image of each key
        sees = media_index[:, :, None] == key_image  # (B, T, M*L)
        # A token before the first image would have no key at all: let it see every key (a finite softmax, no
        # NaN in backward); the caller zeroes what it reads.
        no_media = media_index < 0  # (B, T)
        return (sees | no_media[..., None])[:, None], no_media


class GatedCrossAttentionBlock(nn.Module):
    """OpenFlamingo's block: tanh-gated masked cross-attention, then a tanh-gated FFN, both residual."""

    def __init__(self, dim: int, media_dim: int, heads: int = 8, dim_head: int = 64, ff_mult: int = 4) -> None:
        super().__init__()
        self.attn = MaskedCrossAttention(dim, media_dim, heads, dim_head)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = feed_forward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self, x: torch.Tensor, media: torch.Tensor | None, media_index: torch.Tensor | None
    ) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        if media is not None:  # no image in the whole batch: every token reads nothing, as it would anyway
            x = x + self.attn(x, media, media_index) * self.attn_gate.tanh()
        return x + self.ff(x) * self.ff_gate.tanh()


class XattnLayer(nn.Module):
    """A decoder layer with a gated cross-attention block in front of it."""

    def __init__(self, xattn: GatedCrossAttentionBlock, layer: nn.Module) -> None:
        super().__init__()
        self.xattn = xattn
        self.layer = layer

    def forward(
        self,
        hidden_states: torch.Tensor,
        *args: object,
        media: torch.Tensor | None = None,
        media_index: torch.Tensor | None = None,
        **kwargs: object,
    ) -> object:
        return self.layer(self.xattn(hidden_states, media, media_index), *args, **kwargs)


# ---- wrapping the LLM -------------------------------------------------------------------------------
def decoder_layers(llm: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    """(name, list) of the LLM's decoder layers: the first ModuleList holding one module per hidden layer."""
    n = llm.config.get_text_config().num_hidden_layers
    for name, module in llm.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise ValueError(f"xattn: found no list of {n} decoder layers in {type(llm).__name__}")


def add_xattn(llm: PreTrainedModel, cfg: XattnConfig) -> None:
    """Put a zero-gated cross-attention block in front of every `cfg.every`-th decoder layer (OpenFlamingo's
    placement: layers every-1, 2*every-1, ...), in place."""
    if cfg.every < 1:
        raise ValueError(f"xattn: every must be at least 1, got {cfg.every}")
    _, layers = decoder_layers(llm)
    if any(isinstance(layer, XattnLayer) for layer in layers):
        raise ValueError("xattn: the LLM's decoder layers are already wrapped")
    embed = llm.get_input_embeddings().weight
    dim = llm.config.get_text_config().hidden_size
    for i in range(cfg.every - 1, len(layers), cfg.every):
        block = GatedCrossAttentionBlock(dim, embed.shape[1], cfg.heads, cfg.dim_head, cfg.ff_mult)
        layers[i] = XattnLayer(block.to(embed.device, embed.dtype), layers[i])


def xattn_blocks(llm: nn.Module) -> nn.ModuleDict:
    """The LLM's xattn blocks keyed by decoder layer index (empty for a splice model); a view, not a copy."""
    return nn.ModuleDict(
        {name.rsplit(".", 1)[-1]: m.xattn for name, m in llm.named_modules() if isinstance(m, XattnLayer)}
    )


def bare_llm_state(llm: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The LLM's weights under the unwrapped model's names, so `llm/` loads as the plain transformers model."""
    path, _ = decoder_layers(llm)
    prefix = re.escape(path)
    state = {}
    for key, value in llm.state_dict().items():
        if re.match(rf"{prefix}\.\d+\.xattn\.", key):
            continue
        state[re.sub(rf"^({prefix}\.\d+)\.layer\.", r"\1.", key)] = value
    return state


# ---- media ------------------------------------------------------------------------------------------
def arrange_media(
    input_ids: torch.Tensor,  # (B, T)
    features: torch.Tensor | None,  # (I, L, D): one image per `<image>` marker, in reading order over the batch
    image_token_id: int,
    images_per_row: list[int] | None = None,  # (B,) each row's images, when the caller knows them (collate does)
) -> tuple[torch.Tensor | None, torch.Tensor]:  # media (B, M, L, D), media_index (B, T)
    """Each row's images (zero-padded to M, the most in one row) and, for every token, the row-local index of
    the latest image at or before it (-1 before the first); the marker itself reads its own image.

    With `images_per_row`, every row's markers are checked against its own images: equal totals with a surplus
    in one row and a shortfall in another would hand one sample's image to another."""
    slots = input_ids == image_token_id
    n_images = 0 if features is None else features.shape[0]
    if int(slots.sum()) != n_images:
        raise ValueError(
            f"image markers and images do not match: {int(slots.sum())} <image> tokens in the text, {n_images} images"
        )
    if images_per_row is not None:
        for row, (markers, images) in enumerate(zip(slots.sum(-1).tolist(), images_per_row, strict=True)):
            if markers != images:
                raise ValueError(f"row {row}: {markers} <image> markers in the text, {images} images")
    seen = slots.long().cumsum(-1)  # (B, T): images so far in the row, the marker included
    if n_images == 0:
        return None, seen - 1
    rows, cols = slots.nonzero(as_tuple=True)  # row-major: the reading order of `features`
    media = features.new_zeros(input_ids.shape[0], int(seen[:, -1].max()), *features.shape[1:])
    media[rows, seen[rows, cols] - 1] = features
    return media, seen - 1
