"""A stage-1 epoch through the real training loop, without a feature cache, filling one, and reading it warm.

Each variant is its own `minillava train --stage align --epochs 1` process, so the whole loop runs: DataLoader
workers decoding JPEG photos, preprocessing, the frozen tower (or the cache), the frozen LLM's forward and its
backward to the projector, AdamW; the time is the run's own (`summary.json`: the loop, model loading excluded).
The model is the built-in default
(DINOv2-S + SmolLM2-135M, real weights, no downloads) unless `--vision` / `--llm` name others. Beside the
measured ratio the JSON gives the ceiling arithmetic allows: a warm cache saves the tower's forward and the
image decoding, nothing else, so an epoch cannot speed up by more than (all FLOPs) / (FLOPs without the tower).

    python benchmarks/bench_cache_epoch.py                   # 64 photos, batch 8, best of 2 runs each
    python benchmarks/bench_cache_epoch.py --images 16 --reps 1 --out cache-epoch.json

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_json  # noqa: E402

from minillava.config import ModelConfig, VisionConfig
from minillava.model import MiniLlava

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "immunohistochemistry", "retina")


def write_photos(root: Path, n: int, seed: int = 0) -> Path:
    """`n` 640x480 JPEG crops of scikit-image's colour photos and a captions JSONL naming each photo."""
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = {name: getattr(data, name)() for name in PHOTOS}
    photos["stereo_motorcycle"] = photos["stereo_motorcycle"][0]  # the left view of a stereo pair
    rows = []
    for i in range(n):
        name = PHOTOS[i % len(PHOTOS)]
        img = Image.fromarray(photos[name][..., :3]).convert("RGB")
        w, h = img.size
        left, top = int(rng.integers(0, w // 4)), int(rng.integers(0, h // 4))
        img = img.crop((left, top, w - int(rng.integers(0, w // 4)), h - int(rng.integers(0, h // 4))))
        img.resize((640, 480)).save(root / f"{i:04d}.jpg", quality=90)
        rows.append({"id": f"photo-{i}", "image": f"{i:04d}.jpg", "caption": f"A photo: {name.replace('_', ' ')}."})
    data_file = root / "captions.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data_file


def epoch_seconds(args: list[str], out: Path, reps: int) -> tuple[float, dict | None]:
    """Best loop time of `reps` one-epoch `minillava train` processes, and the last run's cache counts."""
    best, cache = float("inf"), None
    for _ in range(reps):
        subprocess.run([sys.executable, "-m", "minillava.cli", "train", *args, "--out", str(out), "--overwrite",
                        "--no-progress", "--no-plot"], check=True, capture_output=True)  # fmt: skip
        summary = json.loads((out / "summary.json").read_text())
        best, cache = min(best, summary["seconds"]), summary["feature_cache"]
    return best, cache


def tower_share(model: MiniLlava, caption_tokens: float) -> float:
    """The tower's share of a stage-1 step's model FLOPs per sample: the tower's forward over the layers that
    run (2 N per token), the frozen LLM's forward and the input gradients that reach the projector (4 N per
    token), the projector (6 N per patch)."""
    patches = model.vision.patch_grid[0] * model.vision.patch_grid[1]
    vision = 2 * sum(p.numel() for p in model.vision.parameters_in_use()) * (patches + model.vision.prefix_tokens)
    llm_params = sum(p.numel() for p in model.llm.parameters()) - model.llm.get_input_embeddings().weight.numel()
    llm = 4 * llm_params * (model.tokens_per_image + caption_tokens)
    projector = 6 * sum(p.numel() for p in model.projector.parameters()) * patches
    return vision / (vision + llm + projector)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vision", default=VisionConfig.source)
    ap.add_argument("--llm", default=ModelConfig.llm_source)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2, help="one-epoch runs per variant; the best counts")
    ap.add_argument("--out", help="also write the JSON here (atomically)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_file = write_photos(work, args.images)

        common = ["--vision", args.vision, "--llm", args.llm, "--data", str(data_file), "--image-root", str(work),
                  "--stage", "align", "--epochs", "1", "--batch-size", str(args.batch_size), "--seed", "0",
                  "--keep-last", "1"]  # fmt: skip
        cached = [*common, "--feature-cache", str(work / "cache")]
        r: dict = {"bench": "cache_epoch", **machine(torch.device("cpu")), "vision": args.vision, "llm": args.llm,
                   "images": args.images, "batch_size": args.batch_size, "reps": args.reps}  # fmt: skip
        r["epoch_s_no_cache"], _ = epoch_seconds(common, work / "plain", args.reps)
        r["epoch_s_filling_cache"], _ = epoch_seconds(cached, work / "cold", 1)
        r["epoch_s_warm_cache"], counts = epoch_seconds(cached, work / "warm", args.reps)
        r["warm_cache_hits"], r["warm_cache_misses"] = counts["hits"], counts["misses"]
        model, processor = MiniLlava.from_pretrained(work / "warm" / "model")
        captions = [json.loads(line)["caption"] for line in data_file.read_text().splitlines()]
        share = tower_share(model, float(np.mean([len(processor.tokenizer.encode(c)) for c in captions])))
    r["speedup_warm_cache"] = r["epoch_s_no_cache"] / r["epoch_s_warm_cache"]
    r["tower_flop_share"] = share
    r["warm_cache_flop_bound"] = 1 / (1 - share)
    r["train_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024  # the largest run
    write_json({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}, args.out)


if __name__ == "__main__":
    main()
