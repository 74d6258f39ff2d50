"""--image-token-noise: Gaussian noise on the image tokens while training, nowhere else."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import config, write_images, write_llava

from minillava.train.loop import noisy, train


def test_noise_is_relative_to_each_tokens_size():
    torch.manual_seed(0)
    tokens = torch.randn(64, 12, 256) * torch.tensor([0.1, 10.0]).repeat(32)[:, None, None]  # small and big tokens
    noise = noisy(tokens, 0.3) - tokens
    rms = tokens.pow(2).mean(-1).sqrt()
    relative = noise.pow(2).mean(-1).sqrt() / rms  # (64, 12)
    assert relative.mean().item() == pytest.approx(0.3, rel=0.05)
    assert relative.std().item() < 0.05  # the same fraction for a token of norm 0.1 as for one of 10


def test_noise_moves_image_rows_only(tmp_path, asset_dir):
    images = tmp_path / "images"
    data = write_llava(tmp_path / "data.json", write_images(images), text_only=False)
    text = tmp_path / "text.json"
    turns = [[{"from": "human", "value": f"say {i}"}, {"from": "gpt", "value": "one two three"}] for i in range(5)]
    text.write_text(json.dumps([{"id": f"t{i}", "conversations": t} for i, t in enumerate(turns)]))
    common = dict(stage="instruct", max_steps=2)

    def losses(name, path, noise):
        cfg = config(tmp_path / name, asset_dir, path, images, image_token_noise=noise, **common)
        return train(cfg)["losses"]

    assert losses("plain", data, 0.0) != losses("noisy", data, 0.5)
    assert losses("text-plain", text, 0.0) == losses("text-noisy", text, 0.5)


def test_negative_noise_is_refused(tmp_path, asset_dir):
    with pytest.raises(ValueError, match="--image-token-noise must be 0 or more"):
        config(tmp_path, asset_dir, tmp_path / "d.json", tmp_path, image_token_noise=-0.1)
