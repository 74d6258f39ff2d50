"""Generation speed on the bench shapes, minillava vs transformers' LlavaForConditionalGeneration.

Both hold the very same random weights (the peer is saved and imported into minillava). One image + 16
prompt tokens, 32 new tokens, greedy, batch 1 and 4. Prints one JSON object.

    python benchmarks/bench_generate.py [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import IMAGE_TOKEN_ID, IMAGE_TOKENS, best_of, build_peer_and_dir, peak_rss_mb, save_bench_tokenizer, workdir

from minillava.generate import GenerationConfig, decode
from minillava.interop.hf import load_hf_llava
from minillava.runtime import fast_bfloat16

PROMPT_TOKENS, NEW_TOKENS = 16, 32


def make_inputs(batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    text = torch.randint(10, 40_000, (batch, PROMPT_TOKENS), generator=g)
    ids = torch.cat([torch.full((batch, IMAGE_TOKENS), IMAGE_TOKEN_ID), text], dim=1)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, 224, 224, generator=g),
    }


def peer_generate(peer, inputs, autocast: bool = False) -> torch.Tensor:
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = peer.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


def ours_generate(model, inputs) -> torch.Tensor:
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS)
    batch = {**inputs, "labels": None}
    return torch.stack([t for t, _ in decode(model, batch, cfg, stop_ids=[], pad_id=0)], 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--bf16",
        choices=["auto", "yes", "no"],
        default="auto",
        help="time the bf16 variants (auto: only where bf16 matmuls run on hardware units)",
    )
    args = ap.parse_args()
    with_bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and fast_bfloat16("cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    work = workdir()
    peer, peer_dir = build_peer_and_dir(work)
    save_bench_tokenizer(peer_dir)
    ours32, _ = load_hf_llava(peer_dir, torch.float32)
    ours16 = copy.deepcopy(ours32).to(torch.bfloat16) if with_bf16 else None
    peer16 = copy.deepcopy(peer).to(torch.bfloat16) if with_bf16 else None
    result: dict[str, object] = {"bench": "generate", "prompt_tokens": IMAGE_TOKENS + PROMPT_TOKENS,
                                 "new_tokens": NEW_TOKENS, "threads": torch.get_num_threads(),
                                 "bf16_hardware": fast_bfloat16("cpu"), "bf16_timed": with_bf16}  # fmt: skip
    for b in (1, 4):
        inputs = make_inputs(b)
        same = torch.equal(peer_generate(peer, inputs), ours_generate(ours32, inputs))
        runs = {
            "peer_fp32": lambda inputs=inputs: peer_generate(peer, inputs),
            "ours_fp32": lambda inputs=inputs: ours_generate(ours32, inputs),
        }
        if with_bf16:
            runs |= {
                "peer_bf16": lambda inputs=inputs: peer_generate(peer16, inputs),
                "peer_autocast": lambda inputs=inputs: peer_generate(peer, inputs, autocast=True),
                "ours_bf16": lambda inputs=inputs: ours_generate(ours16, inputs),
            }
        tps = {k: b * NEW_TOKENS / best_of(fn, args.repeats) for k, fn in runs.items()}
        for k, v in tps.items():
            result[f"gen_b{b}_tok_per_s_{k}"] = round(v, 2)
        result[f"gen_b{b}_same_greedy_tokens_fp32"] = same
        result[f"gen_b{b}_ratio_ours_fp32_vs_peer_fp32"] = round(tps["ours_fp32"] / tps["peer_fp32"], 3)
        if with_bf16:
            for peer_kind in ("fp32", "bf16", "autocast"):
                result[f"gen_b{b}_ratio_ours_bf16_vs_peer_{peer_kind}"] = round(
                    tps["ours_bf16"] / tps[f"peer_{peer_kind}"], 3
                )
    result["peak_rss_mb"] = round(peak_rss_mb())
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
