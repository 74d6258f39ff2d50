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
`--gguf yes` (CPU) adds `gguf_f32`, `gguf_f16` and `gguf_q8_0`: the LLM exported with `minillava export --format
gguf` and decoded by llama.cpp (`minillava.interop.llamacpp_runtime`; the image tokens still come from minillava),
and `llamacpp_text_*`: llama.cpp's own text-only decoding of the very same file (llama-cpp-python's `Llama`, no
minillava code), the reference the CPU-inference issue asks for. At batch 1 each of these, and ours float32, also
reports time to first token and the decode-only rate as a fraction of the memory-bandwidth ceiling (bandwidth
measured in the same run, divided by the bytes of weights one token reads). The built-in model (DINOv2-S + SmolLM2,
untrained) reports its time to first token with one image, in torch float32 and on llama.cpp q8_0.
Prints one JSON object (and writes it to --out).

    python benchmarks/bench_generate.py [--repeats 3] [--threads N] [--device cuda] [--int8 no] [--onnx yes]
                                        [--gguf yes] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
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
# the batch-1 decode-only rows (llamacpp_rows) decode longer: 31 tokens at ~160 tokens/s are 0.2 s, too short
# to time a gap of a few per cent between two engines
DECODE_TOKENS = 128


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


GGUF_TYPES = ("f32", "f16", "q8_0")


def save_bpe_tokenizer(directory: Path) -> None:
    """The built-in SmolLM2 tokenizer (the bench vocabulary's 49,152 ids, `<image>` one past them): a GGUF file
    stores a real byte-level BPE vocabulary, which the timing-only word-level tokenizer is not."""
    from transformers import AutoTokenizer

    from minillava.sources import resolve_source

    tok = AutoTokenizer.from_pretrained(resolve_source("builtin:smollm2-135m-instruct"))
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tok.convert_tokens_to_ids("<image>") != IMAGE_TOKEN_ID:
        raise SystemExit("the built-in tokenizer's <image> id differs from the bench's")
    tok.save_pretrained(directory)


def gguf_exports(model, processor, work: Path) -> dict[str, object]:
    """The model's LLM exported to GGUF in each type, loaded on llama.cpp (`minillava.interop.llamacpp_runtime`)."""
    from minillava.interop.gguf_export import export_gguf
    from minillava.interop.llamacpp_runtime import load_gguf

    return {kind: load_gguf(export_gguf(model, processor, work / f"gguf-{kind}", kind))[0] for kind in GGUF_TYPES}


def phase(generate_steps) -> tuple[float, float]:
    """One batch-1 run: (time to first token in s, decode-only tokens/s after it)."""
    t = time.perf_counter()
    steps = iter(generate_steps())
    next(steps)
    t_first = time.perf_counter()
    n = sum(1 for _ in steps)
    return t_first - t, n / (time.perf_counter() - t_first)


def phases(runs: dict[str, object], repeats: int) -> dict[str, tuple[float, float]]:
    """Each runner's best time to first token and best decode-only rate over `repeats` rounds, after a warm-up
    round. The runners take turns within a round, so a drift in the machine's speed falls on all of them alike."""
    best: dict[str, tuple[float, float]] = {}
    for round_no in range(repeats + 1):
        for name, steps in runs.items():
            first, rate = phase(steps)
            if round_no:
                old = best.get(name, (float("inf"), 0.0))
                best[name] = (min(old[0], first), max(old[1], rate))
    return best


def ours_steps(model, inputs, new_tokens: int = NEW_TOKENS):
    cfg = GenerationConfig(max_new_tokens=new_tokens)
    return decode(model, {**inputs, "labels": None}, cfg, stop_ids=[], pad_id=0)


