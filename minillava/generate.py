"""Generation: one prefill that splices the images (xattn: encodes the media once), then KV-cached decoding
one token at a time.

Batches are left-padded so every row's next token sits in the last column; position ids count real
tokens only, so each row decodes exactly as it would alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from minillava.images import ImageInput
from minillava.model import MiniLlava, positions_from_mask
from minillava.processor import Encoded, Processor
from minillava.templates import Message


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # user stop strings, cut from the returned text

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")


def stop_token_ids(processor: Processor) -> list[int]:
    """EOS and the template's end-of-turn token both end an answer."""
    tok = processor.tokenizer
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    eot = tok.convert_tokens_to_ids(processor.template.end_of_turn) if processor.template.end_of_turn else None
    if eot is not None and eot != tok.unk_token_id:
        ids.add(eot)
    return sorted(ids)


def _sampler(cfg: GenerationConfig, device: torch.device):
    warpers = LogitsProcessorList()
    if cfg.temperature > 0:
        warpers.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k:
            warpers.append(TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1:
            warpers.append(TopPLogitsWarper(cfg.top_p))
    gen = torch.Generator(device=device)
    if cfg.seed is not None:
        gen.manual_seed(cfg.seed)
    else:
        gen.seed()

    def pick(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B,)
        if cfg.temperature == 0:
            return logits.argmax(-1)
        probs = warpers(ids, logits).softmax(-1)
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

    return pick


@torch.inference_mode()
def decode(
    model: MiniLlava,
    batch: dict[str, torch.Tensor | None],
    cfg: GenerationConfig,
    stop_ids: list[int],
    pad_id: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (next token per row (B,), finished-before-this-step mask (B,)) until all rows stop."""
    device = model.device
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    pixels, sizes = batch["pixel_values"], batch.get("image_sizes")  # sizes: AnyRes only
    pixels = None if pixels is None else pixels.to(device)
    sizes = None if sizes is None else sizes.to(device)
    out = model(ids, mask, pixels, use_cache=True, logits_to_keep=1, image_sizes=sizes)  # prefill: images here only
    position = positions_from_mask(mask)[:, -1:]  # (B, 1)
    stops = torch.tensor(stop_ids, device=device, dtype=torch.long)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    pick = _sampler(cfg, device)
    generated = ids
    for _ in range(cfg.max_new_tokens):
        logits = out.logits[:, -1].float()
        logits[:, model.config.image_token_id] = -float("inf")  # an image slot is never a valid output
        token = torch.where(finished, torch.full_like(finished, pad_id, dtype=torch.long), pick(generated, logits))
        yield token, finished.clone()
        finished |= torch.isin(token, stops)
        if bool(finished.all()):
            return
        generated = torch.cat([generated, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        out = model(
            token[:, None],
            mask,
            position_ids=position,
            past_key_values=out.past_key_values,
            use_cache=True,
            media=out.media,
        )


class Generator:
    """Text in, text out: prompts and images through the processor, answers back as strings."""

    def __init__(self, model: MiniLlava, processor: Processor) -> None:
        self.model = model
        self.processor = processor
        self.stop_ids = stop_token_ids(processor)

    def encode(self, prompt: str | list[Message], images: list[ImageInput] | None, raw: bool = False) -> Encoded:
        if raw:
            return self.processor.encode_raw(prompt, images)  # type: ignore[arg-type]
        if isinstance(prompt, str):
            return self.processor.prompt(prompt, images)
        return self.processor.encode(prompt, images, add_generation_prompt=True)

    def generate(
        self,
        prompt: str | list[Message],
        images: list[ImageInput] | None = None,
        config: GenerationConfig | None = None,
        raw: bool = False,
    ) -> str:
        return self.generate_batch([self.encode(prompt, images, raw)], config)[0]

    def generate_batch(self, samples: list[Encoded], config: GenerationConfig | None = None) -> list[str]:
        """Left-padded batched generation; each row equals its batch-size-1 answer (greedy)."""
        cfg = config or GenerationConfig()
        rows: list[list[int]] = [[] for _ in samples]
        texts = [""] * len(samples)
        live = [True] * len(samples)
        batch = self.processor.collate(samples, padding_side="left")
        for token, _ in decode(self.model, batch, cfg, self.stop_ids, self.processor.pad_token_id):
            for r, t in enumerate(token.tolist()):
                if not live[r]:
                    continue
                if t in self.stop_ids:
                    live[r] = False
                    continue
                rows[r].append(t)
                texts[r], stopped = cut_at_stop(self._decode(rows[r]), cfg.stop)
                live[r] = not stopped
            if not any(live):
                break
        return texts

    def stream(
        self,
        prompt: str | list[Message],
        images: list[ImageInput] | None = None,
        config: GenerationConfig | None = None,
        raw: bool = False,
    ) -> Iterator[str]:
        """Yield the answer in pieces as it is generated; the pieces join to `generate`'s result."""
        cfg = config or GenerationConfig()
        batch = self.processor.collate([self.encode(prompt, images, raw)], padding_side="left")
        tokens: list[int] = []
        sent = ""
        for token, _ in decode(self.model, batch, cfg, self.stop_ids, self.processor.pad_token_id):
            t = int(token[0])
            if t in self.stop_ids:
                break
            tokens.append(t)
            text, stopped = cut_at_stop(self._decode(tokens), cfg.stop)
            ready = text if stopped else hold_back(text, cfg.stop)
            if len(ready) > len(sent):
                yield ready[len(sent) :]
                sent = ready
            if stopped:
                return
        text, _ = cut_at_stop(self._decode(tokens), cfg.stop)
        if len(text) > len(sent):
            yield text[len(sent) :]

    def _decode(self, ids: list[int]) -> str:
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one was found."""
    hits = [text.find(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def hold_back(text: str, stops: list[str]) -> str:
    """Don't emit a tail that may be the start of a stop string or half of a multi-byte character."""
    text = text.rstrip("\ufffd")
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                return text[: len(text) - k]
    return text
