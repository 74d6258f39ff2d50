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
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_TOKEN = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
FORMATS = ("auto", "llava", "coco", "captions")


class BadSampleError(ValueError):
    """A sample that cannot be trained on; the message names the file, the sample id and the reason."""


@dataclass
class Record:
    id: str
    source: str  # "file:index"
    images: list[str] = field(default_factory=list)  # paths as written in the file (relative to image root)
    messages: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None  # structural problem found while parsing

    def where(self) -> str:
        return f"{self.source} (id {self.id})"


def _read_json_or_jsonl(path: Path) -> tuple[Any, bool]:
    """The parsed JSON document, or a list of JSONL rows (a bad row becomes an error dict)."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix != ".jsonl" and stripped[:1] in ("[", "{"):
        try:
            return json.loads(text), False
        except json.JSONDecodeError as e:
            if stripped[:1] == "[":
                raise ValueError(f"{path}: not valid JSON: {e}") from None
            # a '{' start may still be JSONL: fall through
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            rows.append({"__error__": f"line {lineno} is not valid JSON: {e.msg}", "__line__": lineno})
    return rows, True


def detect_format(path: Path, doc: Any) -> str:
    if isinstance(doc, dict) and "annotations" in doc and "images" in doc:
        return "coco"
    rows = doc if isinstance(doc, list) else []
    first = next((r for r in rows if isinstance(r, dict) and "__error__" not in r), None)
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
    doc, _ = _read_json_or_jsonl(path)
    fmt = detect_format(path, doc) if fmt == "auto" else fmt
    if fmt == "coco":
        return _coco(path, doc)
    if not isinstance(doc, list):
        raise ValueError(f"{path}: expected a JSON list of samples or JSONL rows for format {fmt!r}")
    if fmt == "llava":
        return [_llava(path, i, row) for i, row in enumerate(doc)]
    return [_caption_row(path, i, row) for i, row in enumerate(doc)]


def _sample_id(row: Any, index: int) -> str:
    if isinstance(row, dict) and row.get("id") is not None:
        return str(row["id"])
    return f"#{index}"


def _llava(path: Path, index: int, row: Any) -> Record:
    rec = Record(_sample_id(row, index), f"{path}:{index}")
    if not isinstance(row, dict):
        rec.error = f"sample is a {type(row).__name__}, not an object"
        return rec
    if "__error__" in row:
        rec.error = row["__error__"]
        rec.source = f"{path}:{row['__line__']}"
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


def _caption_row(path: Path, index: int, row: Any) -> Record:
    if not isinstance(row, dict):
        return Record(f"#{index}", f"{path}:{index}", error=f"row is a {type(row).__name__}, not an object")
    if "__error__" in row:
        return Record(f"#{index}", f"{path}:{row['__line__']}", error=row["__error__"])
    caption = row.get("caption", row.get("text"))
    return _caption_record(path, index, _sample_id(row, index), row.get("image"), caption)


def _captions_csv(path: Path) -> list[Record]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
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
