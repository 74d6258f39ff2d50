"""Generation: one prefill that splices the images (xattn: encodes the media once), then KV-cached decoding
one token at a time.

Batches are left-padded so every row's next token sits in the last column; position ids count real
tokens only, so each row decodes exactly as it would alone.

A small LLM decodes launch-bound on a GPU: hundreds of tiny kernels per token, each waiting on Python. On
CUDA the decode steps therefore run on a transformers StaticCache (fixed shapes, written in place) and are
captured once as a CUDA graph that is replayed for every later token: one launch per token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import (
    LogitsProcessorList,
    StaticCache,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import StaticLayer

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
    # decode steps as a replayed CUDA graph over a static KV cache; None: on for fusion splice on CUDA, else off
    cuda_graphs: bool | None = None

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


def greedy(logits: torch.Tensor) -> torch.Tensor:  # (..., V) -> (...) the first maximum of each row, as argmax
    # torch's CPU argmax is not vectorised: 28 us over SmolLM2's 49k logits against numpy's 2 us, every token
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(logits.numpy().argmax(-1))
    return logits.argmax(-1)


def forbid_image_slot(logits: torch.Tensor, image_token_id: int) -> None:  # (..., V) in place
    """An image slot is never a valid output: its logit goes to -inf before a token is picked."""
    if logits.device.type == "cpu":  # through numpy: 6 us against torch's 60 us with the caches cold
        logits.numpy()[..., image_token_id] = -np.inf
    else:
        logits[..., image_token_id] = -float("inf")


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

    def pick(logits: torch.Tensor) -> torch.Tensor:  # (B, 1, V) -> (B, 1): the next input as it is
        if cfg.temperature == 0:
            return greedy(logits)
        probs = warpers(None, logits[:, -1]).softmax(-1)  # temperature, top-k, top-p read the scores only, not ids
        return torch.multinomial(probs, 1, generator=gen)

    return pick


def use_cuda_graphs(model: MiniLlava, cfg: GenerationConfig) -> bool:
    """Resolve `cfg.cuda_graphs`. Graphs need CUDA and fusion splice: an xattn continuation checks its input
    for image markers on the host, which a captured step cannot do."""
    if cfg.cuda_graphs is None:
        return model.device.type == "cuda" and model.config.fusion == "splice"
    if cfg.cuda_graphs and (model.device.type != "cuda" or model.config.fusion != "splice"):
        raise ValueError(f"cuda_graphs needs a CUDA model with fusion splice, not {model.device} {model.config.fusion}")
    return cfg.cuda_graphs


class StaticStep:
    """One decode step on a StaticCache, with fixed-shape inputs (token, position, full-length mask) written in
    place: the same step runs eagerly or, on CUDA, as a captured graph that is replayed for each later token.

    The cache keeps its own write position on the device and advances it in place, so a replay writes the next
    slot. The mask covers all `max_cache_len` slots: zeros on the left padding and on the slots not yet filled.
    """

    WARMUP = 2  # eager steps before the capture (PyTorch's recipe: warm up on a side stream first)

    def __init__(self, model: MiniLlava, cache: StaticCache, mask: torch.Tensor, graph: bool) -> None:
        self.model, self.cache, self.mask = model, cache, mask
        self.token = torch.zeros(mask.shape[0], 1, dtype=torch.long, device=mask.device)
        self.position = torch.zeros_like(self.token)
        self.use_graph, self.steps = graph, 0
        self.side = torch.cuda.Stream(mask.device) if graph else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's output, rewritten by each replay

    def forward(self) -> torch.Tensor:  # (B, 1, V)
        # no images in a decode step; the model skips the splice's host-side slot count while capturing
        out = self.model(self.token, self.mask, position_ids=self.position, past_key_values=self.cache, use_cache=True)
        return out.logits

    def __call__(self, token: torch.Tensor, position: torch.Tensor, slot: int) -> torch.Tensor:
        """Feed `token` (B, 1) at rotary `position` (B, 1) into cache slot `slot`; the next logits (B, 1, V)."""
        self.token.copy_(token)
        self.position.copy_(position)
        self.mask[:, slot] = 1
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        if not self.use_graph:
            return self.forward()
        self.steps += 1
        if self.steps <= self.WARMUP:  # real decode steps, run on a side stream as warm-up
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                logits = self.forward()
            torch.cuda.current_stream().wait_stream(self.side)
            return logits
        self.graph = torch.cuda.CUDAGraph()
        # capture records the kernels without running them (nor advancing the cache); the replay runs this step.
        # thread_local: a server may run CUDA work on other threads meanwhile
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.logits = self.forward()
        self.graph.replay()
        return self.logits


def decode(
    model: MiniLlava,
    batch: dict[str, torch.Tensor | None],
    cfg: GenerationConfig,
    stop_ids: list[int],
    pad_id: int,
    static_cache: bool | None = None,
    observe: Callable[[torch.Tensor], None] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (next token per row (B,), finished-before-this-step mask (B,)) until all rows stop.

    `observe`, if given, sees each step's float32 logits (B, V) that the token is picked from (image slot at
    -inf, before temperature and top-p), before that token is yielded; they are valid until the next step.

    The prefill splices the images; the steps after it run on a DynamicCache, or on a StaticCache that the
    prefill fills too (`static_cache`; None: when CUDA graphs are on, which need it; tests run it on the CPU).
    """
    device = model.device
    graphs = use_cuda_graphs(model, cfg)
    static = graphs if static_cache is None else static_cache
    if graphs and not static:
        raise ValueError("cuda_graphs need the static cache")
    if static and model.config.fusion != "splice":
        raise ValueError("the static-cache decode supports fusion splice only")
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    pixels, sizes = batch["pixel_values"], batch.get("image_sizes")  # sizes: AnyRes only
    pixels = None if pixels is None else pixels.to(device)
    sizes = None if sizes is None else sizes.to(device)
    counts = batch.get("image_counts")  # per-row image counts, read on the host by the splice's check
    rows, prompt_len = ids.shape
    if hasattr(model, "reserve"):  # an exported model that sizes its cache up front (minillava.interop.exported)
        model.reserve(rows, prompt_len + cfg.max_new_tokens)
    if static:  # sized for the prompt and every new token; the prefill fills its first prompt_len slots
        cache = StaticCache(config=model.llm.config, max_cache_len=prompt_len + cfg.max_new_tokens)
        if not all(type(layer) is StaticLayer for layer in cache.layers):
            # sliding-window layers keep their fill count on the host, which a graph replay would not advance
            if cfg.cuda_graphs or static_cache:
                raise ValueError("the static-cache decode needs full-attention layers only (no sliding window)")
            static = graphs = False
    if static:
        full_mask = torch.zeros(rows, prompt_len + cfg.max_new_tokens, dtype=mask.dtype, device=device)
        full_mask[:, :prompt_len] = mask
        with torch.no_grad():
            out = model(ids, full_mask, pixels, position_ids=positions_from_mask(mask), past_key_values=cache,
                        use_cache=True, logits_to_keep=1, image_sizes=sizes, image_counts=counts)  # fmt: skip
        step = StaticStep(model, cache, full_mask, graphs)
    else:
        with torch.no_grad():  # the prefill: images here only
            out = model(ids, mask, pixels, use_cache=True, logits_to_keep=1, image_sizes=sizes, image_counts=counts)
    logits = out.logits  # (B, 1, V): the last position's, kept in that shape, so its token is the next input as is
    # what the steps read is made here, once: on a CPU a small torch op costs 30-60 us after a decode step has
    # evicted the caches, and a dozen of them per token are as much as llama.cpp's whole per-token overhead
    new_positions = positions_from_mask(mask)[:, -1:] + torch.arange(1, cfg.max_new_tokens + 1, device=device)
    positions = new_positions.unsqueeze(-1).unbind(1)  # step i's rotary positions (B, 1)
    if not static:  # the mask grows by one column a step: views of one buffer, not a copy per token
        grown = torch.ones(rows, prompt_len + cfg.max_new_tokens, dtype=mask.dtype, device=device)
        grown[:, :prompt_len] = mask
    stops = set(stop_ids)
    stopped = [False] * rows  # on the host; `finished` is its tensor, remade only when a row stops
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    pick = _sampler(cfg, device)
    for i in range(cfg.max_new_tokens):
        if logits.dtype != torch.float32:
            logits = logits.float()
        forbid_image_slot(logits, model.config.image_token_id)
        if observe is not None:
            observe(logits[:, -1])
        column = pick(logits)  # (B, 1)
        if any(stopped):
            column = column.masked_fill(finished[:, None], pad_id)
        token = column[:, 0]
        yield token, finished
        hits = [r for r, t in enumerate(token.tolist()) if not stopped[r] and t in stops]
        if hits:
            for r in hits:
                stopped[r] = True
            finished = torch.tensor(stopped, device=device)
        if all(stopped) or i == cfg.max_new_tokens - 1:  # done: no step for a token nobody reads
            return
        # no_grad around each model call, not a decorator on this generator: that one re-enters its mode at every
        # token the caller takes (0.08 ms a token on a CPU); and no yield happens inside a mode
        with torch.no_grad():
            if static:
                logits = step(column, positions[i], prompt_len + i)
                continue
            out = model(
                column,
                grown[:, : prompt_len + i + 1],
                position_ids=positions[i],
                past_key_values=out.past_key_values,
                use_cache=True,
                media=out.media,
            )
        logits = out.logits


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
        answers = [AnswerText(self._decode, cfg.stop) for _ in samples]
        live = [True] * len(samples)
        batch = self.processor.collate(samples, padding_side="left")
        for token, _ in decode(self.model, batch, cfg, self.stop_ids, self.processor.pad_token_id):
            for r, t in enumerate(token.tolist()):
                if not live[r]:
                    continue
                if t in self.stop_ids:
                    live[r] = False
                    continue
                answers[r].add(t)
                live[r] = not answers[r].stopped
            if not any(live):
                break
        for answer in answers:
            answer.finish()
        return [answer.text for answer in answers]

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
        answer = AnswerText(self._decode, cfg.stop, stream=True)
        for token, _ in decode(self.model, batch, cfg, self.stop_ids, self.processor.pad_token_id):
            t = int(token[0])
            if t in self.stop_ids:
                break
            if piece := answer.add(t):
                yield piece
            if answer.stopped:
                return
        if piece := answer.finish():
            yield piece

    def _decode(self, ids: list[int]) -> str:
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one was found."""
    hits = [text.find(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def hold_back(text: str, stops: list[str]) -> str:
    """Don't emit a tail that may be the start of a stop string or half of a multi-byte character.

    The longest such tail over all stops: with stops ["ab", "xab"], "hello xa" may still become "hello xab",
    which is cut before the "x", so "xa" is held, not just the "a" that starts "ab"."""
    text = text.rstrip("\ufffd")
    held = max((k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])), default=0)
    return text[: len(text) - held]


class AnswerText:
    """One answer's text as its tokens arrive: cut at the first stop string and, when streaming, released
    only once no later token can take it back. `generate`, `stream` and the server all go through this, so a
    streamed answer joins to exactly the non-streamed one."""

    def __init__(self, detokenize: Callable[[list[int]], str], stops: list[str], stream: bool = False) -> None:
        self.detokenize, self.stops, self.stream = detokenize, stops, stream
        self.tokens: list[int] = []
        self.text = ""  # the final answer, once `finish` ran
        self.sent = ""  # what was released so far (streaming)
        self.stopped = False  # a stop string was found: the answer is complete

    def add(self, token: int) -> str:
        """Append a token; the text it releases ("" while held back or not streaming)."""
        self.tokens.append(token)
        if not self.stops and not self.stream:
            return ""  # nothing to watch for: detokenize once, at the end
        text, self.stopped = cut_at_stop(self.detokenize(self.tokens), self.stops)
        if self.stopped:
            return self.finish()
        return self._release(hold_back(text, self.stops)) if self.stream else ""

    def finish(self) -> str:
        """Fix the final text; what of it was not released yet (streaming)."""
        self.text, _ = cut_at_stop(self.detokenize(self.tokens), self.stops)
        return self._release(self.text) if self.stream else ""

    def _release(self, ready: str) -> str:
        if len(ready) <= len(self.sent):
            return ""
        piece, self.sent = ready[len(self.sent) :], ready
        return piece
