"""Batches grouped by modality and length (LLaVA's `group_by_modality_length`), resumable, rank-aware.

One *global batch* (one optimizer step) is `micro_batch * grad_accum * world_size` samples. Image and
text-only samples are shuffled separately and cut into global batches, each sorted by length so that its
micro-batches hold samples of similar length (little padding); the global batches are then shuffled. The
order depends only on (seed, epoch), never on global RNG state, so a resumed run sees the same batches.

With --packing, `TokenBudgetSampler` fills micro-batches by tokens instead: as many samples as fit R rows of
the token budget (`packing.fill_micro_batches`), `grad_accum * world_size` micro-batches per optimizer step.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from minillava.data.packing import fill_micro_batches


def global_batches(
    lengths: list[int], global_batch: int, seed: int, epoch: int, group: bool = True, pad_to_full: bool = False
) -> list[list[int]]:
    """Index lists, one per optimizer step. `lengths` < 0 marks text-only samples (LLaVA's convention)."""
    rng = np.random.default_rng([seed, epoch])
    n = len(lengths)
    if not group:
        order = rng.permutation(n).tolist()
        chunks = [order[i : i + global_batch] for i in range(0, n, global_batch)]
    else:
        chunks, rests = [], []
        for group_ids in ([i for i in range(n) if lengths[i] > 0], [i for i in range(n) if lengths[i] <= 0]):
            perm = [group_ids[j] for j in rng.permutation(len(group_ids))]
            for i in range(0, len(perm), global_batch):
                chunk = sorted(perm[i : i + global_batch], key=lambda k: -abs(lengths[k]))
                (chunks if len(chunk) == global_batch else rests).append(chunk)
        if rests:  # the two modalities' remainders share one last mixed batch (or two, if large)
            mixed = sorted([k for c in rests for k in c], key=lambda k: -abs(lengths[k]))
            chunks += [mixed[i : i + global_batch] for i in range(0, len(mixed), global_batch)]
        chunks = [chunks[j] for j in rng.permutation(len(chunks))]
    if pad_to_full and chunks:  # every rank must get a sample in every micro-batch (no DDP hangs)
        flat = [k for c in chunks for k in c]
        for c in chunks:
            c += flat[: global_batch - len(c)] if len(c) < global_batch else []
    return chunks


class GroupedBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches, `grad_accum` per optimizer step, starting at `start_step`."""

    def __init__(
        self, lengths: list[int], micro_batch: int, grad_accum: int = 1, world_size: int = 1, rank: int = 0,
        seed: int = 0, group: bool = True,
    ) -> None:  # fmt: skip
        if micro_batch < 1 or grad_accum < 1:
            raise ValueError("batch size and gradient accumulation must be at least 1")
        self.lengths = lengths
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.world_size, self.rank = world_size, rank
        self.seed, self.group = seed, group
        self.epoch, self.start_step = 0, 0

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def steps_per_epoch(self, epoch: int | None = None) -> int:  # the same every epoch
        return -(-len(self.lengths) // self.global_batch)

    def describe(self) -> str:
        return (f"global batch {self.global_batch} ({self.micro_batch} x {self.grad_accum} accum x {self.world_size} "
                f"ranks)")  # fmt: skip

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def micro_batches(self, chunk: list[int]) -> list[list[int]]:
        """Split one global batch into this rank's `grad_accum` micro-batches (some empty at the tail)."""
        out = []
        for a in range(self.grad_accum):
            lo = (a * self.world_size + self.rank) * self.micro_batch
            out.append(chunk[lo : lo + self.micro_batch])
        return out

    def __iter__(self) -> Iterator[list[int]]:
        chunks = global_batches(
            self.lengths, self.global_batch, self.seed, self.epoch, self.group, pad_to_full=self.world_size > 1
        )
        for chunk in chunks[self.start_step :]:
            yield from self.micro_batches(chunk)

    def __len__(self) -> int:
        return (self.steps_per_epoch() - self.start_step) * self.grad_accum


class TokenBudgetSampler(Sampler[list[int]]):
    """--packing: this rank's micro-batches, each as many samples as fit `rows` rows of `budget` tokens, from a
    random order that depends only on (seed, epoch); `grad_accum` per optimizer step, starting at `start_step`.

    Step k takes the epoch's micro-batches k*A*W ... (k+1)*A*W - 1 (A = grad_accum, W = world_size); rank r gets
    a*W + r for a < A, so the ranks share one step's micro-batches. The steps per epoch vary a little with the
    epoch's order. At the epoch's tail, one process gets empty micro-batches (the loop skips them); several
    get the epoch's first micro-batches again, so that every rank has work (as `pad_to_full` does)."""

    def __init__(
        self, lengths: list[int], rows: int, budget: int, grad_accum: int = 1, world_size: int = 1, rank: int = 0,
        seed: int = 0,
    ) -> None:  # fmt: skip
        if rows < 1 or grad_accum < 1:
            raise ValueError("batch size and gradient accumulation must be at least 1")
        self.lengths = [abs(n) for n in lengths]  # exact token counts (a sign would only mark the modality)
        self.rows, self.budget, self.grad_accum = rows, budget, grad_accum
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.epoch, self.start_step = 0, 0
        self._cache: dict[int, list[list[int]]] = {}

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every micro-batch of the epoch, all ranks', in step order (computed once per epoch)."""
        if epoch not in self._cache:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths)).tolist()
            self._cache = {epoch: fill_micro_batches(order, self.lengths, self.budget, self.rows)}
        return self._cache[epoch]

    def steps_per_epoch(self, epoch: int | None = None) -> int:
        per_step = self.grad_accum * self.world_size
        return -(-len(self.epoch_batches(self.epoch if epoch is None else epoch)) // per_step)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def describe(self) -> str:
        return (f"global batch {self.grad_accum * self.world_size} micro-batches of {self.rows} packed rows x "
                f"{self.budget} tokens ({self.grad_accum} accum x {self.world_size} ranks)")  # fmt: skip

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches(self.epoch)
        per_step = self.grad_accum * self.world_size
        for step in range(self.start_step, self.steps_per_epoch()):
            for a in range(self.grad_accum):
                k = step * per_step + a * self.world_size + self.rank
                if k < len(batches):
                    yield batches[k]
                else:
                    yield batches[k % len(batches)] if self.world_size > 1 else []

    def __len__(self) -> int:
        return (self.steps_per_epoch() - self.start_step) * self.grad_accum
