"""Int8 vs float32 on the built-in LLM's real weights (SmolLM2-135M-Instruct): text-only greedy decoding speed
at batch 1, perplexity on a fixed passage, and how many greedy tokens agree. One JSON object.

    python benchmarks/quantize_check.py [--repeats 3] [--new-tokens 64] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from minillava.quantize import compute_dtype, quantize_model
from minillava.sources import resolve_source

PASSAGE = (
    "The river rises in the hills to the north of the town and flows south through a wide valley of farms and "
    "small woods. In spring the snow melts and the water runs high and brown; by late summer it is low and clear, "
    "and children wade across it at the old ford below the mill. The mill itself has not ground grain for fifty "
    "years. Its wheel was taken down after a flood, and the building now holds a museum of farm tools, a cafe, "
    "and a room where the local history society meets on the first Tuesday of every month. Visitors who walk "
    "along the river path can see herons, kingfishers and, if they are lucky, an otter near the weir."
)
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@torch.inference_mode()
def perplexity(llm, ids: torch.Tensor) -> float:
    return math.exp(float(llm(ids, labels=ids).loss))


@torch.inference_mode()
def greedy(llm, ids: torch.Tensor, new_tokens: int) -> list[int]:
    out = llm(ids, use_cache=True)
    cache, tokens = out.past_key_values, []
    for _ in range(new_tokens):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
        out = llm(token, past_key_values=cache, use_cache=True)
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    src = resolve_source("builtin:smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(src)
    fp32 = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    int8 = quantize_model(copy.deepcopy(fp32), "int8")
    passage = tok(PASSAGE, return_tensors="pt").input_ids
    chat = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    prompt = torch.tensor([chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "keys") else chat])
    result: dict[str, object] = {"bench": "quantize_check", "cpu": platform.processor() or platform.machine(),
                                 "threads": torch.get_num_threads(), "int8_activation_dtype": str(compute_dtype(
                                     torch.device("cpu"))), "passage_tokens": passage.shape[1],
                                 "new_tokens": args.new_tokens}  # fmt: skip
    tokens = {}
    for name, llm in (("fp32", fp32), ("int8", int8)):
        result[f"ppl_{name}"] = round(perplexity(llm, passage), 4)
        greedy(llm, prompt, 4)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            tokens[name] = greedy(llm, prompt, args.new_tokens)
            best = min(best, time.perf_counter() - start)
        result[f"b1_tok_per_s_{name}"] = round(args.new_tokens / best, 2)
    result["ppl_rise_int8_pct"] = round(100 * (result["ppl_int8"] / result["ppl_fp32"] - 1), 3)
    result["ratio_int8_vs_fp32"] = round(result["b1_tok_per_s_int8"] / result["b1_tok_per_s_fp32"], 3)
    same = sum(a == b for a, b in zip(tokens["fp32"], tokens["int8"], strict=True))
    first_diff = next((i for i, (a, b) in enumerate(zip(tokens["fp32"], tokens["int8"], strict=True)) if a != b), None)
    result["greedy_tokens_agree"] = f"{same}/{args.new_tokens}"
    result["greedy_first_divergence"] = first_diff
    result["text_fp32"] = tok.decode(tokens["fp32"], skip_special_tokens=True)
    result["text_int8"] = tok.decode(tokens["int8"], skip_special_tokens=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
