"""Read a data file into `Record`s, whatever its format, checking each sample's structure.

Formats (auto-detected from the file, or named with `fmt`):
- `llava`: LLaVA's JSON list (or JSONL) of `{"id", "image": "a.jpg" | ["a.jpg", ...],
  "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}`;
  no `"image"` means a text-only sample.
- `coco`: COCO captions (`captions_*.json` with `images` and `annotations`): one sample per caption.
- `captions`: JSONL or CSV rows of `{image, caption}` (alignment data).

A structural problem is never dropped silently: it becomes a `Record` with `error` set, and the dataset
either raises (naming file, sample id and reason) or skips and counts it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_TOKEN = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
FORMATS = ("auto", "llava", "coco", "captions")
logger = logging.getLogger(__name__)


class BadSampleError(ValueError):
    """A sample that cannot be trained on; the message names the file, the sample id and the reason."""


@dataclass
class Record:
    id: str  # "" for a row that could not be read at all (no id to name)
    # "file:N": the 1-based line of a JSONL or CSV row (the CSV header is line 1); "file:[i]": the 0-based index
    # of a sample in a JSON list; "file:annotations[i]": a COCO annotation
    source: str
    images: list[str] = field(default_factory=list)  # paths as written in the file (relative to image root)
    messages: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None  # structural problem found while parsing

    def where(self) -> str:
        return f"{self.source} (id {self.id})" if self.id else self.source


class _BadRow:
    """A JSONL line that could not be read (invalid UTF-8 or JSON): it becomes a bad sample, not a dead file."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _decode_error(path: Path, data: bytes, e: UnicodeDecodeError) -> str:
    line = data.count(b"\n", 0, e.start) + 1
    return f"{path}: not valid UTF-8 at byte offset {e.start} (line {line}): {e.reason}"


def _read_json_or_jsonl(path: Path) -> tuple[Any, list[int] | None]:
    """The parsed JSON document and None, or the JSONL rows and their 1-based line numbers.

    A JSONL line that is not valid UTF-8 or not valid JSON becomes a `_BadRow` (a bad sample at that line).
    """
    data = path.read_bytes()
    stripped = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    whole_file_error = None
    if path.suffix != ".jsonl" and stripped[:1] in (b"[", b"{"):
        try:
            return json.loads(data.decode("utf-8-sig")), None
        except UnicodeDecodeError as e:
            whole_file_error = _decode_error(path, data, e)
        except json.JSONDecodeError as e:
            whole_file_error = f"{path}: not valid JSON: {e}"
        if stripped[:1] == b"[":
            raise ValueError(whole_file_error)
        # a '{' start may still be JSONL: fall through (and name the whole-file problem if no line parses)
    rows: list[Any] = []
    lines: list[int] = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if not raw.strip():
            continue
        lines.append(lineno)
        try:
            rows.append(json.loads(raw.decode("utf-8")))
        except UnicodeDecodeError as e:
            rows.append(_BadRow(f"not valid UTF-8 at byte {e.start} of the line: {e.reason}"))
        except json.JSONDecodeError as e:
            rows.append(_BadRow(f"not valid JSON: {e.msg} (column {e.colno})"))
    if whole_file_error and all(isinstance(r, _BadRow) for r in rows):
        raise ValueError(whole_file_error)
    return rows, lines


def detect_format(path: Path, doc: Any) -> str:
    if isinstance(doc, dict) and "annotations" in doc and "images" in doc:
        return "coco"
    rows = doc if isinstance(doc, list) else []
    first = next((r for r in rows if isinstance(r, dict)), None)
    if first is None:
        if path.suffix == ".csv":
            return "captions"
        raise ValueError(f"{path}: no samples found (expected a JSON list, JSONL rows, COCO captions or CSV)")
    if "conversations" in first:
        return "llava"
    if "caption" in first or "text" in first:
        return "captions"
    raise ValueError(
        f"{path}: unknown data format: the first sample has keys {sorted(first)}; expected LLaVA "
        "'conversations', COCO 'images'+'annotations', or 'image'+'caption'"
    )


