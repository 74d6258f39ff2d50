"""Where each generated token looks in the image: per layer and per head, then back onto the patch grid.

Greedy generation runs on the normal fast path; then the whole sequence (prompt + answer) goes through the
model once more to measure, at the query that predicted generated token k (position T_prompt - 1 + k):

- splice (`fusion="splice"`): the image is a run of N tokens in the sequence. One eager-attention forward
  with `output_attentions=True` gives every layer's attention probabilities; their mass on the image tokens
  is the image share.
- xattn (`fusion="xattn"`): the image is one marker token and gated cross-attention blocks read its
  resampler latents. Each block's cross-attention probabilities over the latents, tanh of its gate, and the
  size of what it adds relative to the residual stream it adds to, are recomputed from the block's input.

Either way the projector's `token_to_patch_weights` spreads the attention on each image token (or latent) over
the patches it came from (the Perceiver's own attention maps), which places it on the picture.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from minillava.generate import GenerationConfig, Generator, decode
from minillava.images import ImageInput
from minillava.model import MiniLlava, positions_from_mask
from minillava.processor import Encoded, Processor


@dataclass
class SpliceAttention:
    """The image is a run of tokens in the sequence; the LLM's own attention on them."""

    mode: ClassVar[str] = "splice"
    image_span: tuple[int, int]  # [start, end) of the image tokens in the sequence
    attention_rows: torch.Tensor  # (L, H, G, T) eager attention probabilities of the query positions
    image_share: torch.Tensor  # (G, L, H) attention mass on the image tokens


@dataclass
class XattnAttention:
    """The image is one marker token; X gated cross-attention blocks read its Lat resampler latents."""

    mode: ClassVar[str] = "xattn"
    layers: list[int]  # the decoder layer each block sits in front of
    latent_attention: torch.Tensor  # (G, X, H, Lat) cross-attention probabilities over the image's latents
    gate: torch.Tensor  # (X,) tanh(attn_gate): the factor the block's cross-attention output is scaled by
    relative_norm: torch.Tensor  # (G, X) |tanh(gate) * xattn(x)| / |x| at the query: how much the image adds


@dataclass
class Visualization:
    prompt: str
    answer: str  # the generated text, special tokens dropped
    tokens: list[str]  # each generated token as text, a final stop token included
    token_ids: list[int]
    input_ids: list[int]  # the whole sequence: prompt + generated tokens
    query_positions: list[int]  # the position whose attention predicted each generated token
    attention: SpliceAttention | XattnAttention
    heatmaps: torch.Tensor  # (G, R, C) attention mass on each patch, mean over layers (blocks) and heads
    image: torch.Tensor  # (S, S, 3) in [0, 1]: the picture as the vision tower saw it (resized, padded)
    projector: str


@contextlib.contextmanager
def eager_attention(llm: PreTrainedModel) -> Iterator[None]:
    """Only eager attention materialises the probabilities; the fast implementation is restored after."""
    before = llm.config._attn_implementation
    llm.set_attn_implementation("eager")
    if llm.config._attn_implementation != "eager":
        raise ValueError(f"{type(llm).__name__} cannot switch to eager attention, which viz needs")
    try:
        yield
    finally:
        llm.set_attn_implementation(before)


def image_span(input_ids: list[int], image_token_id: int) -> tuple[int, int]:
    """[start, end) of the one image's run of placeholder tokens."""
    slots = [i for i, t in enumerate(input_ids) if t == image_token_id]
    if not slots:
        raise ValueError("the sequence holds no image tokens: this model does not read the image in its input")
    if slots[-1] - slots[0] + 1 != len(slots):
        raise ValueError("viz shows one image: the sequence holds more than one run of image tokens")
    return slots[0], slots[-1] + 1


def greedy_tokens(model: MiniLlava, processor: Processor, encoded: Encoded, n: int) -> list[int]:
    """Up to n tokens on the normal (fast-attention, KV-cached) path; a stop token ends the list."""
    batch = processor.collate([encoded], padding_side="left")
    stop_ids = Generator(model, processor).stop_ids
    steps = decode(model, batch, GenerationConfig(max_new_tokens=n), stop_ids, processor.pad_token_id)
    return [int(token[0]) for token, _ in steps]


@torch.inference_mode()
def attention_rows(
    model: MiniLlava, input_ids: torch.Tensor, image_features: torch.Tensor, queries: list[int]
) -> torch.Tensor:  # (1, T) -> (L, H, G, T)
    """Every layer's eager attention probabilities at the query positions, over all keys."""
    mask = torch.ones_like(input_ids)
    embeds = model.embed(input_ids, image_features=image_features)  # (1, T, D)
    with eager_attention(model.llm):
        out = model.llm.base_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask), output_attentions=True
        )
    return torch.stack([a[0, :, queries].float().cpu() for a in out.attentions])


