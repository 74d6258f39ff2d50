"""The frozen vision tower's features, as training reads them: from the feature cache or the tower (then cached).

    vision_features_for   one training batch's crop features (the step loop)
    frozen_features       features of chosen samples, a chunk at a time (the steps before training)
    fit_feature_stats     the projector's input standardisation, fitted on those features
    open_feature_cache    the run's feature cache, where one applies

The step loop (loop.py) and the word-space warm start (warmstart.py) both import from here, not from each other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from minillava.data.dataset import Collator, SupervisedDataset
from minillava.model import MiniLlava
from minillava.processor import Processor
from minillava.train.cache import FeatureCache, namespace_for
from minillava.train.config import TrainConfig

T = TypeVar("T")


def open_feature_cache(cfg: TrainConfig, model: MiniLlava, processor: Processor, rank: int,
                       say: Callable[[str], None]) -> FeatureCache | None:  # fmt: skip
    """The --feature-cache of a run whose tower is frozen and gives every image one crop, else None."""
    if not cfg.feature_cache:
        return None
    if cfg.tune_vision:
        say("--feature-cache is ignored with --tune-vision (the tower's features change as it trains)")
        return None
    if model.anyres is not None:
        say("--feature-cache is ignored with AnyRes (each image has its own number of crops)")
        return None
    feature_dtype = next(model.vision.parameters()).dtype  # after --frozen-bf16: the cache keys on it
    cache = FeatureCache(cfg.feature_cache, namespace_for(model.vision, processor.image_transform, feature_dtype),
                         rank=rank)  # fmt: skip
    say(f"feature cache {cache.dir}: {len(cache)} images cached")
    return cache


def vision_features_for(batch: dict, model: MiniLlava, cache: FeatureCache | None, device: torch.device,
                        tune_vision: bool, stats: dict) -> torch.Tensor | None:  # fmt: skip
    """(C, P, Dv) features of the batch's image crops, from the cache or from the frozen tower (then cached)."""
    feats: list[torch.Tensor | None] = batch.get("features") or []
    if not feats or tune_vision:
        return None
    if cache is None:  # also AnyRes, whose images have several crops each
        with torch.no_grad():
            return model.vision(batch["pixel_values"].to(device))
    missing = [i for i, f in enumerate(feats) if f is None]
    stats["hits"] += len(feats) - len(missing)
    stats["misses"] += len(missing)
    if missing:
        with torch.no_grad():
            computed = model.vision(batch["pixel_values"].to(device))
        for j, i in enumerate(missing):
            feats[i] = computed[j]
            if cache is not None:
                cache.put(batch["image_keys"][i], computed[j])
    return torch.stack([f.to(device) for f in feats])


def frozen_features(
    model: MiniLlava, dataset: SupervisedDataset, collate: Collator, cache: FeatureCache | None,
    device: torch.device, indices: list[int], chunk: int = 32,
) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:  # fmt: skip
    """(batch, its vision features (C, P, Dv)) for the given samples, `chunk` at a time, from the feature cache
    or the frozen tower (then cached): what the steps before training (statistics, warm start) read."""
    for start in range(0, len(indices), chunk):
        batch = collate([dataset[i] for i in indices[start : start + chunk]])
        if not batch["num_samples"]:
            continue
        feats = vision_features_for(batch, model, cache, device, False, {"hits": 0, "misses": 0})
        if feats is not None:
            yield batch, feats


def evenly_spaced(items: list[T], k: int) -> list[T]:
    """`k` of `items` spread evenly from first to last (all of them when there are no more than `k`)."""
    if len(items) <= k:
        return items
    return [items[j * len(items) // k] for j in range(k)]


def fit_feature_stats(model: MiniLlava, dataset: SupervisedDataset, collate: Collator, cache: FeatureCache | None,
                      device: torch.device, max_images: int, say: Callable[[str], None]) -> None:  # fmt: skip
    """Fit the projector's input standardisation: per-channel mean and std of the frozen tower's features over
    `max_images` samples with images spread evenly over the data (several files one after another: each has its
    share, not just the first file), chosen without randomness, so a resumed run refits the very same numbers;
    the features land in the feature cache on the way."""
    with_images = evenly_spaced([i for i, n in enumerate(dataset.modality_lengths()) if n > 0], max_images)
    total = total_sq = None
    count, seen = 0, 0
    for _, feats in frozen_features(model, dataset, collate, cache, device, with_images):
        flat = feats.reshape(-1, feats.shape[-1]).double()  # (C*P, Dv)
        total = flat.sum(0) if total is None else total + flat.sum(0)
        total_sq = flat.square().sum(0) if total_sq is None else total_sq + flat.square().sum(0)
        count, seen = count + flat.shape[0], seen + feats.shape[0]
    if not count:
        raise ValueError("--standardize-features: the training data holds no images to fit the statistics on")
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt().clamp_min(1e-6)
    model.projector.set_feature_stats(mean.float().to(device), std.float().to(device))
    say(
        f"projector input standardised: per-channel mean/std of {seen} image crops ({count:,} feature vectors); "
        f"largest |mean| {mean.abs().max():.2f}, median std {std.median():.2f}"
    )
