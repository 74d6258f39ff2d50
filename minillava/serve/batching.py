"""Batched generation behind the server: one worker thread, requests grouped by sampling settings.

The event loop only enqueues jobs and reads their events. One worker thread takes the oldest waiting
job, waits a few milliseconds for company, and runs every waiting job that shares its sampling settings
(up to `max_batch_size`) as one left-padded batch through `minillava.generate.decode`. Each row keeps
its own `max_tokens`, stop strings and cancellation, so greedy rows come out exactly as they would
alone (the same text as `Generator.generate`). Streamed rows get text deltas as tokens arrive.

Batches are static: a job that arrives while a batch runs waits for the next one.

A job that asks for logprobs (`Job.logprobs`) gets, for each token of its answer, the log-softmax of the
logits that token was picked from (float32, temperature 1, no top-p: the model's own distribution, with
the image slot excluded) and its `top` most likely alternatives; only such rows pay for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import itertools
import logging
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from minillava.generate import AnswerText, GenerationConfig, Generator, decode, forbid_image_slot, greedy
from minillava.model import positions_from_mask
from minillava.processor import Encoded

log = logging.getLogger("minillava.serve")


class QueueFull(RuntimeError):
    """The server already holds `max_queue` waiting jobs."""


@dataclass
class TokenLogprob:
    """One answer token's logprob, and its most likely alternatives (token, bytes, logprob), best first.

    `token` is the token's own text (its bytes decoded, U+FFFD for a piece of a multi-byte character);
    `bytes` its exact UTF-8 bytes, None for a special token (which adds no text to the answer)."""

    token: str
    bytes: list[int] | None
    logprob: float
    top: list[tuple[str, list[int] | None, float]] = field(default_factory=list)


@dataclass
class Finished:
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) | "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int  # tokens sampled for this row, the closing end-of-turn token included
    # the answer's tokens (those that put text in `text`; a stop string's tokens past it are left out), when
    # the job asked for logprobs
    logprobs: list[TokenLogprob] | None = None


# one step's logprob of one row: (token id, its logprob, [(alternative id, logprob)...] best first)
RawLogprob = tuple[int, float, list[tuple[int, float]]]


def token_logprob(logits: torch.Tensor, token: int, top: int) -> RawLogprob:
    """The log-softmax of one row's logits (V,) at `token`, and the `top` best tokens with theirs."""
    lp = logits.float().log_softmax(-1)
    best: list[tuple[int, float]] = []
    if top:
        values, ids = lp.topk(min(top, lp.shape[-1]))
        best = list(zip(ids.tolist(), values.tolist(), strict=True))
    return token, float(lp[token]), best


@dataclass
class Job:
    """One chat completion. The worker thread writes its events; the event loop reads them."""

    encoded: Encoded
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False  # (streamed answers: a last chunk with the token counts)
    logprobs: int | None = None  # None: none; n: each token's logprob and its n most likely alternatives
    loop: asyncio.AbstractEventLoop | None = None
    # ("delta", str) ... then ("done", Finished) or ("error", str); a streamed job with logprobs gets
    # ("logprobs", [TokenLogprob...]) before the delta (or the "done") whose text holds those tokens
    queue: asyncio.Queue | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    number: int = 0
    submitted: float = 0.0  # time.monotonic() when queued, for the time-to-first-token histogram

    @property
    def key(self) -> tuple:
        """Jobs with equal keys may share a batch (the sampler is per batch)."""
        if self.temperature == 0:
            return ("greedy",)
        if self.seed is not None:  # reproducible only if the batch around it is always the same: alone
            return ("seeded", self.number)
        return ("sample", self.temperature, self.top_p)

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, kind: str, value: object) -> None:
        if self.loop is None or self.queue is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under us: nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

    async def events(self) -> AsyncIterator[tuple[str, object]]:
        assert self.queue is not None
        while True:
            kind, value = await self.queue.get()
            yield kind, value
            if kind not in ("delta", "logprobs"):
                return