def llamacpp_text(path: Path, tokens: list[int], threads: int, new_tokens: int = NEW_TOKENS) -> object:
    """llama.cpp's own greedy decoding of `tokens` and `new_tokens` more, through llama-cpp-python's `Llama`."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)

    def steps():
        llm.reset()
        for i, token in enumerate(llm.generate(tokens, temp=0.0)):  # yields without stopping at EOS
            yield token
            if i == new_tokens - 1:
                return

    return steps


def memory_bandwidth() -> float:
    """Bytes per second the CPU streams from memory: the best of 5 sums over a 1 GiB tensor (all threads)."""
    big = torch.ones(2**28)
    best = min(_timed(big.sum) for _ in range(5))
    return big.numel() * 4 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def builtin_ttft(work: Path, repeats: int) -> dict[str, float]:
    """Time to first token of the built-in model with one 112 px image: torch float32 and llama.cpp q8_0."""
    from PIL import Image

    from minillava.config import ModelConfig, ProjectorConfig, VisionConfig
    from minillava.generate import Generator
    from minillava.interop.gguf_export import export_gguf
    from minillava.interop.llamacpp_runtime import load_gguf
    from minillava.model import MiniLlava

    cfg = ModelConfig(vision=VisionConfig(source="builtin:dinov2-small", image_size=112, select_layer=6),
                      projector=ProjectorConfig(name="perceiver"), llm_source="builtin:smollm2-135m-instruct",
                      template="chatml")  # fmt: skip
    model, processor = MiniLlava.build(cfg)
    exported, _ = load_gguf(export_gguf(model.eval(), processor, work / "builtin-q8_0", "q8_0"))
    image = Image.new("RGB", (112, 112), (200, 40, 40))
    runs = {}
    for name, m in (("ours_fp32", model), ("gguf_q8_0", exported)):
        generator = Generator(m, processor)

        def steps(g=generator):
            batch = processor.collate([g.encode("What is in the picture?", [image])], "left")
            return decode(g.model, batch, GenerationConfig(max_new_tokens=4), g.stop_ids, processor.pad_token_id)

        runs[name] = steps
    return {f"builtin_ttft_s_{name}": round(first, 4) for name, (first, _) in phases(runs, repeats).items()}


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
    ap.add_argument("--gguf", choices=["yes", "no"], default="no",
                    help="also export the LLM to GGUF (f32, f16, q8_0) and decode on llama.cpp (CPU only)")  # fmt: skip
    ap.add_argument("--out", help="also write the JSON here (atomically)")
    args = ap.parse_args()
    device = torch.device(args.device)
    with_bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and fast_bfloat16(device))
    if args.threads:
        torch.set_num_threads(args.threads)
    work = workdir()
    peer, peer_dir = build_peer_and_dir(work)
    with_gguf = args.gguf == "yes" and device.type == "cpu"
    (save_bpe_tokenizer if with_gguf else save_bench_tokenizer)(peer_dir)
    ours32, processor = load_hf_llava(peer_dir, torch.float32)
    peer, ours32 = peer.to(device), ours32.to(device)
    ours16 = copy.deepcopy(ours32).to(torch.bfloat16) if with_bf16 else None
    peer16 = copy.deepcopy(peer).to(torch.bfloat16) if with_bf16 else None
    with_int8 = args.int8 == "yes" and device.type == "cpu"
    ours8 = quantize_model(copy.deepcopy(ours32), "int8") if with_int8 else None
    with_onnx = args.onnx == "yes" and device.type == "cpu"
    onnx_models = onnx_exports(ours32, processor, work) if with_onnx else {}
    gguf_models = gguf_exports(ours32, processor, work) if with_gguf else {}
    result: dict[str, object] = {"bench": "generate", **machine(device), "repeats": args.repeats,
                                 "prompt_tokens": IMAGE_TOKENS + PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
                                 "bf16_timed": with_bf16, "int8_timed": with_int8, "onnx_timed": with_onnx,
                                 "gguf_timed": with_gguf,
                                 # `load_gguf`'s auto: the image encoder in bfloat16 where it measures faster
                                 "gguf_image_encoder_dtype": str(next(iter(gguf_models.values())).vision_dtype)
                                 if gguf_models else None,
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
        for kind, gguf_model in gguf_models.items():
            runs[f"gguf_{kind}"] = lambda inputs=inputs, m=gguf_model: ours_generate(m, inputs)
            tokens = ours_generate(gguf_model, inputs)
            result[f"gen_b{b}_gguf_{kind}_token_agreement"] = round(float((tokens == peer_tokens).float().mean()), 3)
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
        for kind in gguf_models:
            result[f"gen_b{b}_ratio_gguf_{kind}_vs_peer_fp32"] = round(tps[f"gguf_{kind}"] / tps["peer_fp32"], 3)
        if with_bf16:
            for peer_kind in ("fp32", "bf16", "autocast"):
                result[f"gen_b{b}_ratio_ours_bf16_vs_peer_{peer_kind}"] = round(
                    tps["ours_bf16"] / tps[f"peer_{peer_kind}"], 3
                )
            if "ours_bf16_eager" in tps:
                result[f"gen_b{b}_ratio_ours_bf16_graphs_vs_eager"] = round(
                    tps["ours_bf16"] / tps["ours_bf16_eager"], 3
                )
    if with_gguf:
        result |= llamacpp_rows(ours32, gguf_models, args.repeats)
        result |= builtin_ttft(work, args.repeats)
    result |= peak_memory(device)
    write_json(result, args.out)


def llamacpp_rows(ours32, gguf_models: dict[str, object], repeats: int) -> dict[str, object]:
    """Batch 1: llama.cpp's own text-only decoding of each exported file; time to first token and the decode-only
    rate of ours float32, our GGUF engine and llama.cpp's, each against the bandwidth ceiling of its weights."""
    inputs = make_inputs(1, torch.device("cpu"))
    text = inputs["input_ids"][0].clone()
    text[text == IMAGE_TOKEN_ID] = 42  # llama.cpp's own API takes token ids: the image's slots as a text token
    bandwidth = memory_bandwidth()
    out: dict[str, object] = {"memory_bandwidth_gb_s": round(bandwidth / 1e9, 2)}
    llm_bytes = {"ours_fp32": sum(p.numel() * 4 for p in ours32.llm.parameters())}
    runs = {"ours_fp32": lambda: ours_steps(ours32, inputs, DECODE_TOKENS)}
    for kind, m in gguf_models.items():
        path = m.directory / m.manifest["files"]["llm"]
        llm_bytes[f"gguf_{kind}"] = llm_bytes[f"llamacpp_text_{kind}"] = path.stat().st_size
        runs[f"gguf_{kind}"] = lambda m=m: ours_steps(m, inputs, DECODE_TOKENS)
        runs[f"llamacpp_text_{kind}"] = llamacpp_text(path, text.tolist(), torch.get_num_threads(), DECODE_TOKENS)
    out["decode_tokens"] = DECODE_TOKENS
    for name, (ttft, rate) in phases(runs, repeats).items():
        ceiling = bandwidth / llm_bytes[name]  # tokens/s if one token cost nothing but reading every weight once
        out |= {f"gen_b1_ttft_s_{name}": round(ttft, 4), f"gen_b1_decode_tok_per_s_{name}": round(rate, 2),
                f"gen_b1_bandwidth_fraction_{name}": round(rate / ceiling, 3)}  # fmt: skip
    for kind in gguf_models:
        out[f"gen_b1_ratio_gguf_{kind}_vs_llamacpp_text_decode"] = round(
            out[f"gen_b1_decode_tok_per_s_gguf_{kind}"] / out[f"gen_b1_decode_tok_per_s_llamacpp_text_{kind}"], 3
        )
    return out


if __name__ == "__main__":
    main()
