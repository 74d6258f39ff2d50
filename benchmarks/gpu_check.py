"""GPU check: our training steps and generation in bf16 on the bench shapes and a larger LLM shape.

For each shape (bench_train.SHAPES): stage-1 and stage-2 step time (best of --reps after a warm-up,
CUDA-synchronised), tokens/s, peak GPU memory, MFU against this GPU's measured bf16 matmul peak (an
8192^3 product), and greedy generation tokens/s at batch 1 and 4 (one image + 16 prompt tokens, 32 new).
Prints one JSON object and writes it to --out.

    python benchmarks/gpu_check.py --out gpu-check-cuda-h200.json
    python benchmarks/gpu_check.py --device cpu --shapes quick     # smoke test without a GPU
    python benchmarks/gpu_check.py --summary DIR                    # gpu_check.sh's final summary of DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from xml.etree import ElementTree

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import SHAPES, flops_ours, image_tokens, ours  # noqa: E402
from common import best_of, machine, matmul_peak, write_json  # noqa: E402

from minillava.generate import GenerationConfig, decode  # noqa: E402

PROMPT_TOKENS, NEW_TOKENS = 16, 32


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gpu_mb(device: torch.device) -> int | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None


def generation_tps(model, s: dict, batch: int, reps: int, device: torch.device) -> float:
    """Greedy tokens/s: one image + 16 prompt tokens per row, 32 new tokens, KV cache."""
    g = torch.Generator().manual_seed(batch)
    text = torch.randint(10, s["vocab"] - 2, (batch, PROMPT_TOKENS), generator=g)
    ids = torch.cat([torch.full((batch, image_tokens(s)), s["vocab"] - 1), text], dim=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": None,
              "pixel_values": torch.randn(batch, 3, s["v_image"], s["v_image"], generator=g)}  # fmt: skip
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS)

    def run():
        with torch.inference_mode():
            for _ in decode(model, inputs, cfg, stop_ids=[], pad_id=0):
                pass

    return batch * NEW_TOKENS / best_of(run, reps, device)


def measure(name: str, reps: int, device: torch.device, peak: float) -> dict[str, float | int | None]:
    s = SHAPES[name]
    r: dict[str, float | int | None] = {}
    tokens = s["batch"] * (image_tokens(s) + s["text"])
    for stage in (1, 2):
        reset_peak(device)
        t, model = ours(s, stage, reps, device, precision="bf16")
        flops = sum(flops_ours(s, stage).values())
        r |= {f"{name}_stage{stage}_step_s": t, f"{name}_stage{stage}_tokens_per_s": tokens / t,
              f"{name}_stage{stage}_model_tflop": flops / 1e12, f"{name}_stage{stage}_mfu": flops / t / peak,
              f"{name}_stage{stage}_peak_gpu_mb": peak_gpu_mb(device)}  # fmt: skip
        if stage == 1:
            del model
    model = model.to(torch.bfloat16).eval()  # the stage-2 model, stored in bf16 for inference
    for b in (1, 4):
        reset_peak(device)
        r[f"{name}_gen_b{b}_tok_per_s"] = generation_tps(model, s, b, reps, device)
        r[f"{name}_gen_b{b}_peak_gpu_mb"] = peak_gpu_mb(device)
    return r


def summary(directory: Path) -> dict:
    """gpu_check.sh's last word: each step's status and the headline figures of each JSON it wrote."""
    steps = [line.split("\t") for line in (directory / "steps.tsv").read_text().splitlines() if line.strip()]
    out: dict = {"steps": {name: {"status": status, "seconds": int(sec)} for name, status, sec in steps}}
    for name in ("cuda", "deepspeed"):
        junit = directory / f"pytest-{name}.xml"
        if junit.is_file():
            suite = ElementTree.parse(junit).getroot()
            suite = suite if suite.tag == "testsuite" else suite[0]
            out[f"pytest_{name}"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    keys = ("speedup", "ratio", "mfu", "step_s", "tok_per_s", "tokens_per_s", "peak", "gpu", "same_greedy")
    for path in sorted(directory.glob("*.json")):
        if path.name == "summary.json":
            continue
        data = json.loads(path.read_text())
        out[path.stem] = {k: v for k, v in data.items() if any(w in k for w in keys)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["bench", "large"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", help="also write the JSON here (atomically)")
    ap.add_argument("--summary", metavar="DIR", help="print the summary of a gpu_check.sh output directory")
    args = ap.parse_args()
    if args.summary:
        write_json(summary(Path(args.summary)), str(Path(args.summary) / "summary.json"))
        return
    device = torch.device(args.device)
    peak = matmul_peak(torch.bfloat16, device, 1024 if device.type == "cpu" else None)
    result: dict = {"bench": "gpu_check", **machine(device), "reps": args.reps, "bf16_matmul_peak_tflops": peak / 1e12}
    for name in args.shapes:
        result |= measure(name, args.reps, device, peak)
    write_json({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}, args.out)


if __name__ == "__main__":
    main()
