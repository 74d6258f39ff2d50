"""A torch Dataset of training samples: records -> token ids, labels and pixels (or cached features).

Tokenising, decoding and preprocessing images all happen in `__getitem__`, i.e. in DataLoader worker
processes. A bad sample raises `BadSampleError` (file, sample id, reason) or, with `on_bad_sample="skip"`,
becomes a `Skipped` item that the collator counts and the training loop reports. Nothing is dropped silently.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from minillava.data.formats import BadSampleError, Record, load_records
from minillava.data.packing import next_fit_rows, pack_batch
from minillava.images import ImageError, load_image
from minillava.processor import IGNORE_INDEX, Encoded, Processor

BAD_SAMPLE_POLICIES = ("error", "skip")


@dataclass
class Item:
    index: int
    id: str
    encoded: Encoded  # pixel_values hold only the images whose features are not cached
    image_keys: list[str] = field(default_factory=list)
    features: list[torch.Tensor | None] = field(default_factory=list)  # cached vision features per image


@dataclass
class Skipped:
    index: int
    id: str
    where: str
    reason: str


def image_key(path: Path) -> str:
    """Identity of an image file for the feature cache: path, size and modification time."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def resolve_image(root: Path | None, name: str) -> Path:
    p = Path(name).expanduser()
    return p if p.is_absolute() or root is None else root / p


def outside_root(root: Path | None, name: str) -> str | None:
    """Why image path `name` may not be used with image root `root` (None: it may).

    With a root, the path (relative to it, or absolute) must resolve, symlinks followed, to a place inside it:
    `../x.png`, an absolute path elsewhere or a symlink out of the root is refused. No root: no limit.
    """
    if root is None:
        return None
    try:
        inside = resolve_image(root, name).resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError) as e:  # a symlink loop, an unreadable directory
        return f"cannot resolve image path {name}: {e}"
    return None if inside else f"image path leaves the image root: {name}"


class SupervisedDataset(Dataset):
    def __init__(
        self,
        files: str | Path | list[str | Path],
        processor: Processor,
        image_root: str | Path | None = None,
        fmt: str = "auto",
        on_bad_sample: str = "error",
        truncate: bool = False,
        feature_cache: Any = None,  # minillava.train.cache.FeatureCache (read side), or None
        allow_outside_image_root: bool = False,  # use image paths that resolve outside `image_root` too
    ) -> None:
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}")
        if feature_cache is not None and processor.anyres is not None:
            raise ValueError("the feature cache holds one crop per image; AnyRes images have a varying number")
        files = [files] if isinstance(files, (str, Path)) else list(files)
        if not files:
            raise ValueError("no data files given")
        self.records: list[Record] = [r for f in files for r in load_records(f, fmt)]
        if not self.records:
            raise ValueError(f"{', '.join(map(str, files))}: no samples")
        self.processor = processor
        self.image_root = Path(image_root).expanduser() if image_root else None
        if self.image_root is not None and not self.image_root.is_dir():
            raise OSError(f"{self.image_root}: image root is not a directory")
        self.on_bad_sample = on_bad_sample
        self.allow_outside_image_root = allow_outside_image_root
        self.truncate = truncate
        self.feature_cache = feature_cache

    def __len__(self) -> int:
        return len(self.records)

    # ---- cheap per-sample facts for the sampler (no tokenising, no image decoding) ---------------
    def modality_lengths(self) -> list[int]:
        """LLaVA's `modality_lengths`: estimated token length, negative for text-only samples."""
        per_image = self.processor.tokens_per_image  # AnyRes: the base view only; an estimate is enough to group
        out = []
        for r in self.records:
            n = sum(len(m["content"]) for m in r.messages) // 4 + len(r.images) * per_image + 1
            out.append(n if r.images else -n)
        return out

    def token_lengths(self) -> list[int]:
        """Every sample's exact token count after image expansion (and --truncate): what --packing fills its
        rows with, so the counts must be the collator's. Tokenises each record once (AnyRes: decodes its images
        for their sizes); a bad sample counts 1 token and is reported by the loader in its turn, as ever."""
        out = []
        for rec in self.records:
            try:
                out.append(1 if rec.error else len(self.tokenize(rec)[0]))
            except BadSampleError:
                out.append(1)
        return out

    # ---- one sample ----------------------------------------------------------------------------
    def tokenize(self, rec: Record, images: list[Image.Image] | None = None) -> tuple[list[int], list[int]]:
        """Ids and labels of a record after `<image>` expansion; raises BadSampleError.

        With AnyRes the expansion depends on each image's size, so the images are decoded (or given, decoded).
        """
        p = self.processor
        sizes = None
        if p.anyres is not None:
            sizes = [(im.height, im.width) for im in (self.decode(rec) if images is None else images)]
        try:
            ids, labels = p.tokenize_segments(p.template.render(rec.messages, False), sizes)
        except ValueError as e:
            raise self._bad(rec, f"cannot apply the chat template: {e}") from None
        expected = len(rec.images) * p.tokens_per_image if sizes is None else sum(map(p.image_tokens, sizes))
        if ids.count(p.image_token_id) != expected:
            raise self._bad(rec, "the text's image placeholders do not match its images (a literal image token?)")
        if len(ids) > p.max_length:
            last_image_end = max((i + 1 for i, t in enumerate(ids) if t == p.image_token_id), default=0)
            if not self.truncate or last_image_end > p.max_length:
                raise self._bad(
                    rec,
                    f"{len(ids)} tokens after image expansion exceed max_length {p.max_length}"
                    + (" (truncating would cut an image)" if self.truncate else ""),
                )
            ids, labels = ids[: p.max_length], labels[: p.max_length]
        if all(t == IGNORE_INDEX for t in labels[1:]):
            raise self._bad(rec, "no supervised tokens (empty answer or truncated away)")
        return ids, labels

    def _bad(self, rec: Record, reason: str) -> BadSampleError:
        err = BadSampleError(f"bad sample {rec.where()}: {reason}")
        err.reason = reason
        return err

    def image_paths(self, rec: Record) -> list[Path]:
        """The record's image files; raises BadSampleError for a path leaving the image root (unless allowed)."""
        if not self.allow_outside_image_root:
            for name in rec.images:
                problem = outside_root(self.image_root, name)
                if problem:
                    raise self._bad(rec, problem)
        return [resolve_image(self.image_root, name) for name in rec.images]

    def decode(self, rec: Record) -> list[Image.Image]:
        paths = self.image_paths(rec)
        try:
            return [load_image(path, max_pixels=self.processor.max_pixels) for path in paths]
        except ImageError as e:
            raise self._bad(rec, str(e)) from None

    def load(self, index: int) -> Item:
        rec = self.records[index]
        if rec.error:
            raise self._bad(rec, rec.error)
        if self.processor.anyres is not None:  # token counts need each image's size: decode first (no cache)
            p, images = self.processor, self.decode(rec)
            ids, labels = self.tokenize(rec, images)
            sizes = p.size_tensor([(im.height, im.width) for im in images])
            return Item(index, rec.id, Encoded(ids, labels, p.pixels(images), sizes), features=[None] * len(images))
        paths = self.image_paths(rec)
        ids, labels = self.tokenize(rec)
        keys, features, to_decode = [], [], []
        for path in paths:
            try:
                key = image_key(path)
            except OSError:
                raise self._bad(rec, f"image {path} not found") from None
            cached = self.feature_cache.get(key) if self.feature_cache is not None else None
            keys.append(key)
            features.append(cached)
            if cached is None:
                to_decode.append(path)
        try:
            pixels = self.processor.preprocess_images(to_decode)
        except ImageError as e:
            raise self._bad(rec, str(e)) from None
        return Item(index, rec.id, Encoded(ids, labels, pixels), keys, features)

    def __getitem__(self, index: int) -> Item | Skipped:
        try:
            return self.load(index)
        except BadSampleError as e:
            if self.on_bad_sample == "error":
                raise
            rec = self.records[index]
            reason = getattr(e, "reason", str(e))
            return Skipped(index, rec.id, rec.source, reason)


