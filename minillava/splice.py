"""The splice: the LLM reads an image as a run of tokens.

The processor put N placeholder ids (the `<image>` token) where each image goes; here the embeddings at
those positions are replaced, in order, by the projected image features, in one vectorised scatter.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch


def splice_image_features(
    input_ids: torch.Tensor,  # (B, T)
    text_embeds: torch.Tensor,  # (B, T, D)
    image_features: torch.Tensor | None,  # (num_images, N, D), or (sum_i N_i, D) for AnyRes; in reading order
    image_token_id: int,
    features_per_row: Sequence[int] | None = None,  # feature vectors of each row's own images
) -> torch.Tensor:  # (B, T, D)
    """`features_per_row` (from the batch's per-row image counts) makes the check per row: with only the total
    checked, a row with too many slots next to one with too few would take the other sample's image."""
    slots = input_ids == image_token_id  # (B, T)
    n_slots = int(slots.sum())
    n_features = 0 if image_features is None else image_features[..., 0].numel()
    if n_slots != n_features:
        raise ValueError(
            f"image tokens and image features do not match: {n_slots} placeholder tokens in the text, "
            f"{n_features} image feature vectors"
        )
    if features_per_row is not None:
        check_rows(slots.sum(-1).tolist(), list(features_per_row))
    if image_features is None or n_slots == 0:
        return text_embeds
    # masked_scatter fills True positions row-major, i.e. batch order then position order: the first
    # image of the first sample first, exactly the order the processor emitted pixel_values in.
    feats = image_features.to(text_embeds.dtype).reshape(-1, text_embeds.shape[-1])
    return text_embeds.masked_scatter(slots.unsqueeze(-1), feats)


def features_per_row(image_counts: torch.Tensor, per_image: list[int]) -> list[int]:
    """Image feature vectors that belong to each row: (B,) image counts and each image's token count, images in
    reading order."""
    counts = [int(c) for c in image_counts.tolist()]
    if sum(counts) != len(per_image):
        raise ValueError(f"the rows' image counts add up to {sum(counts)} images, but {len(per_image)} were given")
    ends = itertools.accumulate(counts)
    return [sum(per_image[end - n : end]) for n, end in zip(counts, ends, strict=True)]


def check_rows(slots_per_row: list[int], features_per_row: list[int]) -> None:
    """Each row's placeholder slots must be exactly its own images' feature vectors."""
    if len(slots_per_row) != len(features_per_row):
        raise ValueError(f"{len(features_per_row)} per-row image feature counts for a batch of {len(slots_per_row)}")
    for row, (n_slots, n_features) in enumerate(zip(slots_per_row, features_per_row, strict=True)):
        if n_slots != n_features:
            raise ValueError(
                f"row {row}: {n_slots} image placeholder tokens in the text, {n_features} image feature vectors"
            )
