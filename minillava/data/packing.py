"""Sequence packing: a micro-batch's samples laid end to end in rows of at most a token budget.

    sampler.TokenBudgetSampler --fill_micro_batches--> micro-batches of R rows x budget, rows filled by tokens
    samples (n, W) right-padded by Processor.collate, lengths L_i
    --next_fit_rows (the sampler's rows, then balanced)--> rows, each a list of samples with sum(L_i) <= budget
    --pack_batch--> input_ids, labels, attention_mask, segment_ids, position_ids: (R, Wp), Wp = longest row

Each sample keeps its own block: `segment_ids` numbers the samples of a row 1, 2, ... (0: the row's padding
tail), `position_ids` restart at 0 at each sample, and the model attends with a block-diagonal causal mask
built from `segment_ids` once per forward (`block_causal_mask`), so no token sees another sample's tokens.
Samples are never split, so neither are their image token runs. The first label of each sample is
IGNORE_INDEX: in a row, the token before it is the previous sample's last token, which must not be trained to
predict it (unpacked, a sample's first token is never a target either). Images keep reading order: samples are
collated in row order, so pixel_values / cached features / image_sizes are already row-major.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

from minillava.processor import IGNORE_INDEX

# transformers attention implementations that take packed rows as position_ids (varlen kernels), no mask
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")


def check_fits(lengths: Sequence[int], budget: int, ids: Sequence[str] | None = None) -> None:
    """Raises, naming the sample, if one is longer than a row: samples are never split."""
    for i, n in enumerate(lengths):
        if n > budget:
            name = ids[i] if ids is not None else str(i)
            raise ValueError(f"--packing: sample {name} has {n} tokens, more than --max-tokens-per-batch {budget}")


def balance_rows(lengths: Sequence[int], rows: list[list[int]]) -> list[list[int]]:
    """The same number of rows refilled longest sample first into the emptiest row (LPT), kept only if its
    longest row is shorter: every row is padded to the longest, and an epoch's last micro-batch leaves rows part
    empty (e.g. 8 + 6 -> 7 + 7). Shorter than the given rows' longest means within the budget too."""
    load = [0] * len(rows)
    out: list[list[int]] = [[] for _ in rows]
    for i in sorted((i for row in rows for i in row), key=lambda k: (-lengths[k], k)):
        r = min(range(len(rows)), key=lambda j: (load[j], j))
        out[r].append(i)
        load[r] += lengths[i]
    width = max((sum(lengths[i] for i in row) for row in rows), default=0)
    return out if max(load, default=0) < width else rows


def fullest_row(sizes: Sequence[int], budget: int) -> list[int]:
    """Positions in `sizes` of a subset with the largest sum <= budget: subset sum over bit sets (bit t of
    reach[k]: some of the first k sizes sum to t). Walking back, a size is skipped whenever the sum is reachable
    without it, so the earliest sizes are preferred."""
    mask = (1 << (budget + 1)) - 1
    reach = [1]
    for n in sizes:
        reach.append((reach[-1] | (reach[-1] << n)) & mask)
    t = reach[-1].bit_length() - 1
    picked = []
    for k in range(len(sizes), 0, -1):
        if not (reach[k - 1] >> t) & 1:  # t needs size k - 1
            picked.append(k - 1)
            t -= sizes[k - 1]
    return picked[::-1]


def fill_micro_batches(
    order: Sequence[int], lengths: Sequence[int], budget: int, rows: int, pool: int = 0
) -> list[list[int]]:
    """Cut `order` into micro-batches of `rows` rows of at most `budget` tokens, each row as full as the pool
    allows (token-budget batching), instead of a fixed sample count whose rows come out part empty.

    The pool: the samples earlier micro-batches left, then the next ones of `order`, `pool` in all (default 16
    a row). Each row opens with the pool's oldest sample (so none waits for more than `pool` rows) and takes the
    subset of the others that fills it most (`fullest_row`): samples are a large share of a row (a 600-token
    sample fills a 1024 row only with one of the few ~400-token samples), so rows filled first-fit from the next
    samples stay ~7 % empty. Out: every index of `order` exactly once, row after row, each row in pool order; no
    row could take the next row's first sample (it was in the pool), so `next_fit_rows` recovers the rows.
    Deterministic (no RNG)."""
    check_fits(lengths, budget)
    pool = pool or 16 * rows
    out: list[list[int]] = []
    waiting: list[int] = []  # the pool, in arrival order
    rest = iter(order)
    while True:
        waiting += itertools.islice(rest, max(0, pool - len(waiting)))
        if not waiting:
            return out
        batch: list[int] = []
        for _ in range(rows):
            if not waiting:
                break
            # the oldest sample opens the row (none waits for more than `pool` rows), the fullest subset fills it
            first, others = waiting[0], waiting[1:]
            picked = set(fullest_row([lengths[i] for i in others], budget - lengths[first]))
            batch += [first] + [i for k, i in enumerate(others) if k in picked]
            waiting = [i for k, i in enumerate(others) if k not in picked]
        out.append(batch)


