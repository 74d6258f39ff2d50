"""Subcommands `train`, `data check` and `merge-lora`, registered on the main CLI by `add_commands`.

Errors are raised as ValueError / OSError with a one-line message; the caller's `main()` prints that line
and exits non-zero. `python -m minillava.train.cli ...` runs these commands on their own (used by
`torchrun` launches and tests).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from minillava.train.config import FIELDS, STRATEGIES


def _bool_flag(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    # --NAME / --no-NAME, both listed in --help (the --no- form is how to turn off what defaults on, or what the
    # config file set); default None so an absent flag leaves the config file's value alone
    parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=help)


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="train a model (align / instruct, full or LoRA)",
        description="Train from a YAML config and/or flags; flags override the config file.",
    )  # fmt: skip
    p.add_argument("--config", help="YAML file of options (any option below, with underscores)")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="start from a saved minillava directory")
    g.add_argument("--vision", help="vision source (dir, hub id, builtin:NAME) for a fresh model")
    g.add_argument("--llm", help="LLM source for a fresh model")
    g.add_argument("--projector", help="projector for a fresh model (default mlp2x_gelu)")
    g.add_argument("--template", help="chat template (default: plain for align, the model's for instruct)")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", help="LLaVA JSON/JSONL, COCO captions, or caption JSONL/CSV files")
    g.add_argument("--image-root", help="directory the data's image paths are relative to")
    _bool_flag(g, "allow-outside-image-root", "use image paths that resolve outside --image-root ('../', absolute, "
               "symlinks out); without it such a sample is bad")  # fmt: skip
    g.add_argument("--data-format", choices=["auto", "llava", "coco", "captions"])
    g.add_argument("--max-length", type=int, help="max tokens per sample after image expansion")
    _bool_flag(g, "truncate", "truncate long samples (never through an image) instead of rejecting them")
    g.add_argument("--on-bad-sample", choices=["error", "skip"], help="stop on a bad sample (default) or skip+count")
    g.add_argument("--num-workers", type=int, help="data loading worker processes (default 2)")
    _bool_flag(g, "group-by-length", "group batches by modality and length (default on)")
    _bool_flag(g, "packing", "pack samples end to end into --batch-size rows of at most --max-tokens-per-batch "
               "tokens, as many samples a micro-batch as fit; attention and positions per sample")
    g.add_argument("--max-tokens-per-batch", type=int, metavar="N",
                   help="--packing: tokens per packed row (default: --max-length)")
    g.add_argument("--feature-cache", help="directory caching the frozen vision tower's features")
    g = p.add_argument_group("what trains")
    g.add_argument("--stage", choices=["align", "instruct"])
    _bool_flag(g, "lora", "LoRA adapters on the LLM's linear layers (instruct)")
    _bool_flag(g, "qlora", "LoRA on a 4-bit base (CUDA + bitsandbytes only)")
    g.add_argument("--lora-r", type=int)
    g.add_argument("--lora-alpha", type=int)
    g.add_argument("--lora-dropout", type=float)
    g.add_argument("--lora-targets", nargs="+", help="leaf names of LLM linear layers (default: all of them)")
    g.add_argument("--lora-layers", type=int, help="LoRA on the last N decoder layers only (default: all)")
    _bool_flag(g, "distill-text", "text-only samples learn the base LLM's distribution (KL with the adapters off), "
               "not their answer tokens: keeps what the LLM knew (LoRA/QLoRA)")
    g.add_argument("--distill-weight", type=float, help="with --distill-text: a text position's KL counts this many "
                   "answer tokens' cross-entropy (default 1)")
    g.add_argument("--image-token-noise", type=float, help="train on image tokens with Gaussian noise, std this "
                   "fraction of each token's RMS (default 0): the answer's kind must come from the question")
    _bool_flag(g, "freeze-projector", "instruct with the projector frozen (with --lora-layers, backward stops at "
               "the lowest adapted layer)")
    _bool_flag(g, "tune-vision", "also train the vision tower (own lr: --vision-lr)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--out", help="run directory: checkpoints/, model/, metrics.jsonl, loss_curve.png")
    g.add_argument("--epochs", type=float)
    g.add_argument("--max-steps", type=int)
    g.add_argument("--batch-size", type=int, help="per device micro-batch: samples, or packed rows with --packing")
    g.add_argument("--grad-accum", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--projector-lr", type=float)
    g.add_argument("--vision-lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--scheduler", choices=["cosine", "linear", "constant"])
    g.add_argument("--warmup-ratio", type=float)
    g.add_argument("--max-grad-norm", type=float)
    g.add_argument("--collapse-steps", type=int, metavar="K",
                   help="stop when the gradient norm is ~0 for K steps in a row (default 5; 0: never)")
    g.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"])
    _bool_flag(
        g,
        "standardize-features",
        "fit the projector's input standardisation to the data's vision features "
        "before step 0 (for a fresh projector; learns far faster on DINOv2)",
    )
    g.add_argument("--feature-stats-images", type=int, help="images the standardisation is fitted on (256)")
    g.add_argument("--word-warmup-steps", type=int, help="pre-align a fresh projector with the LLM's word "
                   "embeddings for N cheap steps before step 0 (no LLM forward; see docs/training.md)")
    g.add_argument("--word-warmup-objective", choices=["words", "caption"], help="warm start: the answer words "
                   "anywhere in the image tokens (words, any projector) or spelled in order (caption, perceiver)")
    g.add_argument("--word-warmup-lr", type=float, help="the warm start's learning rate (1e-3)")
    g.add_argument("--word-warmup-images", type=int, help="images the warm start reads, spread evenly over the "
                   "data (2048; their features are held in memory)")
    _bool_flag(g, "frozen-bf16", "keep fully frozen modules in bfloat16 (faster, saved in bf16)")
    _bool_flag(g, "grad-checkpointing", "recompute LLM activations in backward (less memory)")
    _bool_flag(g, "compile", "torch.compile each LLM decoder layer: faster steps after seconds of compiling")
    g.add_argument("--device")
    g.add_argument(
        "--strategy",
        choices=list(STRATEGIES),
        help="multi-process: ddp, fsdp-full-shard, fsdp-shard-grad-op, deepspeed-zero2 or deepspeed-zero3 "
        "(auto: the accelerate config's)",
    )
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("checkpoints and records")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (and always at the end)")
    g.add_argument("--keep-last", type=int)
    g.add_argument("--resume", nargs="?", const="latest", help="continue from OUT's newest checkpoint, or from DIR")
    _bool_flag(g, "resume-changed", "resume even with other data, batch size, seed, ... than the checkpoint's "
               "(refused without it: the saved data position would not continue the same run)")  # fmt: skip
    _bool_flag(g, "overwrite", "start afresh in an OUT that holds an earlier run, deleting that run's checkpoints, "
               "model and records (without it, or --resume, such a run is refused)")  # fmt: skip
    _bool_flag(g, "merge-lora", "merge LoRA into the exported model (default on)")
    g.add_argument("--log-every", type=int)
    _bool_flag(g, "progress", "progress bar (default on)")
    _bool_flag(g, "plot", "loss/lr curve PNG at the end (default on)")
    _bool_flag(g, "tensorboard", "also write TensorBoard logs")
    g.add_argument("--halt-at-step", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=run_train)
    return p


def run_train(args: argparse.Namespace) -> int:
    from minillava.train.config import load_config

    overrides = {k: v for k, v in vars(args).items() if k in FIELDS and v is not None}
    cfg = load_config(args.config, overrides)
    from minillava.train.loop import train  # torch: only once the config is known to be good

    _setup_logging()
    summary = train(cfg)
    return 0 if summary.get("steps") else 1


def add_data_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="data set tools")
    sub = p.add_subparsers(dest="data_command", metavar="{check}")
    sub.required = True
    c = sub.add_parser("check", help="validate a data set and summarise it; exit 1 if any sample is bad")
    c.add_argument("files", nargs="+", help="LLaVA JSON/JSONL, COCO captions, or caption JSONL/CSV")
    c.add_argument("--image-root", help="directory the image paths are relative to")
    c.add_argument(
        "--allow-outside-image-root",
        action="store_true",
        help="accept image paths that resolve outside --image-root (default: a bad sample)",
    )
    c.add_argument("--format", dest="data_format", default="auto", choices=["auto", "llava", "coco", "captions"])
    c.add_argument("--model", help="a saved minillava directory: tokenise to check lengths and draw the histogram")
    c.add_argument("--stage", choices=["align", "instruct"], default="instruct", help="align uses the plain template")
    c.add_argument("--template", help="chat template override")
    c.add_argument("--max-length", type=int, help="max tokens after image expansion (default: the model's)")
    c.add_argument("--batch-size", type=int, default=16,
                   help="micro-batch for the padding-waste estimate (samples; packed: rows)")
    c.add_argument("--max-tokens-per-batch", type=int, help="packed row budget for the estimate (default: max length)")
    c.add_argument("--no-decode", action="store_true", help="only check that image files exist (faster)")
    c.add_argument("--max-errors", type=int, default=20, help="error lines to print")
    c.set_defaults(func=run_data_check)


def run_data_check(args: argparse.Namespace) -> int:
    from minillava.data.check import check_data

    processor = None
    if args.model:
        from minillava.processor import Processor

        if not Path(args.model).is_dir():
            raise OSError(f"{args.model}: model directory not found")
        base = Processor.from_pretrained(args.model)
        template = args.template or ("plain" if args.stage == "align" else base.template_name)
        processor = Processor(base.tokenizer, base.image_transform, base.tokens_per_image, base.image_token, template,
                              args.max_length or base.max_length, base.max_pixels, base.anyres)  # fmt: skip
    report = check_data(
        args.files,
        args.image_root,
        processor,
        args.data_format,
        decode_images=not args.no_decode,
        allow_outside_image_root=args.allow_outside_image_root,
    )
    print(report.format(args.max_errors))
    if report.lengths:
        print(report.padding_line(args.batch_size, args.max_tokens_per_batch))
    return 0 if report.ok else 1


def add_merge_parser(subparsers) -> None:
    p = subparsers.add_parser("merge-lora", help="fold a LoRA adapter into its model: a plain model directory")
    p.add_argument("--model", required=True, help="model directory with a lora_adapter/ (from --no-merge-lora)")
    p.add_argument("--out", required=True, help="output model directory")
    p.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    from minillava.model import MiniLlava
    from minillava.train.stages import ADAPTER_DIR, load_adapter, merge_lora

    src = Path(args.model)
    if not (src / ADAPTER_DIR).is_dir():
        raise OSError(f"{src}: no {ADAPTER_DIR}/ here: nothing to merge (LoRA runs merge on export by default)")
    model, processor = MiniLlava.from_pretrained(src, allow_lora_adapter=True)
    settings = load_adapter(model, src / ADAPTER_DIR)
    n = merge_lora(model)
    model.save_pretrained(args.out, processor)
    print(f"merged LoRA (r={settings.r}) into {n} layers: {args.out}")
    return 0


def add_commands(subparsers) -> None:
    """Register `train`, `data check` and `merge-lora` on an argparse subparsers object."""
    add_train_parser(subparsers)
    add_data_parser(subparsers)
    add_merge_parser(subparsers)


def _setup_logging() -> None:
    root = logging.getLogger("minillava")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """`python -m ...` / `torchrun -m ...` entry: the same parser and one-line errors as `minillava`."""
    from minillava.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
