"""Deterministic synthetic visual-question data, rendered with Pillow.

Each image holds one to four coloured shapes and gets several questions (shape, colour, size, position,
counting, yes/no and a one-sentence description). Each training sample is one question about one image, as
evaluation asks them: in a multi-turn conversation the later answers can be read off the earlier ones (the
description repeats every attribute, a yes/no question names the shape and colour just answered), so the
model learns to copy from the conversation instead of looking at the image. Splits are honest: evaluation
images are never rendered for training, and the `combo` split uses colour-shape pairs that never occur in
training at all.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from minillava.demo.questions import Question, write_evaluation, write_training

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES = {"small": 0.16, "large": 0.30}  # radius as a fraction of the canvas side
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5)}
NUMBERS = ("zero", "one", "two", "three", "four")
# Pairs that never occur in training: the `combo` split asks about exactly these.
HELD_OUT_COMBOS = {
    ("green", "triangle"),
    ("blue", "star"),
    ("red", "diamond"),
    ("yellow", "square"),
    ("purple", "circle"),
}


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    size: str
    position: str


def draw_shape(draw: ImageDraw.ImageDraw, s: Shape, side: int, centre: tuple[float, float] | None = None) -> None:
    cx, cy = centre or POSITIONS[s.position]
    cx, cy, r = cx * side, cy * side, SIZES[s.size] * side
    fill = COLOURS[s.colour]
    if s.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif s.shape == "square":
        q = r * 0.85
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    elif s.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif s.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=fill)
    else:  # star: five points
        import math

        pts = [
            (cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
             cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5))
            for k in range(10)
        ]  # fmt: skip
        draw.polygon(pts, fill=fill)


def _combos(split: str) -> list[tuple[str, str]]:
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    if split == "combo":
        return sorted(HELD_OUT_COMBOS)
    return [p for p in pairs if p not in HELD_OUT_COMBOS]


def _askable(split: str) -> set[tuple[str, str]]:
    """Pairs a yes/no question may name: outside `combo`, never a held-out pair, not even in a question whose
    answer is "no" (it was: the model learnt "a yellow square? no" and said no to every yellow square)."""
    pairs = {(c, s) for c in COLOURS for s in SHAPES}
    return pairs if split == "combo" else pairs - HELD_OUT_COMBOS


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def single_shape_sample(rng: random.Random, split: str, side: int) -> tuple[Image.Image, list[tuple[str, str, str]]]:
    """One shape. Returns the image and (type, question, answer) triples."""
    colour, shape = rng.choice(_combos(split))
    s = Shape(colour, shape, rng.choice(list(SIZES)), rng.choice(list(POSITIONS)))
    img = Image.new("RGB", (side, side), (245, 245, 245))
    draw_shape(ImageDraw.Draw(img), s, side)
    wrong = sorted({(c, shape) for c in COLOURS if c != colour} | {(colour, x) for x in SHAPES if x != shape})
    askable = _askable(split)
    no = [p for p in wrong if p in askable]
    if split == "train":  # both answers about the same image: neither "yes" nor "no" can be said without looking
        asked = [((colour, shape), "yes"), (rng.choice(no), "no")]
    elif rng.random() < 0.5:  # evaluation: one question, yes or no at random
        asked = [((colour, shape), "yes")]
    else:
        asked = [(rng.choice(no), "no")]
    where = "in the center" if s.position == "center" else f"on the {s.position}"
    qa = [
        ("shape", "What shape is in the image?", shape),
        ("colour", f"What colour is the {shape}?", colour),
        ("size", f"Is the {shape} small or large?", s.size),
        ("position", f"Where is the {shape}: left, right, top, bottom or center?", s.position),
        ("describe", "Describe the image in one sentence.", f"A {s.size} {colour} {shape} {where}."),
        # last: their answers depend on the question, not only the image, so the warm start's caption (the
        # image's answers in order, cut to the image tokens) ends before them
        *(("yes/no", f"Is there {_article(c)} {c} {x} in the image?", answer) for (c, x), answer in asked),
    ]
    return img, qa


def count_sample(rng: random.Random, split: str, side: int) -> tuple[Image.Image, list[tuple[str, str, str]]]:
    """One to four small shapes of one kind in the four quadrants."""
    colour, shape = rng.choice(_combos(split))
    n = rng.randint(1, 4)
    img = Image.new("RGB", (side, side), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    for cx, cy in rng.sample([(0.27, 0.27), (0.73, 0.27), (0.27, 0.73), (0.73, 0.73)], n):
        draw_shape(draw, Shape(colour, shape, "small", "center"), side, (cx, cy))
    plural = shape if n == 1 else shape + "s"
    return img, [
        ("count", "How many shapes are in the image?", NUMBERS[n]),
        ("colour", f"What colour are the {plural}?" if n > 1 else f"What colour is the {shape}?", colour),
        ("describe", "Describe the image in one sentence.", f"{NUMBERS[n].capitalize()} small {colour} {plural}."),
    ]


def generate(out: Path, n_train: int, n_test: int, n_combo: int, side: int = 112, seed: int = 0) -> dict[str, Path]:
    """Write images + `train.json` (LLaVA format) + `test.jsonl` / `combo.jsonl` (eval format)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    files = {}
    for split, n in (("train", n_train), ("test", n_test), ("combo", n_combo)):
        rng = random.Random(f"{seed}-{split}")  # each split its own stream: changing one size leaves others
        questions = []
        for i in range(n):
            make = count_sample if rng.random() < 0.25 else single_shape_sample
            img, qa = make(rng, split, side)
            name = f"images/{split}_{i:05d}.png"
            img.save(out / name)
            questions += [Question(f"{split}_{i:05d}-{k}", name, *triple) for k, triple in enumerate(qa)]
        if split == "train":
            files[split] = write_training(out / "train.json", questions)
        else:
            files[split] = write_evaluation(out / f"{split}.jsonl", questions)
    return files
