"""How far did tuning move the LLM's text answers? A finer reading of the demo's text check than its count.

The check (minillava/demo/retention.py) counts right answers, and a count moves by whole near-ties: one flipped
token and a prompt is lost. This reads the distance itself: the base LLM answers each prompt greedily (32 new
tokens), then KL(base || tuned) is averaged over those answer positions (both models in float32, the same tokens
fed to both), with how many prompts' first answer token flips. Recipes are compared on `--check validation`
(the default); `--check test` reads the reported check's prompts.

    python benchmarks/retention_drift.py --model minillava-demo/model            # base: the built-in, untuned
    python benchmarks/retention_drift.py --model DIR/model --base DIR/base --check validation

Prints one JSON object, the CPU it ran on included.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from common import cpu_info

import minillava
from minillava.demo import retention
from minillava.demo.run import DemoConfig, build_base
from minillava.processor import IGNORE_INDEX

CHECKS = {"validation": retention.VALIDATION_CHECK, "test": retention.CHECK}


def answer_logprobs(model, processor, prompt: str, answer: str) -> torch.Tensor:
    """(n, V) log-probabilities at the positions that predict `answer`'s tokens after `prompt`."""
    enc = processor.encode([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
    ids = torch.tensor([enc.input_ids])
    keep = torch.tensor(enc.labels)[1:] != IGNORE_INDEX  # position t predicts token t + 1
    return F.log_softmax(model(ids).logits[0, :-1][keep].float(), dim=-1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a tuned model directory")
    ap.add_argument("--base", help="the untuned model it was tuned from (default: the built-in demo base)")
    ap.add_argument("--check", choices=sorted(CHECKS), default="validation")
    args = ap.parse_args()
    torch.manual_seed(0)
    prompts = [p for p, _ in CHECKS[args.check]]
    try:
        base, processor = minillava.load(args.base, "float32", "cpu") if args.base else build_base(DemoConfig())
        tuned, _ = minillava.load(args.model, "float32", "cpu")
    except (OSError, ValueError) as e:  # not a model directory, or a broken one
        print(f"retention_drift.py: error: {e}", file=sys.stderr)
        return 2
    base.eval(), tuned.eval()
    answers = retention.ask(base, processor, prompts, max_new_tokens=32)
    rows = []
    with torch.inference_mode():
        for prompt, answer in zip(prompts, answers, strict=True):
            p, q = answer_logprobs(base, processor, prompt, answer), answer_logprobs(tuned, processor, prompt, answer)
            kl = (p.exp() * (p - q)).sum(-1)  # (n,)
            rows.append({"prompt": prompt, "base_answer": answer, "kl": round(float(kl.mean()), 4),
                         "first_token_flipped": bool(p[0].argmax() != q[0].argmax())})  # fmt: skip
    print(json.dumps({
        "bench": "retention_drift", **cpu_info(), "check": args.check, "n": len(rows), "model": args.model,
        "mean_kl": round(sum(r["kl"] for r in rows) / len(rows), 4), "max_kl": max(r["kl"] for r in rows),
        "first_token_flips": sum(r["first_token_flipped"] for r in rows), "prompts": rows,
    }, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
