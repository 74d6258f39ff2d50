"""Plot the speed ratios (ours / peer) recorded in docs/benchmarks/*.json into docs/benchmarks/ratios.png."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"


def ratios() -> dict[str, float]:
    gen = json.loads((DOCS / "generate-cpu-avx2.json").read_text())
    train = json.loads((DOCS / "train-cpu-avx2.json").read_text())
    return {
        "generate b1": gen["gen_b1_ratio_ours_fp32_vs_peer_fp32"],
        "generate b4": gen["gen_b4_ratio_ours_fp32_vs_peer_fp32"],
        "stage 1 step": train["speedup_stage1_vs_peer_fp32"],
        "stage 2 step": train["speedup_stage2_vs_peer_fp32"],
        "stage 1, warm cache": train["ours_stage1_step_s"] / train["ours_stage1_cached_step_s"]
        * train["speedup_stage1_vs_peer_fp32"],
    }


def main() -> None:
    r = ratios()
    fig, ax = plt.subplots(figsize=(6.5, 3))
    ax.barh(list(r), list(r.values()), color="tab:blue")
    ax.axvline(1.0, color="black", linewidth=0.8)
    for y, v in enumerate(r.values()):
        ax.text(v + 0.02, y, f"{v:.2f}x", va="center")
    ax.set_xlabel("speed vs transformers Llava (fp32, same run)")
    ax.set_xlim(0, max(r.values()) * 1.25)
    fig.tight_layout()
    fig.savefig(DOCS / "ratios.png", dpi=110)


if __name__ == "__main__":
    main()
