"""Plot the speed ratios (ours / peer) recorded in docs/benchmarks/*.json into docs/benchmarks/ratios.png.

Three panels, each from one machine's JSON files: generation and training on an H200, training on 2 CPU cores
(float32 on both sides). A black tick marks what arithmetic allows a training ratio at equal precision (the
FLOP ratio, or for a warm feature cache the tower's share of a step; `bench_train.step_flops`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import SHAPES, flops_ours, flops_peer  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
Bar = tuple[str, float, float | None]  # label, ratio, arithmetic ceiling (None: not a FLOP question)


def load(name: str) -> dict:
    return json.loads((DOCS / name).read_text())


def flop_ratio(shape: str, stage: int) -> float:
    s = SHAPES[shape]
    return sum(flops_peer(s, stage).values()) / sum(flops_ours(s, stage).values())


def panels() -> dict[str, list[Bar]]:
    gen = load("generate-cuda-h200-2026-11-28.json")
    large = load("train-large-cuda-h200-2026-11-28.json")
    cpu = load("train-cpu-avx512-fp32-flops.json")
    epoch = load("cache-epoch-cpu-avx512.json")
    return {
        "H200, generation, bench shapes (ours bf16)": [
            ("batch 1 vs peer fp32", gen["gen_b1_ratio_ours_bf16_vs_peer_fp32"], None),
            ("batch 4 vs peer fp32", gen["gen_b4_ratio_ours_bf16_vs_peer_fp32"], None),
            ("batch 1 vs peer bf16", gen["gen_b1_ratio_ours_bf16_vs_peer_bf16"], None),
            ("batch 4 vs peer bf16", gen["gen_b4_ratio_ours_bf16_vs_peer_bf16"], None),
        ],
        "H200, training, large shape (ours bf16 autocast)": [
            ("stage 1 vs peer fp32", large["speedup_stage1_vs_peer_fp32"], None),
            ("stage 2 vs peer fp32", large["speedup_stage2_vs_peer_fp32"], None),
            ("stage 1 vs peer bf16", large["speedup_stage1_vs_peer_bf16_weights"], flop_ratio("large", 1)),
            ("stage 2 vs peer bf16", large["speedup_stage2_vs_peer_bf16_weights"], flop_ratio("large", 2)),
        ],
        "2 CPU cores (Xeon, no AMX), training, float32 both": [
            ("stage 1 vs peer", cpu["speedup_stage1_vs_peer_fp32"], cpu["flop_ratio_stage1"]),
            ("stage 2 vs peer", cpu["speedup_stage2_vs_peer_fp32"], cpu["flop_ratio_stage2"]),
            ("stage 1 warm cache vs none", cpu["stage1_speedup_warm_cache"], cpu["stage1_warm_cache_flop_bound"]),
            ("epoch warm cache vs none (built-ins)", epoch["speedup_warm_cache"], epoch["warm_cache_flop_bound"]),
        ],
    }


def main() -> None:
    p = panels()
    fig, axes = plt.subplots(len(p), 1, figsize=(7, 2.1 * len(p)))
    for ax, (title, bars) in zip(axes, p.items(), strict=True):
        labels = [b[0] for b in bars][::-1]
        values = [b[1] for b in bars][::-1]
        ax.barh(labels, values, color="tab:blue")
        for y, (_, v, ceiling) in enumerate(bars[::-1]):
            ax.text(max(v, ceiling or 0) + 0.03 * max(values), y, f"{v:.2f}x", va="center", fontsize=8)
            if ceiling is not None:
                ax.plot([ceiling, ceiling], [y - 0.4, y + 0.4], color="black", linewidth=2)
        ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlim(0, max(values) * 1.2)
        ax.set_title(title, fontsize=9, loc="left")
        ax.tick_params(labelsize=8)
    axes[-1].set_xlabel("speed ratio, ours / transformers' Llava, same run (black tick: FLOP ceiling)", fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "ratios.png", dpi=110)


if __name__ == "__main__":
    main()
