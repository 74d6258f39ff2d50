"""Batches grouped by modality and length (LLaVA's `group_by_modality_length`), resumable, rank-aware.

One *global batch* (one optimizer step) is `micro_batch * grad_accum * world_size` samples. Image and
text-only samples are shuffled separately and cut into global batches, each sorted by length so that its
micro-batches hold samples of similar length (little padding); the global batches are then shuffled. The
order depends only on (seed, epoch), never on global RNG state, so a resumed run sees the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


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

    def steps_per_epoch(self) -> int:
        return -(-len(self.lengths) // self.global_batch)

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
