"""How sure is the LLM of each answer in the demo's text-retention check? (minillava/demo/retention.py)

For every `CHECK` prompt: the greedy answer (16 new tokens, as the check), whether it counts, and its margin: the
smallest gap, in nats, between the most likely and the second most likely token over the answer's first 8 tokens.
A prompt whose margin is near 0 is a near-tie in the model itself: any change to the weights (tuning, another
precision) may flip its greedy answer, so the check's noise floor sits on those prompts.

    python benchmarks/retention_margins.py                      # the built-in LLM, untuned (float32)
    python benchmarks/retention_margins.py --model minillava-demo/model   # a trained demo model beside it

Prints one JSON object, the CPU it ran on included.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import cpu_info

import minillava
from minillava.demo import retention
from minillava.demo.run import DemoConfig, build_base
from minillava.generate import GenerationConfig, Generator, decode


def answers(model, processor) -> list[dict[str, object]]:
    generator = Generator(model.eval(), processor)
    cfg = GenerationConfig(max_new_tokens=16, temperature=0.0)
    rows = []
    for prompt, accepted in retention.CHECK:
        gaps: list[float] = []

        def observe(logits: torch.Tensor, gaps: list[float] = gaps) -> None:
            top = logits[0].log_softmax(-1).topk(2).values
            gaps.append(float(top[0] - top[1]))

        batch = processor.collate([generator.encode(prompt, None)], padding_side="left")
        tokens = [int(t[0]) for t, _ in decode(model, batch, cfg, generator.stop_ids, processor.pad_token_id,
                                                observe=observe)]  # fmt: skip
        text = processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        rows.append({"prompt": prompt, "answer": text, "correct": retention.correct(text, accepted),
                     "margin_nats": round(min(gaps[:8]), 3)})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="a trained model directory to score beside the untuned built-in")
    args = ap.parse_args()
    torch.manual_seed(0)
    with torch.inference_mode():
        base = answers(*build_base(DemoConfig()))
        tuned = answers(*minillava.load(args.model, "float32")) if args.model else None
    near_ties = sum(r["correct"] and r["margin_nats"] < 0.25 for r in base)  # right, but barely
    result: dict[str, object] = {"bench": "retention_margins", **cpu_info(), "n": len(base),
                                 "base_correct": sum(r["correct"] for r in base),
                                 "base_right_below_0.25_nats": near_ties}  # fmt: skip
    if tuned is not None:
        result["tuned_correct"] = sum(r["correct"] for r in tuned)
        result["lost"] = [b["prompt"] for b, t in zip(base, tuned, strict=True) if b["correct"] and not t["correct"]]
        result["lost_base_margins"] = [b["margin_nats"] for b, t in zip(base, tuned, strict=True)
                                       if b["correct"] and not t["correct"]]  # fmt: skip
    result["prompts"] = [b | ({"tuned_answer": t["answer"]} if tuned else {})
                         for b, t in zip(base, tuned or base, strict=True)]  # fmt: skip
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