class _Row:
    """Per-row decoding state: the answer so far (the same stop and hold-back logic as `Generator.stream`)."""

    def __init__(self, job: Job, engine: BatchEngine) -> None:
        self.job = job
        self.engine = engine
        self.answer = AnswerText(engine.detokenize, job.stop, stream=job.stream)
        self.steps = 0
        self.done = False
        self.sampler: Any = None  # ContinuousEngine: this row's sampler
        self.last = 0  # ContinuousEngine: the token fed at the next step
        self.logprobs: list[RawLogprob] = []  # one per token of `answer.tokens` (jobs that ask for them)
        self.logprobs_sent = 0  # streaming: how many of them went out

    @property
    def wants_logprobs(self) -> bool:
        return self.job.logprobs is not None

    def step(self, token: int, logits: torch.Tensor | None = None) -> None:
        """Take the row's next token; `logits` (V,), what it was picked from, when the job wants logprobs."""
        self.steps += 1
        self.engine.metrics.tokens(1)
        if self.steps == 1:
            self.engine.metrics.first_token(time.monotonic() - self.job.submitted)
        if token in self.engine.stop_ids:
            self.finish("stop")
            return
        if logits is not None and self.wants_logprobs:
            self.logprobs.append(token_logprob(logits, token, self.job.logprobs or 0))
        piece = self.answer.add(token)
        if self.answer.stopped:
            self.finish("stop", piece)
            return
        if piece and self.wants_logprobs:
            self.emit_logprobs(self.covering(self.answer.sent))
        self.emit_delta(piece)
        if self.steps >= self.job.max_tokens:
            self.finish("length")

    def finish(self, reason: str, piece: str = "") -> None:
        piece += self.answer.finish()
        reported = None
        if self.wants_logprobs:
            # a stop string cuts the text: the tokens after the last one that puts text in the answer go
            count = self.covering(self.answer.text) if self.answer.stopped else len(self.logprobs)
            if len(self.logprobs) != len(self.answer.tokens):
                count = 0  # the model gave no logits for this row (cannot happen in the engines): report none
            self.emit_logprobs(count)
            reported = self.engine.describe(self.logprobs[:count])
        self.emit_delta(piece)
        prompt = len(self.job.encoded.input_ids)
        self.job.emit("done", Finished(self.answer.text, reason, prompt, self.steps, reported))
        self.done = True

    def covering(self, text: str) -> int:
        """The fewest answer tokens whose text starts with `text` (a prefix of the answer's text)."""
        tokens, count = self.answer.tokens, self.logprobs_sent
        while count < len(tokens) and not self.engine.detokenize(tokens[:count]).startswith(text):
            count += 1
        return count

    def emit_logprobs(self, upto: int) -> None:
        """Streaming: send the logprobs of the tokens up to `upto` not sent yet."""
        if not self.job.stream or upto <= self.logprobs_sent:
            return
        self.job.emit("logprobs", self.engine.describe(self.logprobs[self.logprobs_sent : upto]))
        self.logprobs_sent = upto

    def emit_delta(self, piece: str) -> None:
        if piece:
            self.job.emit("delta", piece)


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins (GPT-2's `bytes_to_unicode`) -> the bytes they stand for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: b for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


_BYTE_DECODER = _byte_decoder()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte tokens


class TokenTexts:
    """Token id -> (its own text, its exact bytes or None for a special token), cached per id.

    A token's bytes come from its vocabulary piece: byte-level BPE (GPT-2 style stand-ins) or SentencePiece
    (`▁` for a space, `<0xNN>` byte tokens); any other tokenizer: the token decoded on its own."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        decoder = repr(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None))
        self.byte_level = "ByteLevel" in decoder
        self.metaspace = "▁" in decoder or "Metaspace" in decoder
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
        self.cache: dict[int, tuple[str, list[int] | None]] = {}

    def __call__(self, token: int) -> tuple[str, list[int] | None]:
        if token not in self.cache:
            self.cache[token] = self._text(token)
        return self.cache[token]

    def _text(self, token: int) -> tuple[str, list[int] | None]:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if token in self.special or piece is None:
            return str(piece), None
        if self.byte_level and all(c in _BYTE_DECODER for c in piece):
            data = bytes(_BYTE_DECODER[c] for c in piece)
        elif self.metaspace and (m := _BYTE_FALLBACK.fullmatch(piece)):
            data = bytes([int(m[1], 16)])
        elif self.metaspace:
            data = piece.replace("▁", " ").encode()
        else:
            data = self.tokenizer.decode([token], skip_special_tokens=False).encode()
        return data.decode("utf-8", errors="replace"), list(data)


def release_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps freed image buffers (tens of MB per large image) in
    its arenas, so the server's RSS stays at its burst peak without this; a no-op off glibc."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _load_libc()

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Counters for `/metrics` (Prometheus text format), written by the worker, read by the event loop."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.generated = 0
        self.ttft_counts = [0] * len(TTFT_BUCKETS)  # per bucket, not cumulative
        self.ttft_sum, self.ttft_count = 0.0, 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) over the last window, for tokens/s
        self._lock = threading.Lock()

    def tokens(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.generated += n
            if self._recent and now - self._recent[-1][0] < 0.05:  # one entry per 50 ms keeps the deque short
                self._recent[-1] = (self._recent[-1][0], self._recent[-1][1] + n)
            else:
                self._recent.append((now, n))

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft_sum += seconds
            self.ttft_count += 1
            for i, edge in enumerate(TTFT_BUCKETS):
                if seconds <= edge:
                    self.ttft_counts[i] += 1
                    break

    def tokens_per_second(self) -> float:
        with self._lock:
            cutoff = time.monotonic() - self.window_s
            while self._recent and self._recent[0][0] < cutoff:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self.window_s

    def exposition(self, engine: BatchEngine) -> str:
        stats = engine.stats
        lines = [
            *_metric("minillava_queue_depth", "gauge", "requests waiting for a batch", engine.queued),
            *_metric("minillava_batch_size", "gauge", "rows in the batch being generated now", engine.running),
            *_metric("minillava_batches_total", "counter", "batches run", stats["batches"]),
            *_metric("minillava_requests_completed_total", "counter", "requests answered", stats["completed"]),
            *_metric("minillava_requests_cancelled_total", "counter", "requests cancelled", stats["cancelled"]),
            *_metric("minillava_generation_errors_total", "counter", "batches that failed", stats["errors"]),
            *_metric("minillava_generated_tokens_total", "counter", "tokens sampled", self.generated),
            *_metric(
                "minillava_tokens_per_second",
                "gauge",
                f"tokens sampled per second over the last {self.window_s:g} s",
                round(self.tokens_per_second(), 3),
            ),  # fmt: skip
            "# HELP minillava_time_to_first_token_seconds from queueing a request to its first token",
            "# TYPE minillava_time_to_first_token_seconds histogram",
        ]
        with self._lock:
            total = 0
            for edge, n in zip(TTFT_BUCKETS, self.ttft_counts, strict=True):
                total += n
                lines.append(f'minillava_time_to_first_token_seconds_bucket{{le="{edge:g}"}} {total}')
            lines += [
                f'minillava_time_to_first_token_seconds_bucket{{le="+Inf"}} {self.ttft_count}',
                f"minillava_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                f"minillava_time_to_first_token_seconds_count {self.ttft_count}",
            ]
        return "\n".join(lines) + "\n"


def _metric(name: str, kind: str, help: str, value: float) -> list[str]:
    return [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value}"]


class BatchEngine:
    """Owns the model: every forward pass runs on its single worker thread."""

    def __init__(
        self,
        generator: Generator,
        max_batch_size: int = 8,
        batch_wait_s: float = 0.005,
        max_queue: int = 256,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.generator = generator
        self.processor = generator.processor
        self.stop_ids = set(generator.stop_ids)
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_queue = max_queue
        # Rust tokenizers refuse concurrent mutable borrows; encode (request threads) and decode
        # (the worker) share this lock.
        self.tokenizer_lock = threading.Lock()
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._numbers = itertools.count(1)
        self._incoming = 0
        self._last_rows, self._last_end, self._pending_at_end = 0, 0.0, 0  # the previous batch, for the wait
        self.running = 0
        self.token_texts: TokenTexts | None = None  # made on first use: only logprobs need it
        self.metrics = Metrics()
        self.batch_sizes: dict[int, int] = {}  # batch size -> how many batches had it
        self.stats = {"batches": 0, "rows": 0, "completed": 0, "cancelled": 0, "errors": 0, "max_batch": 0}

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._worker, name="minillava-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            pending, self._pending = list(self._pending), deque()
            self._cond.notify_all()
        for job in pending:
            job.emit("error", "the server is shutting down")
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        return len(self._pending)

    # ---- the event loop's side ------------------------------------------------------------------
    def expect(self) -> None:
        """A request arrived and is being validated: a forming batch may wait a little for it."""
        with self._cond:
            self._incoming += 1

    def expected(self) -> None:
        """That request was queued (or refused)."""
        with self._cond:
            self._incoming -= 1
            self._cond.notify_all()

    def submit(self, job: Job) -> Job:
        """Queue a job; call from the event loop (its queue is created there)."""
        job.loop = asyncio.get_running_loop()
        job.queue = asyncio.Queue()
        job.number = next(self._numbers)
        job.submitted = time.monotonic()
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are already waiting")
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def encode(self, messages: list[dict[str, str]], images: list) -> Encoded:
        """Chat messages and decoded images -> one prompt; call from a worker thread, not the loop."""
        with self.tokenizer_lock:
            return self.processor.encode(messages, images, add_generation_prompt=True)

    def encode_text(self, text: str) -> Encoded:
        """A verbatim text prompt (no chat template, no images), for /v1/completions."""
        with self.tokenizer_lock:
            return self.processor.encode_raw(text)

    def detokenize(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.processor.tokenizer.decode(ids, skip_special_tokens=True)

    def describe(self, raw: list[RawLogprob]) -> list[TokenLogprob]:
        """Token ids -> their texts and bytes, for the client."""
        with self.tokenizer_lock:
            if self.token_texts is None:
                self.token_texts = TokenTexts(self.processor.tokenizer)
            return [
                TokenLogprob(*self.token_texts(token), logprob, [(*self.token_texts(t), v) for t, v in top])
                for token, logprob, top in raw
            ]

    # ---- the worker thread ----------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            try:
                batch = self._next_batch()
            except Exception:  # a bug here must not leave every later request waiting forever
                log.exception("the batcher failed to form a batch")
                time.sleep(0.01)
                continue
            if batch is None:
                return
            if not batch:
                continue
            self.running = len(batch)
            self.stats["batches"] += 1
            self.stats["rows"] += len(batch)
            self.stats["max_batch"] = max(self.stats["max_batch"], len(batch))
            self.batch_sizes[len(batch)] = self.batch_sizes.get(len(batch), 0) + 1
            try:
                self._run(batch)
            except Exception as e:  # never let one bad batch take the server down
                log.exception("generation failed for a batch of %d", len(batch))
                self.stats["errors"] += 1
                for job in batch:
                    job.emit("error", f"generation failed: {type(e).__name__}: {e}")
            finally:
                with self._cond:
                    self.running = 0
                    self._last_rows, self._last_end = len(batch), time.monotonic()
                    self._pending_at_end = len(self._pending)

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            # Wait `batch_wait_s` for company. Past that, and for at most `4 * batch_wait_s + 20 ms` in
            # all, wait only for requests already being validated (`incoming`) and, right after a batch
            # of several, for its clients' next requests: clients in a loop come back together, and
            # without this they settle into two half-full batches that take turns.
            start = time.monotonic()
            deadline, last_call = start + self.batch_wait_s, start + 4 * self.batch_wait_s + 0.02
            returning = self._last_rows > 1 and start - self._last_end < 0.1
            want = min(self.max_batch_size, self._pending_at_end + self._last_rows) if returning else 1
            while len(self._pending) < self.max_batch_size and not self._stopping:
                now = time.monotonic()
                if now < deadline:
                    until = deadline
                elif now < last_call and (self._incoming > 0 or len(self._pending) < want):
                    until = last_call
                else:
                    break
                self._cond.wait(until - now)
            live = [j for j in self._pending if not j.cancelled.is_set()]
            self.stats["cancelled"] += len(self._pending) - len(live)
            if not live:
                self._pending.clear()
                return []
            key = live[0].key
            batch = [j for j in live if j.key == key][: self.max_batch_size]
            chosen = {id(j) for j in batch}
            self._pending = deque(j for j in live if id(j) not in chosen)
            return batch

    def _run(self, batch: list[Job]) -> None:
        first = batch[0]
        cfg = GenerationConfig(
            max_new_tokens=max(j.max_tokens for j in batch),
            temperature=first.temperature,
            top_p=first.top_p,
            seed=first.seed,
        )
        rows = [_Row(job, self) for job in batch]
        data = self.processor.collate([job.encoded for job in batch], padding_side="left")
        had_images = data.get("pixel_values") is not None
        for job in batch:  # the batch tensor holds the pixels now; a finished job keeps none of them
            job.encoded = dataclasses.replace(job.encoded, pixel_values=None, image_sizes=None)
        try:
            self._decode(rows, data, cfg)
        finally:
            del data
            if had_images:
                release_memory()

    def _decode(self, rows: list[_Row], data: dict, cfg: GenerationConfig) -> None:
        gen = self.generator
        seen: list[torch.Tensor] = []  # the step's logits (B, V), when some row wants logprobs

        def observe(logits: torch.Tensor) -> None:
            seen[:] = [logits]

        extra = {"observe": observe} if any(row.wants_logprobs for row in rows) else {}
        steps = decode(gen.model, data, cfg, gen.stop_ids, self.processor.pad_token_id, **extra)
        try:
            for token, _ in steps:
                logits = seen.pop() if seen else None
                for r, (row, t) in enumerate(zip(rows, token.tolist(), strict=True)):
                    if row.done:
                        continue
                    if row.job.cancelled.is_set():
                        row.done = True
                        self.stats["cancelled"] += 1
                        continue
                    row.step(t, None if logits is None or not row.wants_logprobs else logits[r])
                    if row.done:
                        self.stats["completed"] += 1
                if all(row.done for row in rows) or self._stopping:
                    break
        finally:
            steps.close()
        for row in rows:  # decode ran out of steps (or the server is stopping)
            if not row.done:
                if self._stopping:
                    row.job.emit("error", "the server is shutting down")
                else:
                    row.finish("length")
                    self.stats["completed"] += 1


class _Running:
    """The continuous batch: its rows, their shared KV cache, attention mask, rotary positions and next logits."""

    def __init__(self, rows: list[_Row], cache, mask: torch.Tensor, logits: torch.Tensor) -> None:
        self.rows, self.cache, self.mask, self.logits = rows, cache, mask, logits
        self.position = positions_from_mask(mask)[:, -1:]  # (B, 1): the last real token's position

    def merge(self, other: _Running) -> None:
        """Append `other`'s rows; the shorter side is left-padded (masked slots, as in a left-padded batch)."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(other.mask, width)])
        self.position = torch.cat([self.position, other.position])
        self.logits = torch.cat([self.logits, other.logits])
        self.rows += other.rows

    def keep(self, live: list[int]) -> None:
        """Drop the finished rows, then the leading columns no remaining row attends to."""
        index = torch.tensor(live, device=self.mask.device)
        self.mask, self.position, self.logits = self.mask[index], self.position[index], self.logits[index]
        self.rows = [self.rows[i] for i in live]
        used = self.mask.any(0).nonzero()
        start = int(used[0]) if len(used) else 0
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros on the left of the sequence axis (-2 for (B, H, T, D) caches, -1 for (B, T) masks) up to `width`."""
    axis = -2 if t.dim() == 4 else -1
    missing = width - t.shape[axis]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([t.new_zeros(shape), t], dim=axis)


class _Prefill:
    """Newcomers whose prompts are being prefilled a chunk at a time: their spliced embeddings (images already
    encoded), the left-padded mask, and the KV cache filled so far."""

    def __init__(self, jobs: list[Job], input_ids: torch.Tensor, mask: torch.Tensor, embeds: torch.Tensor) -> None:
        self.jobs, self.input_ids, self.mask, self.embeds = jobs, input_ids, mask, embeds  # (B, T), (B, T, D)
        self.cache, self.done = None, 0  # prompt positions already in the cache


class ContinuousEngine(BatchEngine):
    """Iteration-level batching: a waiting request is prefilled and joins the running batch, and a finished (or
    cancelled) one leaves it at once, so a short request never waits for a long one. Newcomers' prompts are
    prefilled `prefill_chunk` tokens at a time with a decode step of the running batch between chunks, so a long
    prompt delays the others' next token by one chunk, not by its whole length. Every row samples with its own
    settings (and its own seeded generator). Left padding and position ids counted over real tokens keep each
    row's greedy answer that of the row alone (float32).

    Needs fusion splice and a cache of full-attention layers (`supports`); otherwise use `BatchEngine`.
    """

    def __init__(self, *args: Any, prefill_chunk: int = 256, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if prefill_chunk < 0:
            raise ValueError("prefill_chunk must be 0 (a prompt at once) or positive")
        self.prefill_chunk = prefill_chunk

    @staticmethod
    def supports(generator: Generator) -> bool:
        from minillava.model import MiniLlava

        model = generator.model
        if not isinstance(model, MiniLlava):  # an export: its cache lives in its runtime, which cannot merge rows
            return False
        layers = getattr(model.llm.config, "layer_types", None) or []
        return model.config.fusion == "splice" and all(t == "full_attention" for t in layers)

    def _worker(self) -> None:
        running: _Running | None = None
        filling: _Prefill | None = None
        while True:
            try:
                if filling is None:  # newcomers are taken when the previous ones are in the batch
                    newcomers = self._take(wait=running is None)
                    if newcomers is None:
                        self._abort(running)
                        return
                    filling = self._begin(newcomers)
                if filling is not None:
                    joined = self._fill(filling)
                    if joined is not None:
                        running, filling = self._join(running, joined), None
                if running is not None:
                    running = self._step(running)
            except Exception as e:  # never let one bad step take the server down
                log.exception("generation failed")
                self.stats["errors"] += 1
                jobs = [r.job for r in running.rows if not r.done] if running else []
                for job in jobs + (filling.jobs if filling else []):
                    job.emit("error", f"generation failed: {type(e).__name__}: {e}")
                running = filling = None
            self.running = (len(running.rows) if running else 0) + (len(filling.jobs) if filling else 0)

    def _take(self, wait: bool) -> list[Job] | None:
        """Waiting jobs that fit in the batch (none: stopping); idle, wait for one and `batch_wait_s` more."""
        with self._cond:
            if wait:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                deadline = time.monotonic() + self.batch_wait_s
                while len(self._pending) < self.max_batch_size and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            if self._stopping:
                return None
            room = self.max_batch_size - self.running
            taken = []
            while self._pending and len(taken) < room:
                job = self._pending.popleft()
                if job.cancelled.is_set():
                    self.stats["cancelled"] += 1
                else:
                    taken.append(job)
            return taken

    def _begin(self, jobs: list[Job]) -> _Prefill | None:
        """Encode the newcomers' images and splice them into their embeddings, together; if that fails, each
        alone, so a failing prompt fails only itself and the others go on together."""
        if not jobs:
            return None
        try:
            return self._embed(jobs)
        except Exception:
            good = []
            for job in jobs:
                try:
                    self._embed([job], keep_pixels=True)
                    good.append(job)
                except Exception as e:
                    log.exception("prefill failed")
                    self.stats["errors"] += 1
                    job.emit("error", f"generation failed: {type(e).__name__}: {e}")
            return self._embed(good) if good else None

    @torch.inference_mode()
    def _embed(self, jobs: list[Job], keep_pixels: bool = False) -> _Prefill:
        data = self.processor.collate([job.encoded for job in jobs], padding_side="left")
        model = self.generator.model
        dev = model.device
        pixels, sizes, counts = data["pixel_values"], data.get("image_sizes"), data.get("image_counts")
        ids, mask = data["input_ids"].to(dev), data["attention_mask"].to(dev)
        embeds = model.embed(ids, None if pixels is None else pixels.to(dev),
                             image_sizes=None if sizes is None else sizes.to(dev), image_counts=counts)  # fmt: skip
        if not keep_pixels:  # the prompt's pixels live on as spliced embeddings; a job keeps none of them
            for job in jobs:
                job.encoded = dataclasses.replace(job.encoded, pixel_values=None, image_sizes=None)
        del data
        if pixels is not None:
            del pixels
            release_memory()
        return _Prefill(jobs, ids, mask, embeds)

    @torch.inference_mode()
    def _fill(self, f: _Prefill) -> _Running | None:
        """Prefill the next chunk of the newcomers' prompts; once the last is in, they are rows of a batch."""
        length = f.input_ids.shape[1]
        end = length if not self.prefill_chunk else min(length, f.done + self.prefill_chunk)
        out = self.generator.model(
            f.input_ids[:, f.done : end], f.mask[:, :end], past_key_values=f.cache, use_cache=True,
            logits_to_keep=1, inputs_embeds=f.embeds[:, f.done : end],
        )  # fmt: skip
        f.cache, f.done = out.past_key_values, end
        if end < length:
            return None
        rows = []
        for job in f.jobs:
            rows.append(_Row(job, self))
            rows[-1].sampler = _row_sampler(job, f.mask.device)
        return _Running(rows, f.cache, f.mask, out.logits[:, -1])

    def _join(self, running: _Running | None, joined: _Running) -> _Running:
        self.stats["rows"] += len(joined.rows)
        if running is None:  # "batches": runs of the batch from idle to idle
            self.stats["batches"] += 1
            running = joined
        else:
            running.merge(joined)
        self.running = len(running.rows)
        self.stats["max_batch"] = max(self.stats["max_batch"], self.running)
        self.batch_sizes[self.running] = self.batch_sizes.get(self.running, 0) + 1
        return running

    @torch.inference_mode()
    def _step(self, running: _Running) -> _Running | None:
        """Sample every row's next token, drop the rows that finished, run one decode step for the rest."""
        logits = running.logits.float()
        forbid_image_slot(logits, self.generator.model.config.image_token_id)
        picks = greedy(logits).tolist()  # one op for all greedy rows; sampled rows sample on their own
        live = []
        for i, row in enumerate(running.rows):
            if row.job.cancelled.is_set():
                self.stats["cancelled"] += 1
                continue
            token = picks[i] if row.sampler is None else row.sampler(logits[i])
            row.last = token
            row.step(token, logits[i] if row.wants_logprobs else None)
            if row.done:
                self.stats["completed"] += 1
            else:
                live.append(i)
        if self._stopping:
            self._abort(running)
            return None
        if not live:
            return None
        if len(live) < len(running.rows):
            running.keep(live)
        dev = running.mask.device
        tokens = torch.tensor([[row.last] for row in running.rows], device=dev)
        running.mask = torch.cat([running.mask, torch.ones_like(running.mask[:, :1])], dim=1)
        running.position = running.position + 1
        out = self.generator.model(
            tokens, running.mask, position_ids=running.position, past_key_values=running.cache, use_cache=True
        )
        running.cache, running.logits = out.past_key_values, out.logits[:, -1]
        return running

    def _abort(self, running: _Running | None) -> None:
        for row in running.rows if running else []:
            if not row.done:
                row.job.emit("error", "the server is shutting down")


def _row_sampler(job: Job, device: torch.device) -> Callable[[torch.Tensor], int] | None:
    """One row's sampler over its (V,) logits: greedy, or temperature/top-p with its own (seeded) generator."""
    if job.temperature == 0:
        return None  # greedy: the batch's argmax
    gen = torch.Generator(device=device)
    if job.seed is not None:
        gen.manual_seed(job.seed)
    else:
        gen.seed()

    def pick(logits: torch.Tensor) -> int:
        probs = (logits / job.temperature).softmax(-1)
        if job.top_p < 1:
            ordered, index = probs.sort(descending=True)
            drop = ordered.cumsum(-1) - ordered > job.top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(0, index, ordered.masked_fill(drop, 0))
        return int(torch.multinomial(probs, 1, generator=gen))

    return pick