class Collator:
    """Right-padded batch of the good items, plus what the loop needs to account for the rest.

    With `pack_budget` (--packing) the good items are packed in their order into rows of at most that many tokens
    (`next_fit_rows`: the rows TokenBudgetSampler filled): collated in row order, then laid end to end, with
    segment and position ids for per-sample attention (packing.py)."""

    def __init__(self, processor: Processor, pack_budget: int | None = None) -> None:
        self.processor = processor
        self.pack_budget = pack_budget

    def __call__(self, items: list[Item | Skipped]) -> dict[str, Any]:
        good = [it for it in items if isinstance(it, Item)]
        rows = None
        if self.pack_budget is not None and good:
            plan = next_fit_rows([len(it.encoded.input_ids) for it in good], self.pack_budget, [it.id for it in good])
            good = [good[i] for row in plan for i in row]  # row order: images stay in reading order
            sizes = itertools.accumulate(len(row) for row in plan)
            rows = [list(range(end - len(row), end)) for row, end in zip(plan, sizes, strict=True)]
        skipped = [it for it in items if isinstance(it, Skipped)]
        batch: dict[str, Any] = {"skipped": skipped, "num_samples": len(good), "ids": [it.id for it in good],
                                 "indices": [it.index for it in good]}  # fmt: skip
        if not good:
            return batch
        batch.update(self.processor.collate([it.encoded for it in good], padding_side="right"))
        batch["image_keys"] = [k for it in good for k in it.image_keys]
        batch["features"] = [f for it in good for f in it.features]
        # an item's pixels hold only its feature-cache misses: count its images by its feature slots instead
        batch["image_counts"] = torch.tensor([len(it.features) for it in good], dtype=torch.long)
        return batch if rows is None else pack_batch(batch, rows, self.processor.pad_token_id)


def worker_count(requested: int) -> int:
    """Never more workers than cores; 0 means load in the main process."""
    return max(0, min(requested, (os.cpu_count() or 1)))
