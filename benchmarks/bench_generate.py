"""Generation speed on the bench shapes, minillava vs transformers' LlavaForConditionalGeneration.

Both hold the very same random weights (the peer is saved and imported into minillava). One image + 16
prompt tokens, 32 new tokens, greedy, batch 1 and 4; peer and ours on the same device (CUDA-synchronised
timing on a GPU). bf16 variants: weights cast to bfloat16 (both), and the peer's float32 weights under
autocast. On CUDA ours decodes through a replayed CUDA graph (the default there); `ours_bf16_eager` times the
eager decode steps as well, to show what the graph gains. `ours_int8`: the float32 model with its LLM's Linear
layers (LM head included) quantized to per-channel int8 weights (`minillava.quantize`), CPU only; its greedy
tokens are compared with the float32 ones (`gen_bN_int8_token_agreement`: the fraction of positions that agree
with the peer float32, the same tokens as ours float32 where `gen_bN_same_greedy_tokens_fp32`).
`--onnx yes` (CPU; minutes of export each) adds `onnx_fp32` and `onnx_int8`: the same model exported with
`minillava export --format onnx` (int8: onnxruntime's dynamic quantization of the decoder) and run on
onnxruntime through the same decode loop, with their token agreement against the peer float32.
Prints one JSON object (and writes it to --out).

    python benchmarks/bench_generate.py [--repeats 3] [--threads N] [--device cuda] [--int8 no] [--onnx yes]
                                        [--out FILE.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    IMAGE_TOKEN_ID,
    IMAGE_TOKENS,
    best_of,
    build_peer_and_dir,
    machine,
    peak_memory,
    save_bench_tokenizer,
    workdir,
    write_json,
)

from minillava.generate import GenerationConfig, decode
from minillava.interop.hf import load_hf_llava
from minillava.quantize import quantize_model
from minillava.runtime import fast_bfloat16

PROMPT_TOKENS, NEW_TOKENS = 16, 32


def make_inputs(batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    text = torch.randint(10, 40_000, (batch, PROMPT_TOKENS), generator=g)
    ids = torch.cat([torch.full((batch, IMAGE_TOKENS), IMAGE_TOKEN_ID), text], dim=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(batch, 3, 224, 224, generator=g)}  # fmt: skip
    return {k: v.to(device) for k, v in inputs.items()}


def peer_generate(peer, inputs, autocast: bool = False) -> torch.Tensor:
    device_type = inputs["input_ids"].device.type
    with torch.inference_mode(), torch.autocast(device_type, torch.bfloat16, enabled=autocast):
        out = peer.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


def ours_generate(model, inputs, cuda_graphs: bool | None = None) -> torch.Tensor:
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, cuda_graphs=cuda_graphs)  # None: graphs on CUDA
    batch = {**inputs, "labels": None}
    return torch.stack([t for t, _ in decode(model, batch, cfg, stop_ids=[], pad_id=0)], 1)


def onnx_exports(model, processor, work: Path) -> dict[str, object]:
    """The model exported to ONNX, float32 and int8, loaded on onnxruntime (`minillava.interop.onnx_runtime`)."""
    from minillava.interop.onnx_export import export_onnx
    from minillava.interop.onnx_runtime import load_onnx

    return {
        kind: load_onnx(export_onnx(model, processor, work / f"onnx-{kind}", quantize))[0]
        for kind, quantize in (("fp32", None), ("int8", "int8"))
    }


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
    ap.add_argument("--device", default="cpu", help="cpu or cuda: peer and ours both run there")
    ap.add_argument("--int8", choices=["yes", "no"], default="yes", help="time ours with int8 weights (CPU only)")
    ap.add_argument("--onnx", choices=["yes", "no"], default="no",
                    help="also export to ONNX (float32, int8) and time onnxruntime (CPU only)")  # fmt: skip
    ap.add_argument("--out", help="also write the JSON here (atomically)")
    args = ap.parse_args()
    device = torch.device(args.device)
    with_bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and fast_bfloat16(device))
    if args.threads:
        torch.set_num_threads(args.threads)
    work = workdir()
    peer, peer_dir = build_peer_and_dir(work)
    save_bench_tokenizer(peer_dir)
    ours32, processor = load_hf_llava(peer_dir, torch.float32)
    peer, ours32 = peer.to(device), ours32.to(device)
    ours16 = copy.deepcopy(ours32).to(torch.bfloat16) if with_bf16 else None
    peer16 = copy.deepcopy(peer).to(torch.bfloat16) if with_bf16 else None
    with_int8 = args.int8 == "yes" and device.type == "cpu"
    ours8 = quantize_model(copy.deepcopy(ours32), "int8") if with_int8 else None
    with_onnx = args.onnx == "yes" and device.type == "cpu"
    onnx_models = onnx_exports(ours32, processor, work) if with_onnx else {}
    result: dict[str, object] = {"bench": "generate", **machine(device), "repeats": args.repeats,
                                 "prompt_tokens": IMAGE_TOKENS + PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
                                 "bf16_timed": with_bf16, "int8_timed": with_int8, "onnx_timed": with_onnx,
                                 "cuda_graphs": device.type == "cuda"}  # fmt: skip
    for b in (1, 4):
        inputs = make_inputs(b, device)
        peer_tokens = peer_generate(peer, inputs)
        same = torch.equal(peer_tokens, ours_generate(ours32, inputs))
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
            if device.type == "cuda":  # the same decode without the graph
                runs["ours_bf16_eager"] = lambda inputs=inputs: ours_generate(ours16, inputs, cuda_graphs=False)
        if with_int8:
            runs["ours_int8"] = lambda inputs=inputs: ours_generate(ours8, inputs)
            int8_tokens = ours_generate(ours8, inputs)
            result[f"gen_b{b}_int8_token_agreement"] = round(float((int8_tokens == peer_tokens).float().mean()), 3)
        for kind, onnx_model in onnx_models.items():
            runs[f"onnx_{kind}"] = lambda inputs=inputs, m=onnx_model: ours_generate(m, inputs)
            tokens = ours_generate(onnx_model, inputs)
            result[f"gen_b{b}_onnx_{kind}_token_agreement"] = round(float((tokens == peer_tokens).float().mean()), 3)
        tps = {k: b * NEW_TOKENS / best_of(fn, args.repeats, device) for k, fn in runs.items()}
        for k, v in tps.items():
            result[f"gen_b{b}_tok_per_s_{k}"] = round(v, 2)
        result[f"gen_b{b}_same_greedy_tokens_fp32"] = same
        if device.type == "cuda":
            eager = ours_generate(ours32, inputs, cuda_graphs=False)
            result[f"gen_b{b}_same_greedy_tokens_fp32_eager"] = torch.equal(peer_tokens, eager)
        result[f"gen_b{b}_ratio_ours_fp32_vs_peer_fp32"] = round(tps["ours_fp32"] / tps["peer_fp32"], 3)
        if with_int8:
            result[f"gen_b{b}_ratio_ours_int8_vs_peer_fp32"] = round(tps["ours_int8"] / tps["peer_fp32"], 3)
            result[f"gen_b{b}_ratio_ours_int8_vs_ours_fp32"] = round(tps["ours_int8"] / tps["ours_fp32"], 3)
        for kind in onnx_models:
            result[f"gen_b{b}_ratio_onnx_{kind}_vs_ours_fp32"] = round(tps[f"onnx_{kind}"] / tps["ours_fp32"], 3)
        if with_bf16:
            for peer_kind in ("fp32", "bf16", "autocast"):
                result[f"gen_b{b}_ratio_ours_bf16_vs_peer_{peer_kind}"] = round(
                    tps["ours_bf16"] / tps[f"peer_{peer_kind}"], 3
                )
            if "ours_bf16_eager" in tps:
                result[f"gen_b{b}_ratio_ours_bf16_graphs_vs_eager"] = round(
                    tps["ours_bf16"] / tps["ours_bf16_eager"], 3
                )
    result |= peak_memory(device)
    write_json(result, args.out)


if __name__ == "__main__":
    main()
