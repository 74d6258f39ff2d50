"""Batched generation behind the server: one worker thread, requests grouped by sampling settings.

The event loop only enqueues jobs and reads their events. One worker thread takes the oldest waiting
job, waits a few milliseconds for company, and runs every waiting job that shares its sampling settings
(up to `max_batch_size`) as one left-padded batch through `minillava.generate.decode`. Each row keeps
its own `max_tokens`, stop strings and cancellation, so greedy rows come out exactly as they would
alone (the same text as `Generator.generate`). Streamed rows get text deltas as tokens arrive.

Batches are static: a job that arrives while a batch runs waits for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from minillava.generate import AnswerText, GenerationConfig, Generator, decode
from minillava.processor import Encoded

log = logging.getLogger("minillava.serve")


class QueueFull(RuntimeError):
    """The server already holds `max_queue` waiting jobs."""


@dataclass
class Finished:
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) | "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int  # tokens sampled for this row, the closing end-of-turn token included


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
    loop: asyncio.AbstractEventLoop | None = None
    queue: asyncio.Queue | None = None  # ("delta", str) ... then ("done", Finished) or ("error", str)
    cancelled: threading.Event = field(default_factory=threading.Event)
    number: int = 0

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
            if kind != "delta":
                return


class _Row:
    """Per-row decoding state: the answer so far (the same stop and hold-back logic as `Generator.stream`)."""

    def __init__(self, job: Job, engine: BatchEngine) -> None:
        self.job = job
        self.engine = engine
        self.answer = AnswerText(engine.detokenize, job.stop, stream=job.stream)
        self.steps = 0
        self.done = False

    def step(self, token: int) -> None:
        self.steps += 1
        if token in self.engine.stop_ids:
            self.finish("stop")
            return
        self.emit_delta(self.answer.add(token))
        if self.answer.stopped:
            self.finish("stop")
        elif self.steps >= self.job.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        self.emit_delta(self.answer.finish())
        prompt = len(self.job.encoded.input_ids)
        self.job.emit("done", Finished(self.answer.text, reason, prompt, self.steps))
        self.done = True

    def emit_delta(self, piece: str) -> None:
        if piece:
            self.job.emit("delta", piece)


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

    def detokenize(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.processor.tokenizer.decode(ids, skip_special_tokens=True)

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
        gen = self.generator
        steps = decode(gen.model, data, cfg, gen.stop_ids, self.processor.pad_token_id)
        try:
            for token, _ in steps:
                for row, t in zip(rows, token.tolist(), strict=True):
                    if row.done:
                        continue
                    if row.job.cancelled.is_set():
                        row.done = True
                        self.stats["cancelled"] += 1
                        continue
                    row.step(t)
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
