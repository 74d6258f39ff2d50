"""Training: stages (what trains), LoRA, the loop, checkpoints, feature cache, metrics, CLI."""

from minillava.train.config import TrainConfig, load_config
from minillava.train.stages import freeze

__all__ = ["TrainConfig", "freeze", "load_config", "train"]


def train(config: TrainConfig):  # noqa: ANN201 - lazy import keeps `import minillava.train` light
    from minillava.train.loop import train as _train

    return _train(config)
