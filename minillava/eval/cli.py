"""`minillava eval`: score a model on a JSONL question file; registered on the main CLI by `add_commands`.

Errors are raised as ValueError / OSError with a one-line message; the caller's `main()` prints it and exits
non-zero. `python -m minillava.eval.cli eval ...` runs the command on its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minillava.eval.runner import METRICS


def add_commands(subparsers) -> None:
    """Register `eval` on the main CLI's subparsers."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on a JSONL question file (vqa, exact, choice, pope, caption)",
        description="Generate greedy answers in batches for every question in --data and score them. Writes "
        "predictions.jsonl and metrics.json into --out and prints the metrics.",
    )
    p.add_argument("--model", required=True, help="a minillava dir or a transformers Llava dir")
    p.add_argument("--data", required=True, help="JSONL: question_id, image, question, answer | answers | choices")
    p.add_argument("--image-root", help="directory the data's image paths are relative to (default: the data's dir)")
    p.add_argument("--metric", required=True, choices=METRICS)
    p.add_argument("--batch-size", type=_positive, default=8, help="questions generated together (default 8)")
    p.add_argument("--out", type=Path, help="output directory (default: ./minillava-eval/DATA-METRIC)")
    p.add_argument("--max-new-tokens", type=_positive, help="answer length cap (default 32; 64 for caption)")
    p.add_argument(
        "--prompt-suffix",
        help="instruction after the question (default: LLaVA's, e.g. 'Answer the question using a single word "
        "or phrase.'; '' for none)",
    )
    p.add_argument("--limit", type=_positive, help="evaluate only the first N questions")
    p.add_argument("--template", help="override the chat template")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: CUDA if available)")
    p.add_argument("--quantize", default=None, choices=["none", "int8"],
                   help="int8: per-channel int8 weights for the LLM and its LM head (faster CPU decoding)")  # fmt: skip
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=cmd_eval)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_eval(args: argparse.Namespace) -> int:
    from minillava.eval.runner import run

    out = args.out or Path("minillava-eval") / f"{Path(args.data).stem}-{args.metric}"
    metrics = run(
        args.model,
        args.data,
        args.metric,
        out,
        image_root=args.image_root,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        prompt_suffix=args.prompt_suffix,
        limit=args.limit,
        dtype=args.dtype,
        device=args.device,
        template=args.template,
        progress=args.progress,
        quantize=args.quantize,
    )
    print(json.dumps(metrics, indent=2))
    print(f"wrote {out / 'metrics.json'} and {out / 'predictions.jsonl'}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m ...` / `torchrun -m ...` entry: the same parser and one-line errors as `minillava`."""
    from minillava.cli import main as cli_main

    return cli_main(argv)

if __name__ == "__main__":
    sys.exit(main())
