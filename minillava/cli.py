"""The `minillava` command. Each subcommand parses its flags and calls a library function: no logic here."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

# Subcommand groups that live with their subsystems (each module exposes add_commands(subparsers)). Building the
# parser imports all of them, so they import torch, transformers and the model code only inside their command
# functions: `minillava --help` then takes a fraction of a second instead of the 5 s torch + transformers cost
# (tests/test_cli.py checks that torch stays unimported).
PLUGINS = (
    "minillava.train.cli",
    "minillava.serve.cli",
    "minillava.demo.cli",
    "minillava.eval.cli",
    "minillava.viz.cli",
)


def _quiet_libraries() -> None:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if not torch.cuda.is_available():
        # transformers imports DeepSpeed where it is installed, and DeepSpeed's accelerator probe then warns on
        # every CPU run that it "was unable to detect" a GPU; told up front, it says nothing
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def parse_options(pairs: list[str]) -> dict[str, object]:
    """["num_latents=32", "name=x"] -> {"num_latents": 32, "name": "x"}: JSON values where they parse, else strings."""
    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"option {pair!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def cmd_build(args: argparse.Namespace) -> int:
    from minillava.anyres import parse_pinpoints
    from minillava.config import ModelConfig, ProjectorConfig, VisionConfig, XattnConfig
    from minillava.model import MiniLlava

    if args.vision_backend is None:
        args.vision_backend = "torchvision" if args.vision.startswith("torchvision:") else "hf"
    cfg = ModelConfig(
        vision=VisionConfig(
            source=args.vision,
            backend=args.vision_backend,
            select_layer=args.select_layer,
            select_feature=args.select_feature,
            image_size=args.image_size,
        ),
        projector=ProjectorConfig(
            name=args.projector or ("perceiver" if args.fusion == "xattn" else "mlp2x_gelu"),
            options=parse_options(args.projector_opt or []),
        ),
        llm_source=args.llm,
        template=args.template,
        aspect=args.aspect or ("resize" if args.anyres else "pad"),
        resize_backend=args.resize_backend,
        image_grid_pinpoints=parse_pinpoints(args.anyres) if args.anyres else None,
        fusion=args.fusion,
        xattn=XattnConfig(every=args.xattn_every),
    )
    model, processor = MiniLlava.build(cfg)
    model.save_pretrained(args.out, processor)
    tokens = f"{model.tokens_per_image} tokens per image" if model.anyres is None else "AnyRes: tokens by image size"
    print(f"built {args.out}: {tokens}, template {processor.template.name}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from minillava.generate import GenerationConfig, Generator
    from minillava.interop.exported import load_for_inference

    model, processor = load_for_inference(args.model, args.dtype, quantize=args.quantize)
    if args.template not in (None, "none"):
        processor = processor.with_template(args.template)
    gen_cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop or [],
    )
    generator = Generator(model, processor)
    raw = args.template == "none"
    if args.stream:
        for piece in generator.stream(args.prompt, args.image or [], gen_cfg, raw=raw):
            print(piece, end="", flush=True)
        print()
    else:
        print(generator.generate(args.prompt, args.image or [], gen_cfg, raw=raw))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from minillava.quantize import quantize_dir

    out = quantize_dir(args.model, args.out, args.scheme, args.dtype)
    print(f"quantized {args.model} -> {out} ({args.scheme}, per-output-channel symmetric, LM head included)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import minillava

    if args.format != "onnx" and args.quantize not in (None, "none"):
        raise ValueError("--quantize applies to --format onnx; for a quantized minillava dir use `minillava quantize`")
    if args.format != "gguf" and args.type is not None:
        raise ValueError("--type applies to --format gguf")
    if args.format == "gguf":
        from minillava.interop.gguf_export import export_gguf

        model, processor = minillava.load(args.model, "float32", "cpu")
        export_gguf(model, processor, args.out, args.type or "f16")
        print(f"exported {args.model} -> {args.out} (GGUF LLM {args.type or 'f16'} for llama.cpp + image encoder)")
        return 0
    if args.format == "onnx":
        from minillava.interop.onnx_export import export_onnx

        model, processor = minillava.load(args.model, "float32", "cpu")
        export_onnx(model, processor, args.out, args.quantize)
        weights = "int8 decoder weights" if args.quantize == "int8" else "float32"
        print(f"exported {args.model} -> {args.out} (ONNX: vision, embed_tokens, decoder; {weights})")
        return 0
    from minillava.interop.hf import export_hf_llava

    model, processor = minillava.load(args.model)
    export_hf_llava(model, processor, args.out)
    kind = "LlavaForConditionalGeneration" if model.anyres is None else "LlavaNextForConditionalGeneration"
    print(f"exported {args.model} -> {args.out} (transformers {kind})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import minillava

    model, processor = minillava.load(args.model)
    counts = model.parameter_counts()
    info = {
        "vision": {
            "backend": model.config.vision.backend,
            "class": type(model.vision.model).__name__,
            "select_layer": model.config.vision.select_layer,
            "select_feature": model.config.vision.select_feature,
            "image_size": model.vision.image_size,
            "patch_grid": list(model.vision.patch_grid),
        },
        "projector": model.config.projector.name,
        "fusion": model.config.fusion,
        "llm": type(model.llm).__name__,
        "tokens_per_image": model.tokens_per_image,  # with AnyRes, of the base view
        "anyres": None if model.anyres is None else model.anyres.layout.to_dict(),
        "image_token": f"{processor.image_token} (id {processor.image_token_id})",
        "template": processor.template.name,
        "max_length": processor.max_length,
        "parameters": counts,
        "total_trainable": sum(c["trainable"] for c in counts.values()),
        "total_frozen": sum(c["frozen"] for c in counts.values()),
    }
    print(json.dumps(info, indent=2))
    return 0


def add_quantize_flag(p: argparse.ArgumentParser) -> None:
    """`--quantize`: weight-only int8 for the LLM (a directory saved by `minillava quantize` is int8 already)."""
    p.add_argument("--quantize", default=None, choices=["none", "int8"],
                   help="int8: per-channel int8 weights for the LLM and its LM head (faster CPU decoding)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minillava", description="Build, train, evaluate and serve LLaVA-style VLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="assemble an untrained model from a vision encoder and an LLM")
    p.add_argument("--vision", required=True, help="local dir, hub id, builtin:dinov2-small or torchvision:vit_b_16")
    p.add_argument("--llm", required=True, help="local dir, hub id or builtin:smollm2-135m-instruct")
    p.add_argument("--projector", default=None, help="default: mlp2x_gelu; perceiver with --fusion xattn")
    p.add_argument("--projector-opt", action="append", metavar="KEY=VALUE", help="projector option (repeatable)")
    p.add_argument("--fusion", default="splice", choices=["splice", "xattn"], help="xattn: Flamingo cross-attention")
    p.add_argument("--xattn-every", type=int, default=1, help="xattn: a block before every K-th decoder layer")
    p.add_argument("--vision-backend", default=None, choices=["hf", "torchvision"])
    p.add_argument("--select-layer", type=int, default=-2)
    p.add_argument("--select-feature", default="patch", choices=["patch", "cls_patch"])
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--template", default="auto")
    p.add_argument("--aspect", default=None, choices=["pad", "resize", "center_crop"],
                   help="default pad; with --anyres resize, LLaVA-NeXT's base view")  # fmt: skip
    p.add_argument("--resize-backend", default="pil", choices=["pil", "torchvision"],
                   help="whose bicubic resize to reproduce exactly: transformers' PIL image processors (LLaVA's) or "
                        "its torchvision ones (transformers 5's default); needs no torchvision")  # fmt: skip
    p.add_argument("--anyres", default=None, metavar="HxW,...",
                   help="LLaVA-NeXT AnyRes grid pinpoints in px, multiples of the tower's input, e.g. "
                        "672x336,336x672,672x672,1008x336,336x1008")  # fmt: skip
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("generate", help="answer a prompt about one or more images")
    p.add_argument("--model", required=True, help="a minillava, transformers Llava / LlavaNext or ONNX export dir")
    p.add_argument("--image", action="append", help="image path (repeatable, in order)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--template", default=None, help="override the chat template; 'none' = prompt verbatim")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--stream", action="store_true")
    add_quantize_flag(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("quantize", help="quantize the LLM's weights to int8 and save (loads without re-quantizing)")
    p.add_argument("--model", required=True, help="a minillava dir or a transformers Llava dir")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--scheme", default="int8", choices=["int8"], help="per-output-channel symmetric int8 weights")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="of the layers left float")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export", help="write a transformers Llava / LlavaNext directory, ONNX graphs or a GGUF LLM")
    p.add_argument("--model", required=True)
    p.add_argument("--format", default="hf", choices=["hf", "onnx", "gguf"],
                   help="hf: transformers Llava (LlavaNext with AnyRes); onnx: vision, embed_tokens and decoder "
                        "graphs for onnxruntime; gguf: the LLM for llama.cpp beside minillava's image encoder "
                        "(docs/deploy.md)")  # fmt: skip
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--quantize", default=None, choices=["none", "int8"],
                   help="onnx: int8 decoder weights (weight-only, onnxruntime MatMulNBits): ~3.6x smaller files, "
                        "slower than float32 on CPU (docs/deploy.md)")  # fmt: skip
    p.add_argument("--type", default=None, choices=["f32", "f16", "q8_0", "q4_0"],
                   help="gguf: the LLM's weight type (default f16; q8_0: 8-bit blocks, ~2x smaller, fast on CPU; "
                        "q4_0: 4-bit blocks, check its quality on your data)")  # fmt: skip
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="architecture, token counts and parameter counts")
    p.add_argument("--model", required=True)
    p.set_defaults(func=cmd_info)

    for name in PLUGINS:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError, KeyError, RuntimeError, FloatingPointError) as e:
        print(f"minillava {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 1


def one_line(e: BaseException) -> str:
    """The error's own first line; for one re-raised from a DataLoader worker, the original message."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    if "Original Traceback" in text:  # torch wraps worker errors: "Caught X in DataLoader worker ...\n..."
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0]


if __name__ == "__main__":
    sys.exit(main())
