"""Projector-only check: how well does the demo's projector read Fashion-MNIST after its word-space warm start,
before any LLM step? Seconds per setting instead of the demo's minutes, so settings are compared here first.

    python benchmarks/projector_check.py                                  # the demo's defaults, seed 0
    python benchmarks/projector_check.py --seed 2 --set word_warmup_steps=600 --set projector_options.pool=1

It builds the demo's data and base model for the given DemoConfig settings, fits the projector's input
standardisation and runs the warm start as `minillava demo` does (minillava.train.warmstart), then reads 1000
Fashion-MNIST validation images: from the official train set, disjoint from the training picks by pixels, never
trained on. Recipes are chosen on these; t10k, the test set, is read only by the demo's final report. The
class it reads is the spelled class name most likely under the warm start's own objective: each image token,
as a softmax over its cosines to the answers' words, spelling the name and then full stops. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minillava.data.dataset import Collator, SupervisedDataset  # noqa: E402
from minillava.demo import fashion, synthetic  # noqa: E402
from minillava.demo.questions import Question, write_training  # noqa: E402
from minillava.demo.run import DemoConfig, build_base  # noqa: E402
from minillava.runtime import fast_bfloat16  # noqa: E402
from minillava.train import warmstart  # noqa: E402
from minillava.train.cache import FeatureCache, namespace_for  # noqa: E402
from minillava.train.config import TrainConfig  # noqa: E402
from minillava.train.features import fit_feature_stats  # noqa: E402
from minillava.train.loop import seed_everything  # noqa: E402


def parse_settings(pairs: list[str]) -> dict:
    """`key=value` (value as JSON, else a string); `projector_options.key=value` sets one projector option."""
    settings: dict = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if key.startswith("projector_options."):
            settings.setdefault("projector_options", {})[key.split(".", 1)[1]] = value
        else:
            settings[key] = value
    return settings


def demo_data(cfg: DemoConfig, work: Path, n_val: int) -> tuple[Path, list[Path]]:
    """The demo's training data and `n_val` Fashion-MNIST validation images as training-format samples (their
    answers give each image's spelled class name) in `validation.json`."""
    root = work / f"data_seed{cfg.seed}_{cfg.n_train}_{cfg.n_fashion_train}_{n_val}_{cfg.image_size}px"
    if not (root / "validation.json").exists():
        synthetic.generate(root, {"train": cfg.n_train}, cfg.seed)
        fashion.generate(root, {"fashion_train": cfg.n_fashion_train, "fashion_val": n_val}, cfg.image_size, cfg.seed)
        rows = [json.loads(line) for line in (root / "fashion_val.jsonl").read_text().splitlines()]
        questions = [Question(r["question_id"], r["image"], "fashion", r["question"], r["answer"]) for r in rows]
        write_training(root / "validation.json", questions)
    return root, [root / "train.json", root / "fashion_train.json"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a DemoConfig setting")
    ap.add_argument("--work", default="projector-check", help="data and feature cache, reused between runs")
    ap.add_argument("--val-images", type=int, default=1000)
    args = ap.parse_args()
    settings = parse_settings(args.set)
    options = settings.pop("projector_options", {})
    try:
        cfg = DemoConfig(seed=args.seed, **settings)
    except TypeError as e:  # an unknown setting
        ap.error(f"--set: {e}")
    cfg.projector_options.update(options)
    work = Path(args.work)
    root, files = demo_data(cfg, work, args.val_images)

    seed_everything(cfg.seed)
    model, processor = build_base(cfg)
    device = torch.device("cpu")
    tower_dtype = torch.bfloat16 if fast_bfloat16(device) else torch.float32  # as the training run stores it
    model.vision.to(tower_dtype)
    cache = FeatureCache(str(work / "feature_cache"), namespace_for(model.vision, processor.image_transform,
                                                                   tower_dtype))  # fmt: skip
    collate = Collator(processor)
    train_set = SupervisedDataset([str(f) for f in files], processor, str(root), "auto", "error", False, cache)
    defaults = TrainConfig(model="unused", data=["unused"])
    t = time.perf_counter()
    fit_feature_stats(model, train_set, collate, cache, device, defaults.feature_stats_images, print)
    warm = warmstart.word_space_warmstart(
        model, train_set, collate, cache, device, cfg.word_warmup_steps, defaults.word_warmup_lr, cfg.seed, print,
        cfg.word_warmup_objective, cfg.warmup_images,
    )  # fmt: skip
    seconds = time.perf_counter() - t

    val_set = SupervisedDataset([str(root / "validation.json")], processor, str(root), "auto", "error", False, cache)
    special = set(processor.tokenizer.all_special_ids) | {processor.image_token_id}
    with torch.no_grad():
        feats, spelled = warmstart.collect(model, val_set, collate, cache, device, args.val_images, special)
        names = sorted({tuple(s) for s in spelled})  # each class name as the answers' tokens
        truth = torch.tensor([names.index(tuple(s)) for s in spelled])
        full_stop = processor.tokenizer.convert_tokens_to_ids(".")
        vocab = sorted({t for n in names for t in n} | {full_stop})
        targets = warmstart.caption_targets([list(n) for n in names], vocab, full_stop, model.tokens_per_image)
        words = F.normalize(model.llm.get_input_embeddings().weight[vocab].float(), dim=-1)  # (W, D)
        tokens = torch.cat([model.projector(f.to(model.projector_dtype)).float() for f in feats.split(256)])
        cos = torch.einsum("bnd,wd->bnw", F.normalize(tokens, dim=-1), words)  # (B, N, W)
        logp = (cos * warmstart.CAPTION_SCALE).log_softmax(-1)
        score = torch.stack([logp.gather(-1, t.expand(len(logp), -1)[..., None]).sum((1, 2)) for t in targets], 1)
        accuracy = (score.argmax(1) == truth).float().mean().item()
    print(json.dumps({"seed": cfg.seed, "settings": args.set, "fashion_val_accuracy": round(100 * accuracy, 1),
                      "val_images": len(truth), "warm_start_s": round(seconds, 1), "warm_start": warm}))  # fmt: skip


if __name__ == "__main__":
    main()
