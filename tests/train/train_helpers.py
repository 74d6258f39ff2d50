"""Tiny on-disk data sets for the training tests (images are 32x32 PNGs the tiny CLIP reads)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from minillava.train.config import TrainConfig

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}
CAPTIONS = {
    "red": "a red square on the left of a blue circle",
    "blue": "a small green triangle",
    "green": "The capital of France is Paris.",
    "yellow": "hello world, how are you today?",
}


def write_images(root: Path) -> dict[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    names = {}
    for i, (name, rgb) in enumerate(COLORS.items()):
        img = Image.new("RGB", (32, 32), rgb)
        ImageDraw.Draw(img).rectangle([4 + 4 * i, 4, 14 + 4 * i, 20], fill=(255 - rgb[0], 255 - rgb[1], 255 - rgb[2]))
        img.save(root / f"{name}.png")
        names[name] = f"{name}.png"
    return names


def write_llava(path: Path, names: dict[str, str], text_only: bool = True) -> Path:
    rows = [
        {"id": f"cap-{c}", "image": names[c],
         "conversations": [{"from": "human", "value": "<image>\nWhat is in the picture?"},
                           {"from": "gpt", "value": CAPTIONS[c]}]}
        for c in COLORS
    ]  # fmt: skip
    if text_only:
        rows.append({"id": "text-1", "conversations": [{"from": "human", "value": "yes no one two"},
                                                       {"from": "gpt", "value": "three four five"}]})  # fmt: skip
    path.write_text(json.dumps(rows))
    return path


def add_ghost(path: Path) -> list[dict]:
    """Append sample "ghost", whose image file does not exist, to a LLaVA JSON file; the rows it now holds."""
    rows = json.loads(path.read_text())
    turns = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a cat"}]
    rows.append({"id": "ghost", "image": "missing.png", "conversations": turns})
    path.write_text(json.dumps(rows))
    return rows


def config(tmp: Path, asset_dir, data: Path, images: Path, **kw) -> TrainConfig:
    base = dict(
        vision=str(asset_dir("vision", "clip")), llm=str(asset_dir("llm", "llama")), data=[str(data)],
        image_root=str(images), out=str(tmp / "run"), batch_size=5, num_workers=0, precision="fp32",
        progress=False, plot=False, warmup_ratio=0.0, scheduler="constant", seed=0,
    )  # fmt: skip
    base.update(kw)
    if base.get("model"):
        base["vision"] = base["llm"] = None
    cfg = TrainConfig(**base)
    cfg.validate()
    return cfg
