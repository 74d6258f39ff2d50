"""Processor: images + chat template + `<image>` expansion + labels, in one place.

It is the single source of truth for how many tokens an image becomes (`tokens_per_image`, asked of the
vision tower and projector; with AnyRes, `anyres.num_tokens` of each image's size); the model only checks
that count and scatters features into the slots.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from minillava.anyres import AnyRes, Size
from minillava.fileio import write_atomic
from minillava.images import DEFAULT_MAX_PIXELS, ImageInput, ImageTransform, load_image
from minillava.templates import Message, Segment, Template, get_template

IGNORE_INDEX = -100
PROCESSOR_CONFIG = "processor_config.json"


@dataclass
class Encoded:
    """One sample: ids and labels of equal length, and its images' pixels in order."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None  # (num_images, 3, H, W); AnyRes: (num_crops, 3, H, W), base view + tiles
    image_sizes: torch.Tensor | None = None  # AnyRes: (num_images, 2) (height, width) as decoded

    @property
    def num_images(self) -> int:
        if self.image_sizes is not None:
            return self.image_sizes.shape[0]
        return 0 if self.pixel_values is None else self.pixel_values.shape[0]


class Processor:
    def __init__(
        self,
        tokenizer: Any,
        image_transform: ImageTransform,
        tokens_per_image: int,
        image_token: str = "<image>",
        template: str = "auto",
        max_length: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        anyres: AnyRes | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.tokens_per_image = tokens_per_image  # with AnyRes: of the base view only
        self.anyres = anyres
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {image_token!r} token; add it as a special token first")
        self.template_name = template
        self.template: Template = get_template(template, tokenizer)
        self.max_length = max_length or getattr(tokenizer, "model_max_length", None) or 2048
        if self.max_length > 1_000_000:  # transformers' "no limit" sentinel
            self.max_length = 2048
        self.max_pixels = max_pixels
        self.bos_ids = _leading_special_ids(tokenizer)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def with_template(self, template: str) -> Processor:
        return Processor(
            self.tokenizer,
            self.image_transform,
            self.tokens_per_image,
            self.image_token,
            template,
            self.max_length,
            self.max_pixels,
            self.anyres,
        )

    # ---- images ---------------------------------------------------------------------------------
    def preprocess_images(self, images: list[ImageInput]) -> torch.Tensor | None:
        return self.pixels([load_image(im, max_pixels=self.max_pixels) for im in images])

    def pixels(self, images: list[Image.Image]) -> torch.Tensor | None:
        """Decoded images -> (num_crops, 3, H, W): one crop each, or with AnyRes, each base view then its tiles."""
        if not images:
            return None
        if self.anyres is None:
            return torch.stack([self.image_transform(im) for im in images])
        # A tile is already H x W, so the transform only normalises it.
        tiles = [c for im in images for c in (im, *self.anyres.cut_tiles(im, self.image_transform.resize_backend))]
        return torch.stack([self.image_transform(c) for c in tiles])

    def image_tokens(self, size: Size | None) -> int:
        """Placeholders for one image of (height, width): fixed, or with AnyRes, set by the size."""
        if self.anyres is None:
            return self.tokens_per_image
        if size is None:
            raise ValueError("AnyRes expands each <image> by its image's size, but there are more markers than images")
        return self.anyres.num_tokens(size)

    # ---- text -----------------------------------------------------------------------------------
    def tokenize_segments(
        self, segments: list[Segment], image_sizes: list[Size] | None = None, template: bool = True
    ) -> tuple[list[int], list[int]]:
        """Tokenize the rendered text once, then label the tokens that fall in supervised segments.

        The ids are exactly the tokenizer's own for the whole prompt (`tokenizer(text)`, and its
        `apply_chat_template` for the `auto` template), each `<image>` then expanded to its N placeholders:
        tokenizing segment by segment instead adds a `'▁'` at every piece start with SentencePiece tokenizers
        and changes merges across boundaries. Labels come from character spans: a token is supervised when its
        characters overlap a supervised segment (the answer and its end-of-turn). `image_sizes` ((height,
        width) per image, in order) are needed with AnyRes only. `template`: the segments are the chat
        template's, which decides whether the tokenizer's BOS goes in front (the tokenizer's own template
        writes its BOS, if any, into the text); raw text gets the tokenizer's BOS as `tokenizer(text)` would.
        """
        text = "".join(seg.text for seg in segments)
        spans, pos = [], 0
        for seg in segments:
            if seg.supervised and seg.text:
                spans.append((pos, pos + len(seg.text)))
            pos += len(seg.text)
        bos = self.tokenizer.bos_token
        wants_bos = self.template.bos_from_tokenizer or not template
        lead = [] if (bos and text.startswith(bos)) or not wants_bos else list(self.bos_ids)
        body, supervised = _tokenize_with_spans(self.tokenizer, text, spans)
        n_marked = text.count(self.image_token)
        if body.count(self.image_token_id) != n_marked:
            raise ValueError(
                f"the tokenizer does not keep {self.image_token!r} as one token: the text has {n_marked} markers "
                f"but its ids hold {body.count(self.image_token_id)}"
            )
        sizes = iter(image_sizes or [])
        ids: list[int] = list(lead)
        labels: list[int] = [IGNORE_INDEX] * len(lead)
        for tok, sup in zip(body, supervised, strict=True):
            if tok == self.image_token_id:  # an <image>: N placeholder ids, never supervised
                n = self.image_tokens(next(sizes, None))
                ids += [tok] * n
                labels += [IGNORE_INDEX] * n
            else:
                ids.append(tok)
                labels.append(tok if sup else IGNORE_INDEX)
        return ids, labels

    def encode(
        self,
        messages: list[Message],
        images: list[ImageInput] | None = None,
        add_generation_prompt: bool = False,
        truncate: bool = False,
    ) -> Encoded:
        """A conversation (with `<image>` markers in its text) -> ids, labels and pixels."""
        segments = self.template.render(messages, add_generation_prompt)
        return self._finish(segments, images or [], truncate, template=True)

    def encode_raw(self, text: str, images: list[ImageInput] | None = None) -> Encoded:
        """A verbatim prompt (no chat template); each `<image>` is still expanded."""
        return self._finish([Segment(text)], images or [], truncate=False, template=False)

    def _finish(self, segments: list[Segment], images: list[ImageInput], truncate: bool, template: bool) -> Encoded:
        n_marked = sum(seg.text.count(self.image_token) for seg in segments)
        if n_marked != len(images):
            raise ValueError(f"the text has {n_marked} <image> markers but {len(images)} images were given")
        decoded = [load_image(im, max_pixels=self.max_pixels) for im in images]
        sizes = [(im.height, im.width) for im in decoded]
        ids, labels = self.tokenize_segments(segments, sizes, template)
        if len(ids) > self.max_length:
            last_image_end = max((i + 1 for i, t in enumerate(ids) if t == self.image_token_id), default=0)
            if not truncate or last_image_end > self.max_length:
                raise ValueError(
                    f"sequence of {len(ids)} tokens exceeds max_length {self.max_length}"
                    + (" and truncation would cut an image's tokens" if last_image_end > self.max_length else "")
                )
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return Encoded(ids, labels, self.pixels(decoded), self.size_tensor(sizes))

    def size_tensor(self, sizes: list[Size]) -> torch.Tensor | None:
        """(num_images, 2) sizes for the model, which needs them only to lay out AnyRes tiles."""
        return torch.tensor(sizes, dtype=torch.long) if self.anyres is not None and sizes else None

    def prompt(
        self, text: str, images: list[ImageInput] | None = None, history: list[Message] | None = None
    ) -> Encoded:
        """A user question ready for generation. With no `<image>` in the text, images go first."""
        images = images or []
        if images and self.image_token not in text:
            text = "\n".join([self.image_token] * len(images) + [text])
        messages = [*(history or []), {"role": "user", "content": text}]
        return self.encode(messages, images, add_generation_prompt=True)

    # ---- batching -------------------------------------------------------------------------------
    def collate(self, samples: list[Encoded], padding_side: str = "right") -> dict[str, torch.Tensor | None]:
        """Pad to the longest sample. Right padding for training, left for batched generation."""
        width = max(len(s.input_ids) for s in samples)
        ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(samples), width), dtype=torch.long)
        for row, s in enumerate(samples):
            n = len(s.input_ids)
            cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
            ids[row, cols] = torch.tensor(s.input_ids)
            labels[row, cols] = torch.tensor(s.labels)
            mask[row, cols] = 1
        pixels = [s.pixel_values for s in samples if s.pixel_values is not None]
        sizes = [s.image_sizes for s in samples if s.image_sizes is not None]
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "pixel_values": torch.cat(pixels) if pixels else None,  # crops of all samples, packed in reading order
            "image_sizes": torch.cat(sizes) if sizes else None,  # AnyRes: (num_images, 2), says whose crops are whose
            # (B,): which of the packed images are whose, so the model's splice can check every row on its own
            "image_counts": torch.tensor([s.num_images for s in samples], dtype=torch.long),
        }

    # ---- persistence ----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        save_tokenizer(self.tokenizer, directory / "llm")
        cfg = {
            "image_transform": self.image_transform.to_dict(),
            "tokens_per_image": self.tokens_per_image,
            "image_token": self.image_token,
            "template": self.template_name,
            "max_length": self.max_length,
            "max_pixels": self.max_pixels,
            "anyres": None if self.anyres is None else self.anyres.to_dict(),
        }
        (directory / PROCESSOR_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Processor:
        from transformers import AutoTokenizer

        directory = Path(directory)
        cfg = json.loads((directory / PROCESSOR_CONFIG).read_text())
        t = cfg["image_transform"]
        transform = ImageTransform(
            t["size"], tuple(t["mean"]), tuple(t["std"]), t["aspect"], t.get("resize_backend", "pil")
        )
        tokenizer = AutoTokenizer.from_pretrained(directory / "llm")
        return cls(
            tokenizer,
            transform,
            cfg["tokens_per_image"],
            cfg["image_token"],
            cfg["template"],
            cfg["max_length"],
            cfg["max_pixels"],
            AnyRes.from_dict(cfg["anyres"]) if cfg.get("anyres") else None,
        )


def save_tokenizer(tokenizer: Any, directory: str | Path) -> None:
    """`tokenizer.save_pretrained`, keeping SentencePiece's `legacy` flag: transformers 5 leaves it out of
    tokenizer_config.json and reloads the tokenizer as non-legacy, which drops the `▁` a legacy tokenizer puts
    after every special token, so a reloaded model would read its prompts in other tokens than it trained on."""
    tokenizer.save_pretrained(directory)
    legacy = getattr(tokenizer, "legacy", None)
    path = Path(directory) / "tokenizer_config.json"
    if legacy is None or not path.exists():
        return
    config = json.loads(path.read_text())
    if config.get("legacy") != legacy:
        write_atomic(path, json.dumps(config | {"legacy": legacy}, indent=2, ensure_ascii=False) + "\n")


def _leading_special_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer itself puts in front of text (BOS for Llama/OPT; none for Qwen/SmolLM2)."""
    with_special = tokenizer("a", add_special_tokens=True).input_ids
    without = tokenizer("a", add_special_tokens=False).input_ids
    return with_special[: len(with_special) - len(without)] if with_special[-len(without) :] == without else []


def _tokenize_with_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """`text`'s ids (no special tokens added) and, per token, whether it overlaps one of the character spans.

    Fast tokenizers give each token's characters (offset mapping); a token that straddles a span's edge is
    supervised, so no answer character is ever left out of the loss. Tokenizers without offsets (the
    sentencepiece-backed slow ones) place each span edge at the longest common prefix of the full ids and the
    ids of the text up to that edge.
    """
    if not text:
        return [], []
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        flags = []
        for start, end in offsets:
            if end > start:
                flags.append(any(max(start, a) < min(end, b) for a, b in spans))
            else:  # a token with no characters of its own: it belongs where it stands
                flags.append(any(a <= start < b for a, b in spans))
        return ids, flags
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def edge(i: int) -> int:
        if i >= len(text):
            return len(ids)
        prefix = tokenizer(text[:i], add_special_tokens=False)["input_ids"] if i > 0 else []
        n = 0
        while n < min(len(prefix), len(ids)) and prefix[n] == ids[n]:
            n += 1
        return n

    flags = [False] * len(ids)
    for a, b in spans:
        for k in range(edge(a), edge(b)):
            flags[k] = True
    return ids, flags
