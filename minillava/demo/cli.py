"""`minillava demo` and `minillava chat`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train and evaluate a real VLM from the built-ins on CPU (~10 min)")
    p.add_argument("--out", default="minillava-demo", help="report directory (default ./minillava-demo)")
    p.add_argument("--quick", action="store_true", help="a 1-2 minute smoke run of the same pipeline")
    p.add_argument("--instruct-steps", type=int, default=None)
    p.add_argument("--align-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-on", choices=["test", "validation"], default="test",
                   help="the test splits (report) or their validation twins (choose recipes on these)")
    p.add_argument("--no-text-replay", dest="text_replay", action="store_false",
                   help="do not train on the base LLM's own answers to text prompts")
    p.set_defaults(func=cmd_demo)

    p = subparsers.add_parser("chat", help="talk about an image in the terminal")
    p.add_argument("--model", required=True)
    p.add_argument("--image", default=None, help="image to start with (switch later with /image PATH)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--quantize", default=None, choices=["none", "int8"], help="int8: per-channel int8 LLM weights")
    p.set_defaults(func=cmd_chat)


def cmd_demo(args: argparse.Namespace) -> int:
    from minillava.demo.report import format_report
    from minillava.demo.run import DemoConfig, run_demo

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = DemoConfig(out=args.out, quick=args.quick, seed=args.seed, eval_on=args.eval_on, text_replay=args.text_replay)
    if args.instruct_steps is not None:
        cfg.instruct_steps = args.instruct_steps
    if args.align_steps is not None:
        cfg.align_steps = args.align_steps
    report = run_demo(cfg)
    predictions = [json.loads(line) for line in (Path(cfg.out) / "predictions.jsonl").read_text().splitlines()]
    print(format_report(report, predictions))
    return 0


def cmd_chat(args: argparse.Namespace, stdin=None, stdout=None) -> int:
    from minillava.chat import ChatSession

    session = ChatSession.open(args.model, args.dtype, args.max_new_tokens, args.temperature, args.quantize)
    return session.repl(args.image, stdin or sys.stdin, stdout or sys.stdout)
