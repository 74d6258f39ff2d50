"""Training: stages (what trains), LoRA, the loop, checkpoints, feature cache, metrics, CLI."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from minillava.train.config import TrainConfig, load_config

if TYPE_CHECKING:
    from minillava.train.stages import freeze

__all__ = ["TrainConfig", "freeze", "load_config", "train"]


def train(config: TrainConfig):  # noqa: ANN201 - lazy import keeps `import minillava.train` light
    from minillava.train.loop import train as _train

    return _train(config)


def __getattr__(name: str) -> Any:
    # stages imports torch: loaded on first use so the CLI's parser (which imports train.config) stays fast
    if name == "freeze":
        from minillava.train.stages import freeze

        return freeze
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
