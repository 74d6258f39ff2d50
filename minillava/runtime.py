"""Device and precision choices, checked once at the edge."""

from __future__ import annotations

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
    """Whether bfloat16 matmuls run on real hardware units here.

    CUDA (Ampere+) and CPUs with AVX-512 BF16 / AMX do; an AVX2-only CPU emulates bf16 and runs it ~80x
    slower than float32 (measured on an AMD EPYC, AVX2: 0.9 vs 70 GFLOP/s), so "auto" picks float32 there.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def auto_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    return torch.bfloat16 if fast_bfloat16(device) else torch.float32
