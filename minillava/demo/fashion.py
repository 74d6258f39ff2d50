"""Fashion-MNIST class questions, from Debian's `dataset-fashion-mnist` package when it is installed.

Training and validation images come from the official train set (disjoint picks); the `fashion` test split
from t10k, read only to report. Every evaluation image is checked by its pixels against the training images
(and the splits against each other): a duplicate is left out and the next image taken.
"""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import numpy as np
from PIL import Image

from minillava.demo import phrasing
from minillava.demo.questions import PNG_LEVEL, Question, write_evaluation, write_training

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
# split -> (official file, phrasing families); the training split comes first: the others are checked against it
SPLITS = {"fashion_train": ("train", "train"), "fashion_val": ("train", "validation"), "fashion": ("t10k", "train")}


def available(root: Path = FASHION_DIR) -> bool:
    return (root / "train-images-idx3-ubyte.gz").exists() and (root / "t10k-images-idx3-ubyte.gz").exists()


def read_idx(path: Path) -> np.ndarray:
    """The IDX format: big-endian magic, dimensions, then raw uint8 data."""
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def generate(out: Path, sizes: dict[str, int], side: int = 112, seed: int = 0) -> dict[str, Path]:
    """Balanced random subsets for the splits named in `sizes` (keys of `SPLITS`), one question per image."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    seen: set[bytes] = set()  # raw 28 x 28 pixels of every image already in a split
    taken: dict[str, set[int]] = {"train": set(), "t10k": set()}
    for split in [s for s in SPLITS if s in sizes]:
        official, phrasings = SPLITS[split]
        images = read_idx(FASHION_DIR / f"{official}-images-idx3-ubyte.gz")
        labels = read_idx(FASHION_DIR / f"{official}-labels-idx1-ubyte.gz")
        rng = random.Random(f"{seed}-{split}")
        order = [k for k in rng.sample(range(len(labels)), len(labels)) if k not in taken[official]]
        questions: list[Question] = []
        for k in order:
            if len(questions) == sizes[split]:
                break
            key = images[k].tobytes()
            if key in seen:  # a duplicate would turn a held-out score into a training score (checked, not assumed)
                continue
            seen.add(key)
            taken[official].add(k)
            i = len(questions)
            name = f"images/{split}_{i:05d}.png"
            picture = Image.fromarray(255 - images[k]).resize((side, side), Image.Resampling.BICUBIC)
            picture.save(out / name, compress_level=PNG_LEVEL)
            question = phrasing.ask(rng, "fashion", phrasings)
            questions.append(Question(f"{split}_{i:05d}", name, "fashion", question, CLASSES[labels[k]]))
        if split == "fashion_train":
            files[split] = write_training(out / f"{split}.json", questions)
        else:
            files[split] = write_evaluation(out / f"{split}.jsonl", questions)
    return files
