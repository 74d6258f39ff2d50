"""Shared fixtures: tiny random-initialised models (see tiny_models.py), built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import make_llm, make_vision

from minillava.config import ModelConfig, ProjectorConfig, VisionConfig
from minillava.model import MiniLlava


@pytest.fixture(scope="session")
def asset_dir(tmp_path_factory: pytest.TempPathFactory):
    """Build each tiny source once per session: asset_dir('llm', 'llama') -> Path."""
    root = tmp_path_factory.mktemp("tiny")
    made: dict[tuple[str, str], Path] = {}

    def get(role: str, kind: str) -> Path:
        if (role, kind) not in made:
            d = root / f"{role}-{kind}"
            d.mkdir()
            made[role, kind] = (make_llm if role == "llm" else make_vision)(d, kind)
        return made[role, kind]

    return get


@pytest.fixture(scope="session")
def build_tiny(asset_dir):
    def build(
        vision: str = "clip", llm: str = "llama", projector: str = "mlp2x_gelu", template: str = "auto", **vision_kw
    ):
        cfg = ModelConfig(
            vision=VisionConfig(source=str(asset_dir("vision", vision)), **vision_kw),
            projector=ProjectorConfig(name=projector),
            llm_source=str(asset_dir("llm", llm)),
            template=template,
        )
        torch.manual_seed(2)
        return MiniLlava.build(cfg)

    return build


@pytest.fixture(scope="session")
def tiny(build_tiny):
    """The default tiny model: CLIP + Llama + mlp2x_gelu, tokenizer with a ChatML template."""
    return build_tiny()
