"""An independent probe of the demo's shape model: other people's pictures, other people's questions.

The demo trains a small VLM on synthetic pictures of coloured shapes and scores it on held-out pictures from
the same generator, asked in the same phrasings. That measures how well it learnt *that* generator, not
whether it learnt colours, shapes, sizes, positions and counts. This probe was written without reading the
demo's picture generator, its phrasings or its questions: only the list of concepts the model was trained on
(six colours, five shapes, small / large, five positions, counts 1 to 4, yes/no "is there a <colour> <shape>")
and the public Python API. Its pictures come from its own Pillow drawing code and conventions (light plain or
graded backgrounds, its own geometry for each shape, canvases of 128 to 320 px, square and not, optional dark
outlines, anti-aliased or not, some JPEG-compressed) and its questions from its own phrasings (at least six a
type, in varied styles). Its accuracy estimates how the demo's model does on data that someone else made.

Scoring: the response is normalised with `minillava.eval.metrics.normalize_answer` (the VQAv2 rules: lower
case, punctuation, number words to digits, articles dropped) and counts as correct when the expected answer
appears in it as a whole word. Accepted forms: counts as digits or words ("3" / "three"), "center" / "centre" /
"middle", "large" / "big", "small" / "little" / "tiny", a shape's plural. `strict_accuracy` additionally
rejects answers that also name another option of the same kind ("red or blue", "yes no").

    python benchmarks/outside_probe.py --model DIR [--n 300] [--seed 0] [--batch-size 32] [--out JSON]
                                       [--dump DIR] [--device cpu] [--threads N]

Prints one JSON object: overall accuracy with a 95 % Wilson interval, per-type accuracy, the CPU, and 20
errors. `--out` also writes every question's row; `--dump DIR` saves the first 24 pictures as PNG with their
questions (and runs without --model, to look at the probe alone).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import cpu_info
from PIL import Image, ImageDraw

from minillava.eval.metrics import normalize_answer, wilson_interval
from minillava.fileio import write_atomic

# ---- the domain: the only thing taken from the demo is this list of concepts -------------------------------

# plain colours, close to what each name usually means; each picture jitters them a little
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 32, 38),
    "green": (36, 158, 62),
    "blue": (38, 78, 212),
    "yellow": (246, 212, 28),
    "purple": (128, 48, 168),
    "orange": (244, 128, 24),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "star": "stars"}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
TYPES = ("shape", "colour", "size", "position", "count", "yesno")

# light backgrounds, far from every shape colour
BACKGROUNDS: list[tuple[int, int, int]] = [
    (255, 255, 255),
    (250, 248, 240),
    (240, 240, 240),
    (236, 242, 248),
    (244, 240, 228),
    (232, 244, 236),
    (248, 238, 242),
    (226, 228, 232),
]

# ---- questions, written for this probe --------------------------------------------------------------------
# placeholders: {colour}, {shape}, {shapes} (plural), {a} (the article for "{colour} {shape}")

PHRASINGS: dict[str, list[str]] = {
    "shape": [
        "What shape is this?",
        "which shape do you see",
        "Name the shape in the image.",
        "What kind of shape is drawn here? Answer with one word.",
        "tell me the name of the figure",
        "The picture shows one {colour} object. What shape is it?",
        "shape?",
        "Identify the geometric figure in this picture, please.",
    ],
    "colour": [
        "What colour is the shape?",
        "what color is it",
        "Name the colour of the {shape}.",
        "In one word, what colour is the figure in this picture?",
        "Tell me the color of the thing in the image",
        "colour of the {shape}?",
        "What is the fill colour of the {shape} shown here?",
    ],
    "size": [
        "Is the shape small or large?",
        "is the {shape} large or small",
        "How big is the {colour} {shape}: small or large?",
        "Describe the size of the shape in one word (small or large).",
        "Would you call the {shape} small or large?",
        "small or large?",
        "Tell me whether the figure is large or small.",
    ],
    "position": [
        "Where is the shape?",
        "where in the image is the {shape}",
        "Which part of the picture is the {colour} {shape} in?",
        "Is the shape on the left, on the right, at the top, at the bottom or in the center?",
        "Give the position of the object in one word.",
        "location of the {shape}?",
        "In which region of the frame does the figure sit?",
    ],
    "count": [
        "How many shapes are there?",
        "how many {shapes} can you see",
        "Count the {colour} {shapes} in the picture.",
        "What is the number of objects in this image?",
        "Tell me how many {shapes} are drawn.",
        "number of shapes?",
        "How many {colour} figures does the picture contain? Answer with a number.",
    ],
    "yesno": [
        "Is there {a} {colour} {shape} in the picture?",
        "is there {a} {colour} {shape}",
        "Does the image contain {a} {colour} {shape}?",
        "Can you see {a} {colour} {shape} here? Answer yes or no.",
        "Tell me if {a} {colour} {shape} appears in this image.",
        "{colour} {shape} present?",
        "do you spot any {colour} {shape} in the picture",
        "Is {a} {colour} {shape} shown?",
    ],
}

# the words a response may use for each answer, after normalize_answer (which already maps "three" to "3")
ALIASES: dict[str, set[str]] = {
    "center": {"center", "centre", "middle"},
    "large": {"large", "big"},
    "small": {"small", "little", "tiny"},
    **{s: {s, PLURALS[s]} for s in SHAPES},
}
# the options a question of each type chooses between (for the strict score)
OPTIONS: dict[str, list[str]] = {
    "shape": list(SHAPES),
    "colour": list(COLOURS),
    "size": list(SIZES),
    "position": list(POSITIONS),
    "count": [str(k) for k in COUNT_WORDS],
    "yesno": ["yes", "no"],
}


@dataclass
class Item:
    """One probe question about one picture."""

    index: int
    type: str
    question: str
    expected: str
    width: int
    height: int
    background: tuple[int, int, int]
    jpeg_quality: int | None  # None: a lossless picture
    shapes: list[dict[str, object]] = field(default_factory=list)  # what was drawn: colour, shape, centre, extent
    image: Image.Image | None = field(default=None, repr=False)


# ---- drawing ----------------------------------------------------------------------------------------------


def _rotate(points: list[tuple[float, float]], cx: float, cy: float, degrees: float) -> list[tuple[float, float]]:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def shape_outline(shape: str, cx: float, cy: float, extent: float, rng: random.Random) -> list[tuple[float, float]]:
    """The polygon of `shape` centred at (cx, cy), fitting a box about `extent` pixels wide (circle: a 40-gon)."""
    r = extent / 2
    if shape == "circle":
        rr = r * 0.92
        return [(cx + rr * math.cos(2 * math.pi * k / 40), cy + rr * math.sin(2 * math.pi * k / 40)) for k in range(40)]
    if shape == "square":
        h = r * 0.82
        pts = [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
        return _rotate(pts, cx, cy, rng.uniform(-12, 12))
    if shape == "triangle":  # equilateral, apex up; circumradius R spans R above the centre and R/2 below
        big = r * 1.08
        oy = cy + big / 4  # centre the bounding box, not the circumcentre
        pts = [(cx + big * math.cos(math.radians(a)), oy + big * math.sin(math.radians(a))) for a in (-90, 30, 150)]
        return _rotate(pts, cx, cy, rng.uniform(-10, 10))
    if shape == "diamond":  # a rhombus taller than it is wide, corners up, down, left and right
        w = r * rng.uniform(0.58, 0.78)
        return [(cx, cy - r), (cx + w, cy), (cx, cy + r), (cx - w, cy)]
    if shape == "star":  # five points, one up
        inner = r * rng.uniform(0.38, 0.5)
        oy = cy + r * 0.095
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else inner
            a = math.radians(-90 + 36 * k)
            pts.append((cx + rad * math.cos(a), oy + rad * math.sin(a)))
        return _rotate(pts, cx, cy, rng.uniform(-14, 14))
    raise ValueError(f"unknown shape {shape!r}")


def jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in rgb)  # type: ignore[return-value]


def render(item: Item, rng: random.Random) -> Image.Image:
    """Draw `item.shapes` on its background; maybe supersampled (anti-aliased), outlined, JPEG-compressed."""
    scale = rng.choice((1, 2, 3))
    w, h = item.width * scale, item.height * scale
    img = Image.new("RGB", (w, h), item.background)
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.3:  # a faint vertical gradient instead of a flat background
        bottom = jitter(item.background, rng, 14)
        for y in range(h):
            t = y / max(1, h - 1)
            row = tuple(round(a + (b - a) * t) for a, b in zip(item.background, bottom, strict=True))
            draw.line([(0, y), (w, y)], fill=row)
    outline = rng.random() < 0.35
    width = rng.randint(1, 3) * scale
    for spec in item.shapes:
        fill = jitter(COLOURS[str(spec["colour"])], rng, 12)
        pts = shape_outline(
            str(spec["shape"]), float(spec["cx"]) * scale, float(spec["cy"]) * scale, float(spec["extent"]) * scale, rng
        )
        dark = tuple(round(v * 0.55) for v in fill) if outline else None
        draw.polygon(pts, fill=fill, outline=dark, width=width if outline else 1)
    if scale > 1:
        img = img.resize((item.width, item.height), Image.Resampling.LANCZOS)
    if item.jpeg_quality is not None:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=item.jpeg_quality)
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img


def place(
    rng: random.Random, width: int, height: int, count: int, extent: float
) -> tuple[list[tuple[float, float]], float]:
    """Centres for `count` non-overlapping shapes of `extent` px (shrunk until they fit) and that extent."""
    for _ in range(20):
        margin = extent / 2 + 3
        centres: list[tuple[float, float]] = []
        for _ in range(400):
            if len(centres) == count:
                break
            x, y = rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)
            if all(math.hypot(x - a, y - b) > extent * 1.2 for a, b in centres):
                centres.append((x, y))
        if len(centres) == count:
            return centres, extent
        extent *= 0.88
    raise RuntimeError("could not place the shapes")


def position_centre(rng: random.Random, where: str, width: int, height: int, extent: float) -> tuple[float, float]:
    """A centre that plainly reads as `where`: near that edge and roughly centred along it, or mid-canvas."""
    half = extent / 2
    near_x = rng.uniform(0.03, 0.08) * width + half
    near_y = rng.uniform(0.03, 0.08) * height + half
    along_x = width / 2 + rng.uniform(-0.07, 0.07) * width
    along_y = height / 2 + rng.uniform(-0.07, 0.07) * height
    if where == "left":
        return near_x, along_y
    if where == "right":
        return width - near_x, along_y
    if where == "top":
        return along_x, near_y
    if where == "bottom":
        return along_x, height - near_y
    return width / 2 + rng.uniform(-0.04, 0.04) * width, height / 2 + rng.uniform(-0.04, 0.04) * height


# ---- items ------------------------------------------------------------------------------------------------


def phrase(rng: random.Random, kind: str, colour: str, shape: str) -> str:
    template = rng.choice(PHRASINGS[kind])
    article = "an" if colour[0] in "aeiou" else "a"
    return template.format(colour=colour, shape=shape, shapes=PLURALS[shape], a=article)


def make_item(seed: int, index: int) -> Item:
    """Item `index` of the probe with `seed`: the same for every --n (its own RNG, seeded by both)."""
    rng = random.Random(f"outside-probe/{seed}/{index}")
    kind = TYPES[index % len(TYPES)]
    side = rng.randint(128, 320)
    if rng.random() < 0.5:
        width = height = side
    else:
        width, height = side, rng.randint(128, 320)
        while abs(width - height) < 24:
            height = rng.randint(128, 320)
    short = min(width, height)
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    shapes: list[dict[str, object]] = []

    def add(c: str, s: str, x: float, y: float, e: float) -> None:
        shapes.append({"colour": c, "shape": s, "cx": round(x, 1), "cy": round(y, 1), "extent": round(e, 1)})

    if kind in ("shape", "colour"):
        centres, extent = place(rng, width, height, 1, short * rng.uniform(0.22, 0.6))
        add(colour, shape, *centres[0], extent)
        expected = shape if kind == "shape" else colour
    elif kind == "size":
        expected = SIZES[(index // len(TYPES)) % 2]
        extent = short * (rng.uniform(0.13, 0.2) if expected == "small" else rng.uniform(0.55, 0.75))
        centres, extent = place(rng, width, height, 1, extent)
        add(colour, shape, *centres[0], extent)
    elif kind == "position":
        expected = POSITIONS[(index // len(TYPES)) % len(POSITIONS)]
        extent = short * rng.uniform(0.18, 0.28)
        add(colour, shape, *position_centre(rng, expected, width, height, extent), extent)
    elif kind == "count":
        count = (index // len(TYPES)) % 4 + 1
        centres, extent = place(rng, width, height, count, short * rng.uniform(0.16, 0.26))
        for x, y in centres:
            add(colour, shape, x, y, extent)
        expected = str(count)
    else:  # yesno: 1-3 shapes of distinct kinds; asked about one present (even items) or one absent (odd)
        present: list[tuple[str, str]] = []
        wanted = rng.randint(1, 3)
        while len(present) < wanted:
            pair = (rng.choice(list(COLOURS)), rng.choice(SHAPES))
            if pair not in present:
                present.append(pair)
        centres, extent = place(rng, width, height, len(present), short * rng.uniform(0.2, 0.32))
        for (c, s), (x, y) in zip(present, centres, strict=True):
            add(c, s, x, y, extent)
        truth = (index // len(TYPES)) % 2 == 0
        if truth:
            colour, shape = rng.choice(present)
        else:  # a near miss (right shape wrong colour, or the reverse) or something entirely absent
            base_c, base_s = rng.choice(present)
            how = rng.choice(("colour", "shape", "both"))
            while True:
                colour = rng.choice(list(COLOURS)) if how != "shape" else base_c
                shape = rng.choice(SHAPES) if how != "colour" else base_s
                if (colour, shape) not in present:
                    break
        expected = "yes" if truth else "no"

    question = phrase(rng, kind, colour, shape)
    background = jitter(rng.choice(BACKGROUNDS), rng, 4)
    quality = rng.randint(55, 90) if rng.random() < 0.35 else None
    item = Item(index, kind, question, expected, width, height, background, quality, shapes)
    item.image = render(item, rng)
    return item


# ---- scoring ----------------------------------------------------------------------------------------------


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", normalize_answer(text)))


def accepted(answer: str) -> set[str]:
    norm = normalize_answer(answer)
    return ALIASES.get(answer, set()) | ALIASES.get(norm, set()) | {norm}


def score(kind: str, expected: str, response: str) -> tuple[bool, bool]:
    """(correct, strictly correct): the expected answer is a whole word of the normalised response; strictly,
    no other option of the same type is named too."""
    said = words(response)
    correct = bool(said & accepted(expected))
    others = [o for o in OPTIONS[kind] if o != expected and said & accepted(o)]
    return correct, correct and not others


# ---- running ----------------------------------------------------------------------------------------------


def dump(items: list[Item], directory: str) -> None:
    """The first 24 pictures as PNG, and questions.txt: file, type, question, expected answer."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["file\ttype\tquestion\texpected\tsize\tjpeg_quality"]
    for item in items[:24]:
        name = f"{item.index:03d}_{item.type}.png"
        assert item.image is not None
        item.image.save(out / name)
        lines.append(
            f"{name}\t{item.type}\t{item.question}\t{item.expected}\t{item.width}x{item.height}\t{item.jpeg_quality}"
        )
    (out / "questions.txt").write_text("\n".join(lines) + "\n")


