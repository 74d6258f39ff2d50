"""Write a Visualization: attention.json (the raw numbers), one summary plot (image_share.png for splice,
xattn.png for xattn) and one heatmap_<k>.png per generated token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from minillava.fileio import atomic_dir
from minillava.viz.attention import SpliceAttention, Visualization, XattnAttention

JSON_NAME = "attention.json"
COMMON_FIELDS = {
    "mode": "splice: the image is a run of tokens in the sequence, measured by the LLM's own attention on them | "
    "xattn: the image is one marker token read by gated cross-attention blocks; the numbers are in the object "
    "named after the mode",
    "heatmaps": "[token][row][col]: attention mass on each patch, mean over layers (xattn: blocks) and heads, each "
    "image token (xattn: latent) spread over the patches it comes from; sums to the mean image share (xattn: to 1)",
    "query_positions": "for each generated token, the sequence position whose attention predicted it",
}
MODE_FIELDS = {
    "splice": {
        "splice.image_share": "[token][layer][head]: attention mass on the image tokens of the query that predicted "
        "the token",
        "splice.image_span": "[start, end) of the image tokens in the sequence",
    },
    "xattn": {
        "xattn.layers": "the decoder layer each cross-attention block sits in front of",
        "xattn.latent_attention": "[token][block][head][latent]: the block's cross-attention probabilities over the "
        "image's resampler latents (each row sums to 1: a token reads only its latest image)",
        "xattn.gate": "[block]: tanh(attn_gate), the factor the block's cross-attention output is scaled by",
        "xattn.relative_norm": "[token][block]: |tanh(gate) * cross-attention output| / |residual stream| at the "
        "query: how much the image adds to what the token carries (0 while the gate is closed)",
    },
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
        if isinstance(vis.attention, XattnAttention):
            plot_xattn(vis, vis.attention, tmp / "xattn.png")
        else:
            plot_image_share(vis, vis.attention, tmp / "image_share.png")
        for k in range(len(vis.tokens)):
            plot_heatmap(vis, k, tmp / f"heatmap_{k}.png")


def rounded(t: torch.Tensor) -> list | float:  # 6 decimals keep the file readable; the numbers are probabilities
    return [rounded(x) for x in t] if t.dim() else round(float(t), 6)


def to_json(vis: Visualization) -> dict[str, Any]:
    att = vis.attention
    if isinstance(att, XattnAttention):
        numbers = {
            "layers": att.layers,
            "num_heads": att.latent_attention.shape[2],
            "num_latents": att.latent_attention.shape[3],
            "gate": rounded(att.gate),
            "latent_attention": rounded(att.latent_attention),
            "relative_norm": rounded(att.relative_norm),
        }
    else:
        numbers = {
            "num_layers": att.image_share.shape[1],
            "num_heads": att.image_share.shape[2],
            "image_span": list(att.image_span),
            "image_share": rounded(att.image_share),
        }
    return {
        "mode": att.mode,
        "prompt": vis.prompt,
        "answer": vis.answer,
        "tokens": vis.tokens,
        "token_ids": vis.token_ids,
        "projector": vis.projector,
        "sequence_length": len(vis.input_ids),
        "patch_grid": list(vis.heatmaps.shape[1:]),
        "query_positions": vis.query_positions,
        "heatmaps": rounded(vis.heatmaps),
        att.mode: numbers,
        "fields": {**COMMON_FIELDS, **MODE_FIELDS[att.mode]},
    }


def token_labels(vis: Visualization) -> list[str]:
    return [repr(t)[1:-1] for t in vis.tokens]


def plot_image_share(vis: Visualization, att: SpliceAttention, path: Path) -> None:
    """Left: share per generated token x layer (mean over heads). Right: per layer x head (mean over tokens)."""
    share = att.image_share.numpy()  # (G, L, H)
    tokens, layers, heads = share.shape
    width = max(4.0, 0.4 * tokens)
    fig = Figure(figsize=(width + 4.5, max(3.0, 0.25 * layers + 2.0)), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[width, 3.5])
    im = left.imshow(share.mean(2).T, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
    left.set_xticks(range(tokens), token_labels(vis), rotation=60, fontsize=7)
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


def plot_xattn(vis: Visualization, att: XattnAttention, path: Path) -> None:
    """Left: how much each block adds per generated token (its gate in the row label). Right: where each block
    and head reads among the latents (mean over tokens)."""
    norm = att.relative_norm.numpy()  # (G, X)
    latents = att.latent_attention.mean(0).flatten(0, 1).numpy()  # (X*H, Lat)
    tokens, blocks = norm.shape
    heads, n_latents = att.latent_attention.shape[2:]
    width = max(4.0, 0.4 * tokens)
    fig = Figure(figsize=(width + 5.5, max(3.0, 0.25 * blocks * heads + 2.0)), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[width, 4.5])
    im = left.imshow(norm.T, aspect="auto", origin="lower", vmin=0, cmap="magma")
    left.set_xticks(range(tokens), token_labels(vis), rotation=60, fontsize=7)
    left.set_yticks(
        range(blocks), [f"layer {i}\ntanh(gate) {g:+.2f}" for i, g in zip(att.layers, att.gate.tolist(), strict=True)]
    )
    left.tick_params(axis="y", labelsize=7)
    left.set_title("what the image adds:\n|gated cross-attention output| / |residual|", fontsize=9)
    fig.colorbar(im, ax=left, shrink=0.8)
    im = right.imshow(latents, aspect="auto", origin="lower", vmin=0, cmap="viridis")
    right.set_xticks(range(n_latents))
    right.set_xlabel("latent")
    right.set_yticks(range(blocks * heads), [f"L{i} h{h}" for i in att.layers for h in range(heads)], fontsize=7)
    right.set_title("cross-attention over the latents\n(mean over generated tokens)", fontsize=9)
    fig.colorbar(im, ax=right, label="attention probability", shrink=0.8)
    fig.savefig(path, dpi=100)


def headline(vis: Visualization, k: int | None = None) -> str:
    """What generated token k (None: all of them, on average) took from the image, in a few words."""
    att, pick = vis.attention, slice(None) if k is None else k
    if isinstance(att, XattnAttention):
        return f"xattn adds {float(att.relative_norm[pick].mean()):.1%} of |residual|"
    return f"{float(att.image_share[pick].mean()):.1%} of attention on the image"


def plot_heatmap(vis: Visualization, k: int, path: Path) -> None:
    """Generated token k's attention on the patch grid over the preprocessed picture, on its own colour scale
    (no colour bar: it would triple the drawing time; the numbers are in attention.json)."""
    size = vis.image.shape[0]
    fig = Figure(figsize=(4.0, 4.3))
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.86))
    ax.imshow(vis.image.numpy(), extent=(0, size, size, 0))
    ax.imshow(vis.heatmaps[k].numpy(), extent=(0, size, size, 0), cmap="inferno", alpha=0.55)
    peak = float(vis.heatmaps[k].max())
    ax.set_title(f"token {k} {vis.tokens[k]!r}\n{headline(vis, k)}, peak patch {peak:.1%}", fontsize=9)
    ax.set_axis_off()
    fig.savefig(path, dpi=100)
