"""`minillava data check`: validate a data set before a long run, and summarise it.

Every sample is parsed and checked (turn order, `<image>` markers vs images, empty turns), every image
opened and decoded, and, with a processor, every sample tokenised after image expansion to find those
over `max_length` and to draw a token-length histogram.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from minillava.data.dataset import SupervisedDataset
from minillava.data.formats import BadSampleError, describe_duplicates, duplicate_ids, load_records
from minillava.data.packing import padding_waste
from minillava.data.sampler import TokenBudgetSampler, global_batches
from minillava.images import ImageError, load_image
from minillava.processor import Processor


@dataclass
class CheckReport:
    samples: int = 0
    image_samples: int = 0
    text_only: int = 0
    images: int = 0
    unique_images: int = 0
    errors: list[str] = field(default_factory=list)  # "file:index (id X): reason"
    reasons: Counter = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=list)
    max_length: int | None = None
    duplicates: list[str] = field(default_factory=list)  # "file: N duplicate sample ids: ..." (a warning)

    @property
    def ok(self) -> bool:
        return not self.errors

    def histogram(self, bins: int = 8) -> list[tuple[int, int, int]]:
        if not self.lengths:
            return []
        lo, hi = min(self.lengths), max(self.lengths)
        width = max(1, -(-(hi - lo + 1) // bins))
        counts = Counter((n - lo) // width for n in self.lengths)
        return [(lo + b * width, lo + (b + 1) * width - 1, counts.get(b, 0)) for b in range(-(-(hi - lo + 1) // width))]

    def padding_line(self, batch_size: int, budget: int | None = None) -> str:
        """Padding waste of length-grouped micro-batches of `batch_size` samples padded to their longest, vs
        --packing's micro-batches of `batch_size` rows of `budget` tokens filled by tokens (epoch 0, seed 0)."""
        padded = [[self.lengths[i] for i in b] for b in global_batches(self.lengths, batch_size, seed=0, epoch=0)]
        budget = budget or self.max_length or max(self.lengths)
        budget = max(budget, max(self.lengths))
        filled = TokenBudgetSampler(self.lengths, batch_size, budget).epoch_batches(0)
        packed = [[self.lengths[i] for i in b] for b in filled]
        return (f"padding waste (batch {batch_size}, length-grouped): padded {padding_waste(padded):.1%}, "
                f"packed ({batch_size} rows of {budget} tokens) {padding_waste(packed, budget):.1%}")  # fmt: skip

    def format(self, max_errors: int = 20) -> str:
        lines = [
            f"samples: {self.samples} ({self.image_samples} with images, {self.text_only} text-only)",
            f"images: {self.images} references, {self.unique_images} distinct files",
        ]
        if self.lengths:
            s = sorted(self.lengths)
            lines.append(
                f"tokens after image expansion: min {s[0]}, median {s[len(s) // 2]}, max {s[-1]}"
                + (f" (max_length {self.max_length})" if self.max_length else "")
            )
            top = max(c for _, _, c in self.histogram())
            for a, b, c in self.histogram():
                lines.append(f"  {a:>6}-{b:<6} {c:>7}  {'#' * max(1 if c else 0, round(40 * c / top))}")
        else:
            lines.append("token lengths: not computed (give --model DIR to tokenise)")
        if self.errors:
            lines.append(f"errors: {len(self.errors)} bad samples")
            for reason, n in self.reasons.most_common():
                lines.append(f"  {n:>7} x {reason}")
            lines += [f"  {e}" for e in self.errors[:max_errors]]
            if len(self.errors) > max_errors:
                lines.append(f"  ... and {len(self.errors) - max_errors} more")
        else:
            lines.append("no errors")
        lines += [f"warning: {d}" for d in self.duplicates]
        return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    """A coarse category for the summary table (the full reason stays in each error line)."""
    for key in ("not found", "not a readable image", "cannot open", "<image> markers", "out of order", "is empty",
                "exceed max_length", "last turn", "not valid JSON", "no 'conversations'", "empty caption",
                "too many pixels", "over the limit", "no supervised", "not valid UTF-8",
                "leaves the image root"):  # fmt: skip
        if key in reason:
            return key
    return reason.split(":")[0][:60]


def check_data(
    files: list[str | Path], image_root: str | Path | None = None, processor: Processor | None = None,
    fmt: str = "auto", decode_images: bool = True, allow_outside_image_root: bool = False,
) -> CheckReport:  # fmt: skip
    report = CheckReport(max_length=processor.max_length if processor else None)
    root = Path(image_root).expanduser() if image_root else None
    if root is not None and not root.is_dir():
        raise OSError(f"{root}: image root is not a directory")
    image_status: dict[Path, str | None] = {}
    tokenizer_view = SupervisedDataset.__new__(SupervisedDataset)  # reuse its tokenise-and-check step
    tokenizer_view.processor, tokenizer_view.truncate, tokenizer_view.image_root = processor, False, root
    tokenizer_view.allow_outside_image_root = allow_outside_image_root

    def fail(where: str, reason: str) -> None:
        report.errors.append(f"{where}: {reason}")
        report.reasons[_reason_kind(reason)] += 1

    for f in files:
        records = load_records(f, fmt)
        dups = duplicate_ids(records)
        if dups:
            report.duplicates.append(f"{f}: {describe_duplicates(dups)}")
        for rec in records:
            report.samples += 1
            report.images += len(rec.images)
            if rec.images:
                report.image_samples += 1
            elif not rec.error:
                report.text_only += 1
            if rec.error:
                fail(rec.where(), rec.error)
                continue
            try:
                paths = tokenizer_view.image_paths(rec)  # the training loader's own path rules
            except BadSampleError as e:
                fail(rec.where(), str(e).split(f"{rec.where()}: ", 1)[-1])
                continue
            bad = False
            for path in paths:
                if path not in image_status:
                    image_status[path] = _image_problem(path, decode_images)
                if image_status[path]:
                    fail(rec.where(), image_status[path])
                    bad = True
            if processor is not None and not bad:
                try:
                    ids, _ = tokenizer_view.tokenize(rec)
                    report.lengths.append(len(ids))
                except BadSampleError as e:
                    fail(rec.where(), str(e).split(f"{rec.where()}: ", 1)[-1])
    report.unique_images = len(image_status)
    return report


def _image_problem(path: Path, decode: bool) -> str | None:
    if not path.is_file():
        return f"image {path} not found"
    if not decode:
        return None
    try:
        load_image(path)
    except ImageError as e:
        return str(e)
    return None
