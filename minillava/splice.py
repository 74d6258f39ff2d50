"""The splice: the LLM reads an image as a run of tokens.

The processor put N placeholder ids (the `<image>` token) where each image goes; here the embeddings at
those positions are replaced, in order, by the projected image features, in one vectorised scatter.
"""

from __future__ import annotations

import torch


def splice_image_features(
    input_ids: torch.Tensor,  # (B, T)
    text_embeds: torch.Tensor,  # (B, T, D)
    image_features: torch.Tensor | None,  # (num_images, N, D), or (sum_i N_i, D) for AnyRes; in reading order
    image_token_id: int,
) -> torch.Tensor:  # (B, T, D)
    slots = input_ids == image_token_id  # (B, T)
    n_slots = int(slots.sum())
    n_features = 0 if image_features is None else image_features[..., 0].numel()
    if n_slots != n_features:
        raise ValueError(
            f"image tokens and image features do not match: {n_slots} placeholder tokens in the text, "
            f"{n_features} image feature vectors"
        )
    if image_features is None or n_slots == 0:
        return text_embeds
    # masked_scatter fills True positions row-major, i.e. batch order then position order: the first
    # image of the first sample first, exactly the order the processor emitted pixel_values in.
    feats = image_features.to(text_embeds.dtype).reshape(-1, text_embeds.shape[-1])
    return text_embeds.masked_scatter(slots.unsqueeze(-1), feats)