def next_fit_rows(lengths: Sequence[int], budget: int, ids: Sequence[str] | None = None) -> list[list[int]]:
    """Rows of samples taken in the given order, a new row wherever the next sample does not fit (the
    sampler's rows, as `fill_micro_batches` lays them out), then evened out by `balance_rows`."""
    check_fits(lengths, budget, ids)
    rows: list[list[int]] = []
    free = 0
    for i, n in enumerate(lengths):
        if n > free:
            rows.append([])
            free = budget
        rows[-1].append(i)
        free -= n
    return [sorted(r) for r in balance_rows(lengths, rows)]


def pack_batch(batch: dict[str, Any], rows: list[list[int]], pad_id: int) -> dict[str, Any]:
    """A collated batch whose samples are already in row order (row 0's samples, then row 1's, ...) -> packed rows.

    In: input_ids / labels / attention_mask (n, W), image_counts (n,). Out: the same keys (R, Wp) and (R,), plus
    segment_ids and position_ids (R, Wp); other keys (pixels, features, ids) pass through unchanged."""
    lengths = batch["attention_mask"].sum(-1).tolist()  # right padding: the real tokens are each row's prefix
    width = max(sum(lengths[i] for i in row) for row in rows)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    segments = torch.zeros(shape, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for k, i in enumerate(row, start=1):
            n = lengths[i]
            ids[r, at : at + n] = batch["input_ids"][i, :n]
            labels[r, at : at + n] = batch["labels"][i, :n]
            labels[r, at] = IGNORE_INDEX  # never a target: the token before it belongs to another sample
            segments[r, at : at + n] = k
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)  # the padding tail: its own block, positions from 0
    counts = batch["image_counts"]
    packed = dict(batch)
    packed.update(input_ids=ids, labels=labels, attention_mask=(segments > 0).long(), segment_ids=segments,
                  position_ids=positions, image_counts=torch.stack([counts[row].sum() for row in rows]),
                  rows=rows)  # fmt: skip
    return packed


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T)
    """Positions that restart at 0 wherever the segment changes (each packed sample, the padding tail)."""
    idx = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(-1).values  # where the current segment began
    return idx - first


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype, additive: bool) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) mask: query t sees key s iff s <= t and both lie in the same segment.

    Boolean (True: attend) for SDPA / flex; `additive` (0 or the dtype's min) for eager attention."""
    t = segment_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (segment_ids[:, None, :, None] == segment_ids[:, None, None, :]) & causal  # (B, 1, T, T)
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def packed_attention(
    segment_ids: torch.Tensor, attn_implementation: str | None, dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """What the decoder takes for packed rows: (attention_mask, position_ids).

    Varlen flash attention: no mask, position ids (transformers cuts the rows where positions restart). Every
    other implementation: the block-diagonal causal 4D mask, which transformers passes to every layer as it is."""
    positions = positions_from_segments(segment_ids)
    if attn_implementation in VARLEN_ATTENTION:
        return None, positions
    return block_causal_mask(segment_ids, dtype, additive=attn_implementation == "eager"), positions


def padding_waste(batches: Sequence[Sequence[int]], budget: int | None = None) -> float:
    """Share of the computed token slots that are padding: each batch of sample lengths padded to its longest
    (budget None), or packed in order into rows of `budget` tokens (`next_fit_rows`, as the collator does) and
    padded to its longest row."""
    real = total = 0
    for lengths in batches:
        if not lengths:
            continue
        real += sum(lengths)
        if budget is None:
            total += max(lengths) * len(lengths)
        else:
            rows = next_fit_rows(lengths, budget)
            total += max(sum(lengths[i] for i in r) for r in rows) * len(rows)
    return 0.0 if total == 0 else 1.0 - real / total
