"""Tiny on-disk data sets for the training tests (images are 32x32 PNGs the tiny CLIP reads)."""

from __future__ import annotations

import pytest
from train_helpers import config, write_images, write_llava  # noqa: F401


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine: one intra-op thread is ~7x faster than two contended ones."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, asset_dir):
    """An instruct run that overfits the 5-sample set: (summary, run dir, data file, image dir)."""
    import torch

    from minillava.train.loop import train

    tmp = tmp_path_factory.mktemp("pretrained")
    names = write_images(tmp / "images")
    data = write_llava(tmp / "data.json", names)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train(config(tmp, asset_dir, data, tmp / "images", stage="instruct", lr=1e-2, max_steps=50,
                               plot=True))  # fmt: skip
    finally:
        torch.set_num_threads(before)
    return summary, tmp / "run", data, tmp / "images"
