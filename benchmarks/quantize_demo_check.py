"""The quality guard of the fast CPU paths (issue 23): a trained demo model answers its evaluation questions in
float32, in int8 (weight-only, `--quantize int8`) and in bf16 (where this CPU has bf16 units); each precision's
answers are compared with float32's, question by question, and its accuracy with float32's. One JSON object.
`--exports` adds the model's exports run on their runtimes (issue 25): `gguf_q8_0` / `gguf_f16` / `gguf_q4_0`
(llama.cpp) and `onnx_int8` (onnxruntime), each exported into DEMO/quantize_check first.

    minillava demo --out runs/demo                  # or --eval-on validation: any demo output directory
    python benchmarks/quantize_demo_check.py --demo runs/demo [--splits val val_shift] [--limit 200]
                                             [--exports gguf_q8_0 gguf_f16 onnx_int8]

The guard: answers agree with float32's on >= 97 % of questions and accuracy moves by <= 1 point.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_json  # noqa: E402

from minillava import quantize  # noqa: E402
from minillava.demo.run import answer_split  # noqa: E402

AGREEMENT_TARGET = 0.97
ACCURACY_MOVE = 0.01


EXPORTS = ("gguf_q8_0", "gguf_f16", "gguf_q4_0", "onnx_int8")


def load(model_dir: Path, precision: str, tmp: Path):
    if precision in EXPORTS:
        return load_export(model_dir, precision, tmp / precision)
    dtype = "bfloat16" if precision == "bf16" else "float32"
    model, processor = quantize.load(str(model_dir), dtype, quantize="int8" if precision == "int8" else None)
    return model.eval(), processor


def load_export(model_dir: Path, kind: str, out: Path):
    """The float32 model exported (`minillava export --format gguf --type T` / `--format onnx --quantize int8`)."""
    model, processor = quantize.load(str(model_dir), "float32")
    if kind.startswith("gguf_"):
        from minillava.interop.gguf_export import export_gguf
        from minillava.interop.llamacpp_runtime import load_gguf

        return load_gguf(export_gguf(model, processor, out, kind.removeprefix("gguf_")))
    from minillava.interop.onnx_export import export_onnx
    from minillava.interop.onnx_runtime import load_onnx

    return load_onnx(export_onnx(model, processor, out, "int8"))


def split_files(demo: Path, names: list[str] | None) -> dict[str, Path]:
    """The evaluation splits the demo reported (report.json), or those of them named."""
    report = demo / "report.json"
    if not report.is_file():
        raise SystemExit(f"{report}: not found; is {demo} a `minillava demo --out` directory?")
    found = {s: demo / "data" / f"{s}.jsonl" for s in json.loads(report.read_text())["eval"]}
    missing = [n for n in names or [] if n not in found]
    if missing:
        raise SystemExit(f"{report}: no split {', '.join(missing)}; it has {', '.join(found)}")
    return {n: found[n] for n in names} if names else found


def limited(path: Path, limit: int | None, tmp: Path) -> Path:
    if limit is None:
        return path
    out = tmp / path.name
    out.write_text("".join(path.read_text().splitlines(keepends=True)[:limit]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, type=Path, help="a `minillava demo --out` directory")
    ap.add_argument("--splits", nargs="*", help="evaluation splits (default: every *.jsonl in DEMO/data)")
    ap.add_argument("--limit", type=int, help="questions per split (default: all)")
    ap.add_argument("--exports", nargs="*", choices=EXPORTS, default=[], help="also run these exports")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.demo / "model"
    files = split_files(args.demo, args.splits)
    precisions = ["float32", "int8"] + (["bf16"] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else [])
    precisions += args.exports
    tmp = args.demo / "quantize_check"
    tmp.mkdir(exist_ok=True)
    answers: dict[str, dict[str, list[dict]]] = {}
    seconds: dict[str, float] = {}
    for precision in precisions:
        model, processor = load(model_dir, precision, tmp)
        start = time.perf_counter()
        answers[precision] = {
            split: answer_split(model, processor, args.demo / "data", split, limited(path, args.limit, tmp),
                                args.batch_size)
            for split, path in files.items()
        }  # fmt: skip
        seconds[precision] = time.perf_counter() - start
        del model
    result: dict[str, object] = {"machine": machine("cpu"), "model": str(model_dir), "precisions": {}}
    base = answers["float32"]
    for precision in precisions:
        pairs = [(a, b) for split in files for a, b in zip(base[split], answers[precision][split], strict=True)]
        n = len(pairs)
        agree = sum(a["prediction"] == b["prediction"] for a, b in pairs) / n
        accuracy = sum(b["score"] for _, b in pairs) / n
        moved = accuracy - sum(a["score"] for a, _ in pairs) / n
        result["precisions"][precision] = {
            "n": n, "agreement_with_float32": round(agree, 4), "accuracy": round(accuracy, 4),
            "accuracy_minus_float32": round(moved, 4), "answer_s": round(seconds[precision], 1),
            "guard_holds": agree >= AGREEMENT_TARGET and abs(moved) <= ACCURACY_MOVE,
            "by_split": {s: round(sum(p["score"] for p in answers[precision][s]) / len(answers[precision][s]), 4)
                         for s in files},
        }  # fmt: skip
    write_json(result, args.out)


if __name__ == "__main__":
    main()
