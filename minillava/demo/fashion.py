"""Fashion-MNIST class questions, from Debian's `dataset-fashion-mnist` package when it is installed."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import numpy as np
from PIL import Image

from minillava.demo.questions import Question, write_evaluation, write_training

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
        questions = []
        for i, k in enumerate(picks):
            name = f"images/{split}_{i:05d}.png"
            Image.fromarray(255 - images[k]).resize((side, side), Image.Resampling.BICUBIC).save(out / name)
            questions.append(Question(f"{split}_{i:05d}", name, "fashion", QUESTION, CLASSES[labels[k]]))
        if split == "fashion_train":
            files[split] = write_training(out / "fashion_train.json", questions)
        else:
            files[split] = write_evaluation(out / "fashion.jsonl", questions)
    return files
