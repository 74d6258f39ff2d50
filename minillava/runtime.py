"""Device and precision choices, checked once at the edge."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """float32 | bfloat16 (CPU and CUDA) | float16 (CUDA only: CPU float16 kernels are slow or missing)."""
    dtype = name if isinstance(name, torch.dtype) else DTYPES.get(name)
    if dtype is None:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        raise ValueError("float16 needs a CUDA device; on CPU use bfloat16 (or float32)")
    return dtype


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
