"""minillava: turn a vision encoder and a causal LM into a LLaVA-style vision-language model.

The LLM reads an image as a sequence of tokens: the vision tower cuts the picture into patches, the
projector maps each patch feature into the LLM's embedding space, and the splice writes those vectors
into the text sequence where `<image>` stood.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from minillava.config import ModelConfig, ProjectorConfig, VisionConfig

if TYPE_CHECKING:
    from minillava.generate import GenerationConfig, Generator
    from minillava.model import MiniLlava
    from minillava.processor import Processor

# Imported on first use (PEP 562): these pull in torch and transformers (seconds), and every `minillava.x`
# import runs this file first, so `minillava --help` and the light CLI modules would pay for them too.
_LAZY = {
    "GenerationConfig": "minillava.generate",
    "Generator": "minillava.generate",
    "MiniLlava": "minillava.model",
    "Processor": "minillava.processor",
}

__all__ = [
    "GenerationConfig",
    "Generator",
    "MiniLlava",
    "ModelConfig",
    "Processor",
    "ProjectorConfig",
    "VisionConfig",
    "build",
    "load",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def build(vision: str, llm: str, projector: str = "mlp2x_gelu", **config: object) -> tuple[MiniLlava, Processor]:
    """Assemble an untrained model from two sources (local dir, hub id or `builtin:NAME`)."""
    from minillava.model import MiniLlava

    cfg = ModelConfig(vision=VisionConfig(source=vision), projector=ProjectorConfig(name=projector), llm_source=llm)
    for key, value in config.items():
        setattr(cfg, key, value)
    return MiniLlava.build(cfg)


def load(directory: str, dtype: str = "float32", device: str | None = None) -> tuple[MiniLlava, Processor]:
    """Load a minillava, transformers Llava or LlavaNext directory onto `device` (default: CUDA if any)."""
    from pathlib import Path

    from minillava.interop.hf import is_hf_llava_dir, load_hf_llava
    from minillava.model import MiniLlava
    from minillava.runtime import default_device, parse_dtype

    target = default_device() if device is None else device
    torch_dtype = parse_dtype(dtype, target)
    if not Path(directory, "config.json").exists() and not Path(directory, "minillava.json").exists():
        raise FileNotFoundError(f"{directory}: not a minillava or transformers Llava model directory")
    if is_hf_llava_dir(directory):
        model, processor = load_hf_llava(directory, torch_dtype)
    else:
        model, processor = MiniLlava.from_pretrained(directory, torch_dtype)
    return model.to(target), processor
