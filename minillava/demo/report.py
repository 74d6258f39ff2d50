"""What the demo leaves behind: report.json, a loss curve over both stages, a grid of held-out answers."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402


def plot_losses(metric_files: list[Path], png: Path) -> None:
    """Training loss of consecutive stages on one step axis, with the stage boundaries marked."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    offset = 0
    for path in metric_files:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        steps = [r for r in records if "loss" in r and "step" in r]
        if not steps:
            continue
        ax.plot([offset + r["step"] for r in steps], [r["loss"] for r in steps], label=path.parent.name)
        offset += steps[-1]["step"]
        ax.axvline(offset, color="grey", linewidth=0.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("next-token loss (answers only)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def heldout_grid(predictions: list[dict], data: Path, png: Path, per_split: int = 4) -> None:
    """Held-out images with question, the model's answer and the ground truth (green right, red wrong)."""
    picks: list[dict] = []
    for split in dict.fromkeys(p["split"] for p in predictions):
        rows = [p for p in predictions if p["split"] == split]
        picks += rows[:: max(1, len(rows) // per_split)][:per_split]
    cols = 4
    rows = (len(picks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, p in zip(axes.flat, picks, strict=False):
        ax.imshow(Image.open(data / p["image"]).convert("RGB"))
        question = p["question"].split("\n")[0]
        ok = p.get("score", 0) >= 1
        ax.set_title(
            f"[{p['split']}] {textwrap.shorten(question, 40)}\nA: {textwrap.shorten(p['prediction'], 34)}\n"
            f"GT: {textwrap.shorten(str(p.get('answer')), 34)}",
            fontsize=8, color="green" if ok else "red",
        )  # fmt: skip
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def format_report(report: dict[str, Any], predictions: list[dict], n_examples: int = 4) -> str:
    """The table printed at the end of the demo: accuracy per split, question type and scene, then examples."""
    lines = ["", f"{'split':<13} {'type':<10} {'accuracy':>9} {'n':>6}  95 % interval"]
    for split, r in report["eval"].items():
        low, high = r["ci95"]
        lines.append(f"{split:<13} {'(all)':<10} {r['accuracy']:>9.1%} {r['n']:>6}  {low:.1%} - {high:.1%}")
        for qtype, acc in sorted(r["by_type"].items()):
            lines.append(f"{'':<13} {qtype:<10} {acc:>9.1%}")
        for scene, acc in sorted(r.get("by_scene", {}).items()):  # one shape, one kind counted, several kinds
            lines.append(f"{'':<13} {'(' + scene + ')':<10} {acc:>9.1%}")
    text = report["text_retention"]
    lines.append(f"text-only check (LLM knowledge, n {text['n']}, {text['dtype']}): {text['before']:.1%} before "
                 f"tuning, {text['after']:.1%} after")
    lines += ["", "sample conversations (held-out images):"]
    for p in predictions[:: max(1, len(predictions) // n_examples)][:n_examples]:
        lines.append(f"  [{p['split']}] {p['image']}")
        lines.append(f"    USER: {p['question'].splitlines()[0]}")
        lines.append(f"    MODEL: {p['prediction']}   (truth: {p.get('answer')})")
    t = report["timings"]
    align = f"align {t['align_s']:.0f} s, " if report.get("align") else ""
    lines.append(f"\ntotal {t['total_s']:.0f} s ({align}instruct {t['instruct_s']:.0f} s, eval {t['eval_s']:.0f} s); "
                 f"model in {report['model']}")  # fmt: skip
    return "\n".join(lines)
