"""Fixtures for the server tests: a tiny model saved to disk (helpers live in serve_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import louden

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="session")
def serve_dir(build_tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny model with louder LLM weights, so answers depend on the prompt and image
    (the stock random init answers newlines to everything), saved as a minillava directory."""
    model, processor = build_tiny()
    louden(model)
    directory = tmp_path_factory.mktemp("serve") / "tiny"
    model.save_pretrained(directory, processor)
    return directory


@pytest.fixture(scope="module")
def one_thread():
    """Two shared cores: intra-op threads spinning against the server's own threads cost ~8x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
