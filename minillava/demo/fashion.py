"""Fashion-MNIST class questions, from Debian's `dataset-fashion-mnist` package when it is installed."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
QUESTION = "What kind of clothing item is this?"


def available(root: Path = FASHION_DIR) -> bool:
    return (root / "train-images-idx3-ubyte.gz").exists() and (root / "t10k-images-idx3-ubyte.gz").exists()


def read_idx(path: Path) -> np.ndarray:
    """The IDX format: big-endian magic, dimensions, then raw uint8 data."""
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def generate(out: Path, n_train: int, n_test: int, side: int = 112, seed: int = 0) -> dict[str, Path]:
    """Balanced random subsets: training images from the official train set, test images from t10k."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    files = {}
    for split, official, n in (("fashion_train", "train", n_train), ("fashion", "t10k", n_test)):
        images = read_idx(FASHION_DIR / f"{official}-images-idx3-ubyte.gz")
        labels = read_idx(FASHION_DIR / f"{official}-labels-idx1-ubyte.gz")
        rng = random.Random(f"{seed}-{split}")
        picks = rng.sample(range(len(labels)), n)
        records = []
        for i, k in enumerate(picks):
            name = f"images/{split}_{i:05d}.png"
            Image.fromarray(255 - images[k]).resize((side, side), Image.Resampling.BICUBIC).save(out / name)
            records.append((f"{split}_{i:05d}", name, CLASSES[labels[k]]))
        files[split] = _write(out, split, records)
    return files


def _write(out: Path, split: str, records: list[tuple[str, str, str]]) -> Path:
    if split == "fashion_train":
        data = [
            {"id": sid, "image": image, "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": answer}]}
            for sid, image, answer in records
        ]  # fmt: skip
        path = out / "fashion_train.json"
        path.write_text(json.dumps(data, indent=1))
        return path
    path = out / f"{split}.jsonl"
    with path.open("w") as f:
        for sid, image, answer in records:
            f.write(json.dumps({"question_id": sid, "image": image, "question": QUESTION, "answer": answer,
                                "category": "fashion"}) + "\n")  # fmt: skip
    return path
