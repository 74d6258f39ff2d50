"""Device and precision choices, checked once at the edge."""

from __future__ import annotations

import functools
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """auto | float32 | bfloat16 (CPU and CUDA) | float16 (CUDA only: CPU float16 kernels are slow or missing)."""
    if name == "auto":
        return auto_dtype(device)
    dtype = name if isinstance(name, torch.dtype) else DTYPES.get(name)
    if dtype is None:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        raise ValueError("float16 needs a CUDA device; on CPU use bfloat16 (or float32)")
    return dtype


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fast_bfloat16(device: str | torch.device = "cpu") -> bool:
    """Whether bfloat16 matmuls run faster than float32 here, so that "auto" precision should pick bf16.

    CUDA (Ampere+) and CPUs with AMX tiles: yes. A CPU without bf16 instructions (AVX2) emulates bf16 at ~1/80
    of float32's speed (AMD EPYC: 0.9 vs 70 GFLOP/s): no. In between, AVX-512 BF16 without AMX, the answer
    depends on the chip and the oneDNN kernels (an Intel Xeon here: bf16 165 GFLOP/s, float32 310, so the
    demo's LoRA step took 2.1 s in bf16 and 1.25 s in float32), so it is measured once: bf16 must win by 20 %.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return _cpu_bf16_pays()


@functools.cache
def _cpu_bf16_pays() -> bool:
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return True
    return _matmul_seconds(torch.bfloat16) * 1.2 < _matmul_seconds(torch.float32)


def _matmul_seconds(dtype: torch.dtype, n: int = 512, reps: int = 5) -> float:
    """Best of `reps` n x n x n products (~1 ms each in float32 on 2 AVX-512 cores) after a warm-up."""
    g = torch.Generator().manual_seed(0)  # leaves the caller's random stream alone
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def auto_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    return torch.bfloat16 if fast_bfloat16(device) else torch.float32


def compile_decoder_layers(llm: torch.nn.Module) -> int:
    """torch.compile each decoder layer of a transformers LLM in place; returns how many.

    Regional compilation: the layers run the same code, so one graph per kind of layer (with or without LoRA
    adapters, say) is compiled, in seconds, and reused; the splice, the loss and the optimizer stay eager. What
    it buys is fusion of the memory-bound work between the matmuls (RMSNorm, SiLU x gate, rotary, the autocast
    casts): on an H200, at the large bench shape, the stage-2 step went from 0.199 s to 0.140 s (MFU 39 -> 55 %).
    """
    if torch.__version__ < "2.5":  # TorchVersion compares as a version, not as text
        raise ValueError(f"--compile needs torch >= 2.5 (one graph shared by the layers); this is {torch.__version__}")
    layers = next((m for name, m in llm.named_modules()
                   if name.rsplit(".", 1)[-1] == "layers" and isinstance(m, torch.nn.ModuleList)), None)  # fmt: skip
    if layers is None:
        raise ValueError(f"--compile: no decoder layer list (`.layers`) found in {type(llm).__name__}")
    # transformers' output-capturing hook on each layer writes a context variable; under gradient checkpointing
    # dynamo refuses that side effect (a graph break: nothing compiled at all) unless told that the recompute in
    # backward need not replay it. It need not: the recompute only rebuilds activations for the gradients.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for layer in layers:
        layer.compile()
    return len(layers)
