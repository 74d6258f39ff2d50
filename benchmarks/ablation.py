"""The LLaVA family tree on one task: train the demo task with each projector / fusion variant under the same
budget and compare held-out accuracy, image tokens per image, training step time and generation speed.

    python benchmarks/ablation.py                       # all variants, writes docs/ablations.md + PNG + JSON
    python benchmarks/ablation.py --variants mlp2x_gelu,avgpool --align-steps 10 --instruct-steps 4

Every variant runs the demo's pipeline (minillava.demo.run.run_demo) on the same synthetic data (same seed):
DINOv2-S + SmolLM2-135M-Instruct, stage 1 align, stage 2 instruct with LoRA, evaluation on the held-out
`test` (new images) and `combo` (unseen colour-shape pairs) splits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minillava.demo.run import DemoConfig, run_demo  # noqa: E402

# name -> DemoConfig overrides. Pictures are 112 px = an 8 x 8 DINOv2 grid (64 patches); AnyRes reads them as a
# 56 px base view plus 56 px tiles (4 x 4 patches each) of a 112 x 112 canvas: 16 + 64 tokens + 8 row newlines.
VARIANTS: dict[str, dict] = {
    "linear": {"projector": "linear", "projector_options": {}},
    "mlp2x_gelu": {"projector": "mlp2x_gelu", "projector_options": {}},
    "avgpool": {"projector": "avgpool", "projector_options": {"pool": 2}},
    "pixel_shuffle": {"projector": "pixel_shuffle", "projector_options": {"factor": 2}},
    "perceiver": {"projector": "perceiver", "projector_options": {"num_latents": 16, "depth": 2, "heads": 6}},
    "xattn": {"projector": "perceiver", "projector_options": {"num_latents": 16, "depth": 2, "heads": 6},
              "fusion": "xattn", "xattn_every": 6},  # fmt: skip
    "anyres": {"projector": "mlp2x_gelu", "projector_options": {}, "tower_size": 56,
               "anyres": [[56, 112], [112, 56], [112, 112]]},  # fmt: skip
}


def generation_speed(model_dir: Path, data: Path, n: int = 4, new_tokens: int = 16) -> float:
    """Greedy tokens/s at batch 1 on held-out questions; no stop tokens, so every run decodes `new_tokens`."""
    import minillava
    from minillava.generate import GenerationConfig, decode
    from minillava.images import load_image

    model, processor = minillava.load(str(model_dir), "auto")
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()][: n + 1]
    config = GenerationConfig(max_new_tokens=new_tokens)
    pad = processor.tokenizer.pad_token_id or 0
    batches = [
        processor.collate([processor.encode([{"role": "user", "content": "<image>\n" + r["question"]}],
                                            [load_image(data / r["image"])], add_generation_prompt=True)], "left")
        for r in rows
    ]  # fmt: skip
    with torch.inference_mode():
        for _ in decode(model, batches[0], config, [], pad):  # warm-up
            pass
        t = time.perf_counter()
        for batch in batches[1:]:
            for _ in decode(model, batch, config, [], pad):
                pass
    return n * new_tokens / (time.perf_counter() - t)


def image_tokens(model_dir: Path, data: Path) -> float:
    """Mean image tokens per held-out image, as the processor expands them (AnyRes: depends on the size)."""
    import minillava
    from minillava.images import load_image

    model, processor = minillava.load(str(model_dir), "auto")
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()][:8]
    if model.config.fusion == "xattn":  # one marker in the text; the LLM cross-attends to the resampler's latents
        return float(model.projector.num_tokens(model.vision.patch_grid))
    counts = []
    for r in rows:
        enc = processor.encode([{"role": "user", "content": "<image>\nx"}], [load_image(data / r["image"])])
        counts.append(sum(i == model.config.image_token_id for i in enc.input_ids))
    return sum(counts) / len(counts)


def run_variant(name: str, base: DemoConfig, out: Path) -> dict:
    cfg = replace(base, out=str(out / name), **VARIANTS[name])
    if not cfg.anyres:  # the same pictures at the same tower size: one cache for all (AnyRes runs uncached)
        cfg.feature_cache = str(out / f"feature_cache_{cfg.image_size}")
    t = time.perf_counter()
    report = run_demo(cfg)
    wall = time.perf_counter() - t
    model_dir, data = Path(report["model"]), Path(cfg.out) / "data"
    return {
        "variant": name,
        "accuracy": {split: r["accuracy"] for split, r in report["eval"].items()},
        "by_type": report["eval"]["test"]["by_type"],
        "image_tokens": image_tokens(model_dir, data),
        "align_step_s": report["timings"]["align_s"] / max(cfg.align_steps, 1),
        "instruct_step_s": report["timings"]["instruct_s"] / max(cfg.instruct_steps, 1),
        "gen_tok_per_s": generation_speed(model_dir, data),
        "final_loss": {"align": report["align"].get("final_loss"), "instruct": report["instruct"].get("final_loss")},
        "wall_s": wall,
    }


def write_markdown(results: list[dict], budget: dict, path: Path, png: str) -> None:
    lines = [
        "# Ablation: the LLaVA family tree on the demo task",
        "",
        "Generated by `python benchmarks/ablation.py` (numbers below are from that run; JSON beside the PNG).",
        f"Budget per variant: {json.dumps(budget)}. Same data, seed and recipe for every variant; CPU, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        "| variant | image tokens / image | test acc | combo acc | align s/step | instruct s/step | gen tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        acc = r["accuracy"]
        lines.append(
            f"| {r['variant']} | {r['image_tokens']:.0f} | {100 * acc.get('test', float('nan')):.1f} % | "
            f"{100 * acc.get('combo', float('nan')):.1f} % | {r['align_step_s']:.2f} | {r['instruct_step_s']:.2f} | "
            f"{r['gen_tok_per_s']:.1f} |"
        )
    lines += ["", f"![ablation]({png})", ""]
    path.write_text("\n".join(lines) + "\n")


def plot(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for split, offset in (("test", -0.2), ("combo", 0.2)):
        axes[0].bar([i + offset for i in range(len(names))], [100 * r["accuracy"].get(split, 0) for r in results],
                    width=0.4, label=split)  # fmt: skip
    axes[0].set_title("held-out exact match (%)")
    axes[0].legend()
    axes[1].bar(names, [r["image_tokens"] for r in results], color="tab:green")
    axes[1].set_title("image tokens per image")
    axes[2].bar(names, [r["instruct_step_s"] for r in results], color="tab:red")
    axes[2].set_title("instruct step time (s)")
    for ax in axes:
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="/tmp/minillava-ablation")
    ap.add_argument("--n-train", type=int, default=300)
    ap.add_argument("--n-eval", type=int, default=100, help="questions per evaluation split")
    ap.add_argument("--align-steps", type=int, default=30)
    ap.add_argument("--instruct-steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--docs", default=str(ROOT / "docs"), help="where ablations.md and the PNG/JSON go")
    args = ap.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        sys.exit(f"ablation: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    budget = {"n_train": args.n_train, "align_steps": args.align_steps, "instruct_steps": args.instruct_steps,
              "batch_size": args.batch_size, "n_eval": args.n_eval}  # fmt: skip
    # the word-space warm start needs spliced tokens (not xattn, not AnyRes): off for all, so all get one recipe
    base = DemoConfig(fashion=False, eval_batch_size=16, word_warmup_steps=0, **budget)
    out = Path(args.out)
    results = []
    for name in names:  # each variant's result is kept in OUT/NAME/result.json: a rerun picks up where it stopped
        done = out / name / "result.json"
        if done.exists() and json.loads(done.read_text()).get("budget") == budget:
            results.append(json.loads(done.read_text())["result"])
        else:
            results.append(run_variant(name, base, out))
            done.write_text(json.dumps({"budget": budget, "result": results[-1]}))
        print(json.dumps(results[-1]), flush=True)
    docs = Path(args.docs)
    (docs / "benchmarks").mkdir(parents=True, exist_ok=True)
    (docs / "images").mkdir(parents=True, exist_ok=True)
    (docs / "benchmarks" / "ablation-cpu.json").write_text(json.dumps({"budget": budget, "results": results}, indent=1))
    plot(results, docs / "images" / "ablation.png")
    write_markdown(results, budget, docs / "ablations.md", "images/ablation.png")
    print(json.dumps({"budget": budget, "results": results}))


if __name__ == "__main__":
    main()
