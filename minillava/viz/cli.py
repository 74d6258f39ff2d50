"""`minillava viz`; registered on the main CLI by `add_commands`."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "viz",
        help="where the LLM's attention goes: share on the image per token, layer and head, and heatmaps",
        description="Generate greedily, then rerun the sequence once with eager attention and write attention.json, "
        "image_share.png and heatmap_<k>.png (one per generated token) into --out.",
    )
    p.add_argument("--model", required=True, help="a minillava dir or a transformers Llava dir")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--template", default=None, help="override the chat template; 'none' = prompt verbatim")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_viz)


def cmd_viz(args: argparse.Namespace) -> int:
    import minillava
    from minillava.viz import visualize, write_visualization
    from minillava.viz.plots import check_out_dir

    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")
    check_out_dir(args.out)  # before the model loads, not after the work
    model, processor = minillava.load(args.model, args.dtype)
    if args.template not in (None, "none"):
        processor = processor.with_template(args.template)
    vis = visualize(model, processor, args.image, args.prompt, args.max_new_tokens, raw=args.template == "none")
    write_visualization(vis, args.out)
    print(f"{args.out}: {len(vis.tokens)} tokens, {float(vis.image_share.mean()):.1%} of attention on the image")
    print(f"answer: {vis.answer}")
    return 0