def load_records(path: str | Path, fmt: str = "auto") -> list[Record]:
    """Parse a data file into records. Raises for an unreadable file or unknown format only."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise OSError(f"{path}: data file not found")
    if path.suffix == ".csv":
        return _captions_csv(path)
    doc, lines = _read_json_or_jsonl(path)
    fmt = detect_format(path, doc) if fmt == "auto" else fmt
    if fmt == "coco":
        records = _coco(path, doc)
    elif not isinstance(doc, list):
        raise ValueError(f"{path}: expected a JSON list of samples or JSONL rows for format {fmt!r}")
    else:
        # positions: a JSONL row by its 1-based line, a JSON list's sample by its 0-based index: "file:[i]"
        wheres = [f"{path}:{n}" for n in lines] if lines is not None else [f"{path}:[{i}]" for i in range(len(doc))]
        parse = _llava if fmt == "llava" else _caption_row
        records = [parse(path, i, row, where) for i, (row, where) in enumerate(zip(doc, wheres, strict=True))]
    dups = duplicate_ids(records)
    if dups:
        logger.warning("%s: %s", path, describe_duplicates(dups))
    return records


def duplicate_ids(records: list[Record]) -> dict[str, int]:
    """Sample ids used more than once (id -> count), in order of first use; unreadable rows are left out."""
    counts: dict[str, int] = {}
    for r in records:
        if r.id:
            counts[r.id] = counts.get(r.id, 0) + 1
    return {k: n for k, n in counts.items() if n > 1}


def describe_duplicates(dups: dict[str, int], first: int = 5) -> str:
    shown = ", ".join(f"{k!r} (x{n})" for k, n in list(dups.items())[:first])
    more = f" and {len(dups) - first} more" if len(dups) > first else ""
    return f"{len(dups)} duplicate sample ids: {shown}{more}"


def _sample_id(row: Any, index: int) -> str:
    if isinstance(row, dict) and row.get("id") is not None:
        return str(row["id"])
    return f"#{index}"


def _llava(path: Path, index: int, row: Any, where: str) -> Record:
    if isinstance(row, _BadRow):
        return Record("", where, error=row.reason)
    rec = Record(_sample_id(row, index), where)
    if not isinstance(row, dict):
        rec.error = f"sample is a {type(row).__name__}, not an object"
        return rec
    image = row.get("image")
    if image is None:
        images = []
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, list) and all(isinstance(x, str) for x in image):
        images = list(image)
    else:
        rec.error = f"'image' must be a path or a list of paths, got {type(image).__name__}"
        return rec
    rec.images = images
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        rec.error = "no 'conversations' (needs a non-empty list of turns)"
        return rec
    messages = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            rec.error = f"turn {t} needs 'from' and 'value'"
            return rec
        role = ROLES.get(str(turn["from"]).lower())
        if role is None:
            rec.error = f"turn {t} has unknown speaker {turn['from']!r} (use human/gpt/system)"
            return rec
        if not isinstance(turn["value"], str) or not turn["value"].strip():
            rec.error = f"turn {t} ({turn['from']}) is empty"
            return rec
        messages.append({"role": role, "content": turn["value"]})
    rec.messages = messages
    rec.error = check_messages(messages, len(images))
    return rec


def check_messages(messages: list[dict[str, str]], num_images: int) -> str | None:
    """Turn order (system?, then user/assistant alternating, ending on assistant) and `<image>` count."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if any(m["role"] == "system" for m in body):
        return "a system turn may only come first"
    if not body:
        return "no user/assistant turns"
    for k, m in enumerate(body):
        expected = "user" if k % 2 == 0 else "assistant"
        if m["role"] != expected:
            return f"turns out of order: turn {k + len(messages) - len(body)} is {m['role']}, expected {expected}"
    if body[-1]["role"] != "assistant":
        return "the last turn is not an answer (nothing to learn from)"
    marks = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if any(IMAGE_TOKEN in m["content"] for m in messages if m["role"] == "assistant"):
        return "an <image> marker stands in an answer"
    if marks != num_images:
        return f"{marks} <image> markers in the text but {num_images} images"
    return None


def _caption_record(path: Path, index: int, sid: str, image: Any, caption: Any, where: str | None = None) -> Record:
    rec = Record(sid, where or f"{path}:{index}")
    if not isinstance(image, str) or not image:
        rec.error = "no image path"
        return rec
    rec.images = [image]
    if not isinstance(caption, str) or not caption.strip():
        rec.error = "empty caption"
        return rec
    if IMAGE_TOKEN in caption:
        rec.error = "an <image> marker stands in the caption"
        return rec
    rec.messages = [{"role": "user", "content": IMAGE_TOKEN}, {"role": "assistant", "content": caption.strip()}]
    return rec


def _caption_row(path: Path, index: int, row: Any, where: str) -> Record:
    if isinstance(row, _BadRow):
        return Record("", where, error=row.reason)
    if not isinstance(row, dict):
        return Record(f"#{index}", where, error=f"row is a {type(row).__name__}, not an object")
    caption = row.get("caption", row.get("text"))
    return _caption_record(path, index, _sample_id(row, index), row.get("image"), caption, where)


def _captions_csv(path: Path) -> list[Record]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(_decode_error(path, data, e)) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = reader.fieldnames or []
    if "image" not in fields or not ({"caption", "text"} & set(fields)):
        raise ValueError(f"{path}: a caption CSV needs the columns 'image' and 'caption', found {fields}")
    return [
        _caption_record(path, i, _sample_id(row, i), row.get("image"), row.get("caption", row.get("text")),
                        f"{path}:{i + 2}")  # fmt: skip
        for i, row in enumerate(reader)
    ]


def _coco(path: Path, doc: dict) -> list[Record]:
    if not isinstance(doc.get("images"), list) or not isinstance(doc.get("annotations"), list):
        raise ValueError(f"{path}: COCO captions need lists 'images' and 'annotations'")
    files = {im.get("id"): im.get("file_name") for im in doc["images"] if isinstance(im, dict)}
    records = []
    for i, ann in enumerate(doc["annotations"]):
        if not isinstance(ann, dict):
            records.append(Record(f"#{i}", f"{path}:annotations[{i}]", error="annotation is not an object"))
            continue
        sid = str(ann.get("id", f"#{i}"))
        file_name = files.get(ann.get("image_id"))
        rec = _caption_record(path, i, sid, file_name, ann.get("caption"), f"{path}:annotations[{i}]")
        if file_name is None:
            rec.error = f"image_id {ann.get('image_id')!r} is not in 'images'"
        records.append(rec)
    return records
