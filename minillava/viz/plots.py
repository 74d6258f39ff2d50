"""Write a Visualization: attention.json (the raw numbers), image_share.png and one heatmap_<k>.png per token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from minillava.fileio import atomic_dir
from minillava.viz.attention import Visualization

JSON_NAME = "attention.json"
FIELDS = {
    "image_share": "[token][layer][head]: attention mass on the image tokens of the query that predicted the token",
    "heatmaps": "[token][row][col]: attention mass on each patch (image tokens spread over the patches they come "
    "from), mean over layers and heads",
    "image_span": "[start, end) of the image tokens in the sequence",
    "query_positions": "for each generated token, the sequence position whose attention predicted it",
}


def check_out_dir(out: Path) -> None:
    """Writing replaces `out` whole, so it must be new, empty, or an earlier viz."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / JSON_NAME).exists())):
        raise ValueError(f"{out} exists and is not a viz output directory; choose a new --out")


def write_visualization(vis: Visualization, out: str | Path) -> None:
    """All files into `out` at once (one rename of a finished temp dir)."""
    out = Path(out)
    check_out_dir(out)
    with atomic_dir(out) as tmp:
        (tmp / JSON_NAME).write_text(json.dumps(to_json(vis)) + "\n")
        plot_image_share(vis, tmp / "image_share.png")
        for k in range(len(vis.tokens)):
            plot_heatmap(vis, k, tmp / f"heatmap_{k}.png")


def to_json(vis: Visualization) -> dict[str, Any]:
    def rounded(t: torch.Tensor) -> list | float:  # 6 decimals keep the file readable; shares are probabilities
        return [rounded(x) for x in t] if t.dim() else round(float(t), 6)

    layers, heads = vis.image_share.shape[1:]
    return {
        "prompt": vis.prompt,
        "answer": vis.answer,
        "tokens": vis.tokens,
        "token_ids": vis.token_ids,
        "projector": vis.projector,
        "num_layers": layers,
        "num_heads": heads,
        "sequence_length": len(vis.input_ids),
        "image_span": list(vis.image_span),
        "patch_grid": list(vis.heatmaps.shape[1:]),
        "query_positions": vis.query_positions,
        "image_share": rounded(vis.image_share),
        "heatmaps": rounded(vis.heatmaps),
        "fields": FIELDS,
    }


def plot_image_share(vis: Visualization, path: Path) -> None:
    """Left: share per generated token x layer (mean over heads). Right: per layer x head (mean over tokens)."""
    share = vis.image_share.numpy()  # (G, L, H)
    tokens, layers, heads = share.shape
    width = max(4.0, 0.4 * tokens)
    fig = Figure(figsize=(width + 4.5, max(3.0, 0.25 * layers + 2.0)), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[width, 3.5])
    im = left.imshow(share.mean(2).T, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
    left.set_xticks(range(tokens), [repr(t)[1:-1] for t in vis.tokens], rotation=60, fontsize=7)
    left.set_title("share of attention on the image\n(mean over heads)", fontsize=9)
    right.imshow(share.mean(0), aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
    right.set_xticks(range(heads))
    right.set_xlabel("head")
    right.set_title("per head\n(mean over generated tokens)", fontsize=9)
    for ax in (left, right):
        ax.set_yticks(range(layers))
        ax.set_ylabel("layer")
    fig.colorbar(im, ax=[left, right], label="share of attention mass", shrink=0.8)
    fig.savefig(path, dpi=100)


def plot_heatmap(vis: Visualization, k: int, path: Path) -> None:
    """Generated token k's attention on the patch grid over the preprocessed picture, on its own colour scale
    (no colour bar: it would triple the drawing time; the numbers are in attention.json)."""
    size = vis.image.shape[0]
    fig = Figure(figsize=(4.0, 4.3))
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.86))
    ax.imshow(vis.image.numpy(), extent=(0, size, size, 0))
    ax.imshow(vis.heatmaps[k].numpy(), extent=(0, size, size, 0), cmap="inferno", alpha=0.55)
    share, peak = float(vis.image_share[k].mean()), float(vis.heatmaps[k].max())
    ax.set_title(
        f"token {k} {vis.tokens[k]!r}\n{share:.0%} of attention on the image, peak patch {peak:.1%}", fontsize=9
    )
    ax.set_axis_off()
    fig.savefig(path, dpi=100)
