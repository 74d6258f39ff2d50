"""Attention on image tokens, for each generated token, per layer and per head.

Greedy generation runs on the normal fast path. Then one eager-attention forward of the whole sequence
(prompt + answer) with `output_attentions=True` gives every layer's attention probabilities; the row of
the query that predicted generated token k (position T_prompt - 1 + k) says how much of its attention went
to the image tokens. The projector's `token_to_patch_weights` spreads each image token's share back over
the patches it was made from, which places that attention on the picture.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from minillava.generate import GenerationConfig, Generator, decode
from minillava.images import ImageInput
from minillava.model import MiniLlava, positions_from_mask
from minillava.processor import Encoded, Processor


@dataclass
class Visualization:
    prompt: str
    answer: str  # the generated text, special tokens dropped
    tokens: list[str]  # each generated token as text, a final stop token included
    token_ids: list[int]
    input_ids: list[int]  # the whole sequence: prompt + generated tokens
    image_span: tuple[int, int]  # [start, end) of the image tokens in input_ids
    query_positions: list[int]  # the position whose attention predicted each generated token
    attention_rows: torch.Tensor  # (L, H, G, T) eager attention probabilities of those queries
    image_share: torch.Tensor  # (G, L, H) attention mass on the image tokens
    heatmaps: torch.Tensor  # (G, R, C) attention mass on each patch, mean over layers and heads
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


def visualize(
    model: MiniLlava,
    processor: Processor,
    image: ImageInput,
    prompt: str,
    max_new_tokens: int = 16,
    raw: bool = False,
) -> Visualization:
    """Generate greedily about one image, then measure where each generated token's attention went."""
    encoded = Generator(model, processor).encode(prompt, [image], raw)
    start, end = image_span(encoded.input_ids, processor.image_token_id)
    pixels = encoded.pixel_values.to(model.device)  # (1, 3, S, S)
    generated = greedy_tokens(model, processor, encoded, max_new_tokens)
    ids = encoded.input_ids + generated
    queries = list(range(len(encoded.input_ids) - 1, len(ids) - 1))
    with torch.inference_mode():
        features = model.vision(pixels).to(model.projector_dtype)  # (1, P, Dv)
        weights = patch_weights(model, features)  # (N, R*C)
        rows = attention_rows(model, torch.tensor([ids], device=model.device), model.projector(features), queries)
    on_image = rows[..., start:end]  # (L, H, G, N)
    heat = on_image.mean(dim=(0, 1)) @ weights  # (G, R*C)
    tokenizer = processor.tokenizer
    transform = processor.image_transform
    mean, std = torch.tensor(transform.mean), torch.tensor(transform.std)
    return Visualization(
        prompt=prompt,
        answer=tokenizer.decode(generated, skip_special_tokens=True),
        tokens=[tokenizer.decode([t]) for t in generated],
        token_ids=generated,
        input_ids=ids,
        image_span=(start, end),
        query_positions=queries,
        attention_rows=rows,
        image_share=on_image.sum(-1).permute(2, 0, 1),  # (G, L, H)
        heatmaps=heat.reshape(len(generated), *model.vision.patch_grid),
        image=(pixels[0].float().cpu().permute(1, 2, 0) * std + mean).clamp(0, 1),
        projector=model.projector.name,
    )


def patch_weights(model: MiniLlava, features: torch.Tensor) -> torch.Tensor:  # (1, P, Dv) -> (N, R*C)
    grid, extra = model.vision.patch_grid, model.vision.extra_tokens
    weights = model.projector.token_to_patch_weights(grid, extra, features).float().cpu()
    expected = (model.tokens_per_image, grid[0] * grid[1])
    if tuple(weights.shape) != expected:
        raise ValueError(
            f"projector {model.projector.name}: token_to_patch_weights gave {tuple(weights.shape)}, expected {expected}"
        )
    return weights