def answer_all(model_dir: str, items: list[Item], batch_size: int, device: str | None) -> tuple[list[str], str]:
    """Greedy answers (8 new tokens at most) to every item, and the device they were computed on."""
    import minillava
    from minillava.generate import GenerationConfig, Generator

    model, processor = minillava.load(model_dir, "float32", device)
    model.eval()
    gen = Generator(model, processor)
    cfg = GenerationConfig(max_new_tokens=8, temperature=0)
    responses: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        samples = [gen.encode(item.question, [item.image]) for item in chunk]  # type: ignore[list-item]
        responses += gen.generate_batch(samples, cfg)
    return responses, str(model.device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (minillava.load); without it only --dump runs")
    ap.add_argument("--n", type=int, default=300, help="number of questions (types in turn)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", help="also write every question's row to this JSON file")
    ap.add_argument("--dump", help="save the first 24 pictures and their questions in this directory")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: minillava.load's choice)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.n < 1 or args.batch_size < 1:
        ap.error("--n and --batch-size must be positive")
    if not args.model and not args.dump:
        ap.error("give --model (to score) or --dump (to look at the pictures), or both")

    items = [make_item(args.seed, i) for i in range(args.n)]
    if args.dump:
        dump(items, args.dump)
    if not args.model:
        print(json.dumps({"dumped": min(24, len(items)), "dir": args.dump}))
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    try:
        responses, device = answer_all(args.model, items, args.batch_size, args.device)
    except (OSError, ValueError) as e:  # not a model directory, a broken one, an unknown device
        print(f"outside_probe.py: error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0

    rows = []
    for item, response in zip(items, responses, strict=True):
        ok, strict_ok = score(item.type, item.expected, response)
        row = asdict(item)
        row.pop("image")
        row.update(response=response, normalized=normalize_answer(response), correct=ok, strict_correct=strict_ok)
        rows.append(row)
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    lo, hi = wilson_interval(correct, n)
    per_type = {}
    for kind in TYPES:
        mine = [r for r in rows if r["type"] == kind]
        if mine:
            k = sum(r["correct"] for r in mine)
            per_type[kind] = {
                "n": len(mine),
                "correct": k,
                "accuracy": round(k / len(mine), 4),
                "strict_accuracy": round(sum(r["strict_correct"] for r in mine) / len(mine), 4),
            }
    errors = [
        {"type": r["type"], "question": r["question"], "expected": r["expected"], "response": r["response"]}
        for r in rows
        if not r["correct"]
    ]
    summary = {
        "probe": "outside_probe",
        "model": args.model,
        "seed": args.seed,
        "n": n,
        "correct": correct,
        "accuracy": round(correct / n, 4),
        "accuracy_ci95_wilson": [round(lo, 4), round(hi, 4)],
        "strict_accuracy": round(sum(r["strict_correct"] for r in rows) / n, 4),
        "per_type": per_type,
        **cpu_info(),
        "device": device,
        "seconds": round(seconds, 1),
        "errors_shown": min(20, len(errors)),
        "errors": errors[:20],
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        brief = {k: v for k, v in summary.items() if k != "errors"}
        write_atomic(args.out, json.dumps({"summary": brief, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