@contextlib.contextmanager
def block_inputs(blocks: nn.ModuleDict) -> Iterator[dict[str, tuple[torch.Tensor, ...]]]:
    """The (x, media, media_index) each xattn block is called with during the forward run inside; filled by
    forward pre-hooks that are removed on exit. The blocks' inputs exist only inside the LLM's forward, and
    transformers' `output_hidden_states` records the wrapped decoder layer's input: the block's output."""
    seen: dict[str, tuple[torch.Tensor, ...]] = {}

    def recorder(name: str):
        return lambda _module, args: seen.__setitem__(name, args)

    handles = [block.register_forward_pre_hook(recorder(name)) for name, block in blocks.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def xattn_attention(
    model: MiniLlava, input_ids: torch.Tensor, latents: torch.Tensor, queries: list[int]
) -> XattnAttention:  # (1, T), (1, Lat, D)
    """One fast-attention forward of the whole sequence, then each block's cross-attention probabilities and
    gated output at the query positions, recomputed explicitly from the input it had there."""
    blocks = model.xattn
    with block_inputs(blocks) as inputs:
        model(input_ids, image_features=latents, return_logits=False)
    probs, norms = [], []
    for name, block in blocks.items():
        x, media, media_index = inputs[name]  # (1, T, D), (1, 1, Lat, D), (1, T)
        x, media_index = x[:, queries], media_index[:, queries]  # (1, G, D), (1, G)
        probs.append(block.attn.attention(x, media, media_index)[0])  # (H, G, Lat): one image, Lat keys
        added = block.attn(x, media, media_index) * block.attn_gate.tanh()  # (1, G, D)
        norms.append((added.float().norm(dim=-1) / x.float().norm(dim=-1))[0])  # (G,)
    return XattnAttention(
        layers=[int(name) for name in blocks],
        latent_attention=torch.stack(probs).permute(2, 0, 1, 3).float().cpu(),  # (G, X, H, Lat)
        gate=torch.cat([block.attn_gate.tanh() for block in blocks.values()]).float().cpu(),
        relative_norm=torch.stack(norms, 1).cpu(),  # (G, X)
    )


def visualize(
    model: MiniLlava,
    processor: Processor,
    image: ImageInput,
    prompt: str,
    max_new_tokens: int = 16,
    raw: bool = False,
) -> Visualization:
    """Generate greedily about one image, then measure where each generated token's attention went."""
    if model.anyres is not None:  # tiles + base view + row newlines: no single patch grid to draw back on
        raise ValueError("viz does not support AnyRes models yet (several crops per image); use a single-crop model")
    encoded = Generator(model, processor).encode(prompt, [image], raw)
    xattn = model.config.fusion == "xattn"
    span = None if xattn else image_span(encoded.input_ids, processor.image_token_id)  # fail before generating
    pixels = encoded.pixel_values.to(model.device)  # (1, 3, S, S)
    generated = greedy_tokens(model, processor, encoded, max_new_tokens)
    ids = encoded.input_ids + generated
    queries = list(range(len(encoded.input_ids) - 1, len(ids) - 1))
    with torch.inference_mode():
        features = model.vision(pixels).to(model.projector_dtype)  # (1, P, Dv)
        weights = patch_weights(model, features)  # (N, R*C): N image tokens, or latents under xattn
        tokens = model.projector(features)  # (1, N, D)
        ids_t = torch.tensor([ids], device=model.device)
        if xattn:
            attention = xattn_attention(model, ids_t, tokens, queries)
            on_tokens = attention.latent_attention.mean(dim=(1, 2))  # (G, Lat)
        else:
            rows = attention_rows(model, ids_t, tokens, queries)  # (L, H, G, T)
            on_image = rows[..., span[0] : span[1]]  # (L, H, G, N)
            attention = SpliceAttention(span, rows, on_image.sum(-1).permute(2, 0, 1))
            on_tokens = on_image.mean(dim=(0, 1))  # (G, N)
    tokenizer = processor.tokenizer
    transform = processor.image_transform
    mean, std = torch.tensor(transform.mean), torch.tensor(transform.std)
    return Visualization(
        prompt=prompt,
        answer=tokenizer.decode(generated, skip_special_tokens=True),
        tokens=[tokenizer.decode([t]) for t in generated],
        token_ids=generated,
        input_ids=ids,
        query_positions=queries,
        attention=attention,
        heatmaps=(on_tokens @ weights).reshape(len(generated), *model.vision.patch_grid),
        image=(pixels[0].float().cpu().permute(1, 2, 0) * std + mean).clamp(0, 1),
        projector=model.projector.name,
    )


def patch_weights(model: MiniLlava, features: torch.Tensor) -> torch.Tensor:  # (1, P, Dv) -> (N, R*C)
    grid, extra = model.vision.patch_grid, model.vision.extra_tokens
    weights = model.projector.token_to_patch_weights(grid, extra, features).float().cpu()
    expected = (model.projector.num_tokens(grid, extra), grid[0] * grid[1])
    if tuple(weights.shape) != expected:
        raise ValueError(
            f"projector {model.projector.name}: token_to_patch_weights gave {tuple(weights.shape)}, expected {expected}"
        )
    return weights
