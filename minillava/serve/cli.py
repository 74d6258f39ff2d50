"""`minillava serve`: the OpenAI-compatible server on FastAPI + uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger("minillava.serve")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `serve` on the main CLI's subparsers."""
    p = subparsers.add_parser(
        "serve",
        help="serve a model behind an OpenAI-compatible API (with a web chat page at /)",
        description="Serve a saved minillava (or transformers Llava) directory: POST /v1/chat/completions, "
        "GET /v1/models, GET /health, and a chat page at /.",
    )
    p.add_argument("--model", required=True, help="model directory (minillava or transformers Llava layout)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=_positive, default=8, help="requests generated together (default 8)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for company (default 5)")
    p.add_argument("--max-queue", type=_positive, default=256, help="waiting requests before 503 (default 256)")
    p.add_argument(
        "--api-key", default=os.environ.get("MINILLAVA_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1 (default: $MINILLAVA_API_KEY, else none)",
    )  # fmt: skip
    p.add_argument("--served-model-name", help="the model id clients send (default: the directory's name)")
    p.add_argument("--allow-local-images", metavar="DIR", help="accept file paths / file:// URLs under DIR")
    p.add_argument("--allow-remote-images", action="store_true", help="let the server fetch http(s) image URLs")
    p.add_argument("--max-images", type=_positive, default=4, help="images per request (default 4)")
    p.add_argument("--max-image-bytes", type=_positive, default=20 * 2**20, help="per image (default 20 MiB)")
    p.add_argument("--max-image-pixels", type=_positive, help="per image (default: the processor's max_pixels)")
    p.add_argument("--default-max-tokens", type=_positive, default=512, help="when a request sets no max_tokens")
    p.add_argument(
        "--max-text-chars", type=_positive,
        help="characters of text per request, refused (413) before tokenizing (default: 32 per token of context)",
    )  # fmt: skip
    p.add_argument(
        "--allowed-origins", type=_origins, default=(), metavar="ORIGINS",
        help="comma-separated origins (https://app.example.com, or *) that browsers may call the API from "
        "(CORS); default: none, same-origin only",
    )  # fmt: skip
    p.add_argument(
        "--batching", choices=["continuous", "static"], default="continuous",
        help="continuous (default): requests join the running batch at the next token; static: whole batches",
    )  # fmt: skip
    p.add_argument(
        "--prefill-chunk", type=_non_negative, default=256, metavar="N",
        help="continuous: prefill newcomers' prompts N tokens at a time, decoding the batch between chunks "
        "(default 256; 0: a prompt at once)",
    )  # fmt: skip
    p.add_argument(
        "--shutdown-timeout", type=float, default=30.0, metavar="S",
        help="on SIGTERM, seconds to let in-flight requests finish before they are cut off (default 30)",
    )  # fmt: skip
    p.add_argument(
        "--dtype", default="float32",
        help="float32 (default: batched greedy answers equal one-at-a-time ones) | auto | bfloat16 (bf16) | "
        "float16 (fp16, CUDA only); anything but float32 may make batched answers differ",
    )  # fmt: skip
    p.add_argument(
        "--quantize", default=None, choices=["none", "int8"],
        help="int8: per-channel int8 LLM weights (faster CPU decoding; a `minillava quantize` directory is int8 "
        "already); answers may differ from float32's",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (CUDA if available) | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=_positive, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=serve)


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())
    for o in origins:
        if o != "*" and not o.startswith(("http://", "https://")):
            raise argparse.ArgumentTypeError(f"{o!r} is not an origin like https://app.example.com (or *)")
    return origins


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def choose_dtype(requested: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The serving precision for `--dtype` on `device`, and the reason, for the log."""
    from minillava.runtime import fast_bfloat16, parse_dtype

    name = _DTYPE_ALIASES.get(requested.lower(), requested.lower())
    if name != "auto":
        return parse_dtype(name, device), f"--dtype {requested}"
    if fast_bfloat16(device):
        why = "bf16 is supported natively" if device.type == "cuda" else "bf16 matmuls measured faster on this CPU"
        return parse_dtype("bfloat16", device), f"--dtype auto: {why}"
    return parse_dtype("float32", device), f"--dtype auto: bf16 is not faster than float32 on this {device.type}"


def log_precision(dtype: torch.dtype, why: str) -> None:
    import torch

    if dtype == torch.float32:
        log.info("precision: float32 (%s); batched greedy answers equal one-at-a-time answers", why)
    else:
        log.warning(
            "precision: %s (%s); batched requests may get different greedy answers than one at a time "
            "(rounding depends on the batch); use --dtype float32 for exact ones", str(dtype).removeprefix("torch."),
            why,
        )  # fmt: skip


def load_for_serving(directory: str, dtype: str = "float32", device: str = "auto", quantize: str | None = None):
    """(model, processor) in eval mode on the chosen device; logs the precision chosen and why.

    `quantize` "int8" swaps the LLM's Linear layers for int8 ones after the move to the device; a directory saved
    by `minillava quantize` gets its stored int8 layers whatever `quantize` says."""
    import torch

    import minillava
    from minillava import quantize as q8
    from minillava.interop.exported import is_export_dir, load_for_inference
    from minillava.runtime import default_device

    if is_export_dir(directory):  # ONNX Runtime or llama.cpp: precision and weights were fixed at export
        model, processor = load_for_inference(directory, dtype, quantize=quantize)
        log.info("precision: as exported (%s); static batches", type(model).__name__)
        return model, processor
    scheme = q8.parse_scheme(quantize)
    dev = default_device() if device == "auto" else torch.device(device)
    want, why = choose_dtype(dtype, dev)
    log_precision(want, why)
    dtype = str(want).removeprefix("torch.")
    # minillava.load checks dtypes for CPU; load float16 as float32 and cast once it is on the GPU.
    model, processor = minillava.load(directory, "float32" if want == torch.float16 else dtype)
    model = q8.quantize_loaded(model.to(device=dev, dtype=want).eval(), directory, scheme)
    if q8.quantized_scheme(model) != "none":
        log.warning("weights: int8 LLM layers (activations %s in the kernel); answers may differ from float32's",
                    str(q8.compute_dtype(dev)).removeprefix("torch."))  # fmt: skip
    return model, processor


def serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from minillava.serve.app import ServeSettings, create_app
    except ImportError as e:
        print(f"minillava serve needs FastAPI and uvicorn ({e}); pip install 'minillava[serve]'", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not Path(args.model).is_dir():
        print(f"--model {args.model}: not a directory", file=sys.stderr)
        return 2
    if args.allow_local_images and not Path(args.allow_local_images).is_dir():
        print(f"--allow-local-images {args.allow_local_images}: not a directory", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        model, processor = load_for_serving(args.model, args.dtype, args.device, args.quantize)
    except (OSError, ValueError) as e:
        print(f"cannot load {args.model}: {e}", file=sys.stderr)
        return 2
    settings = ServeSettings(
        model_name=args.served_model_name or Path(args.model).resolve().name,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue,
        api_key=args.api_key or None,
        allow_local_images=args.allow_local_images,
        allow_remote_images=args.allow_remote_images,
        max_images=args.max_images,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        default_max_tokens=args.default_max_tokens,
        max_text_chars=args.max_text_chars,
        allowed_origins=args.allowed_origins,
        batching=args.batching,
        prefill_chunk=args.prefill_chunk,
    )
    if not settings.api_key and not _is_loopback(args.host):
        log.warning("serving on %s without --api-key: anyone who can reach it can use the model", args.host)
    app = create_app(model, processor, settings)
    log.info("serving %s as %r on http://%s:%d", args.model, settings.model_name, args.host, args.port)
    # uvicorn stops accepting on SIGTERM, waits up to this long for in-flight requests, then cancels them
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=args.shutdown_timeout
    )
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m minillava.serve.cli serve --model DIR`), same flags as `minillava serve`."""
    parser = argparse.ArgumentParser(prog="minillava")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
