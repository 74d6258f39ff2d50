"""Feature cache hit/miss/invalidation; YAML config + CLI overrides; recipes; CLI registration."""

from __future__ import annotations

import argparse
import copy
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from train_helpers import config, write_images, write_llava

from minillava.data.dataset import SupervisedDataset
from minillava.images import ImageTransform
from minillava.train.cache import FeatureCache, namespace_for
from minillava.train.cli import add_commands
from minillava.train.config import load_config
from minillava.train.loop import train

CONFIGS = Path(__file__).parents[2] / "configs"


def test_feature_cache_hits_on_later_epochs_and_runs(tmp_path, asset_dir):
    names = write_images(tmp_path / "images")
    data = write_llava(tmp_path / "d.json", names)
    common = dict(stage="align", lr=1e-3, max_steps=2)  # 1 step per epoch: 2 epochs
    plain = train(config(tmp_path / "nocache", asset_dir, data, tmp_path / "images", **common))
    first = train(config(tmp_path / "a", asset_dir, data, tmp_path / "images", feature_cache=str(tmp_path / "fc"),
                         **common))  # fmt: skip
    assert first["feature_cache"] == {"hits": 4, "misses": 4}  # epoch 1 computes, epoch 2 reads
    assert first["losses"] == plain["losses"]  # cached features are the features
    second = train(config(tmp_path / "b", asset_dir, data, tmp_path / "images", feature_cache=str(tmp_path / "fc"),
                          **common))  # fmt: skip
    assert second["feature_cache"] == {"hits": 8, "misses": 0} and second["losses"] == plain["losses"]
    (tmp_path / "images" / "red.png").write_bytes((tmp_path / "images" / "blue.png").read_bytes())  # file changed
    third = train(config(tmp_path / "c", asset_dir, data, tmp_path / "images", feature_cache=str(tmp_path / "fc"),
                         **common))  # fmt: skip
    assert third["feature_cache"] == {"hits": 7, "misses": 1}


def test_workers_start_once_per_run_and_read_what_earlier_epochs_cached(tmp_path, asset_dir, monkeypatch):
    """DataLoader workers are forked once per run (persistent), not once per epoch, and still read the features
    computed in earlier epochs: the main process flushes them to a shard at each epoch start, and the workers'
    cache re-lists its directory when it changed."""
    names = write_images(tmp_path / "images")
    data = write_llava(tmp_path / "d.json", names)
    loaded_by = tmp_path / "pids"
    load = SupervisedDataset.load

    def recording_load(self, index):  # runs in whichever process loads the sample
        with open(loaded_by, "a") as f:
            f.write(f"{os.getpid()}\n")
        return load(self, index)

    monkeypatch.setattr(SupervisedDataset, "load", recording_load)
    common = dict(stage="align", lr=1e-3, max_steps=3)  # 1 step per epoch: 3 epochs
    plain = train(config(tmp_path / "plain", asset_dir, data, tmp_path / "images", **common))
    loaded_by.unlink()
    run = train(config(tmp_path / "workers", asset_dir, data, tmp_path / "images", num_workers=1,
                       feature_cache=str(tmp_path / "fc"), **common))  # fmt: skip
    assert run["feature_cache"] == {"hits": 8, "misses": 4}  # epochs 2 and 3 read epoch 1's features
    assert run["losses"] == plain["losses"]
    workers = set(loaded_by.read_text().split())
    assert len(workers) == 1 and str(os.getpid()) not in workers  # one worker loaded every sample of 3 epochs


def test_a_reader_sees_shards_written_after_it_listed_the_directory(tmp_path):
    """A DataLoader worker's cache (the reader) finds what the main process (the writer) flushes later, even a
    shard renamed in within the same timestamp tick as the reader's last listing (the directory's mtime then
    does not move): a listing less than 2 s after the mtime it saw is not trusted, and is repeated on a miss."""
    namespace = {"encoder": "test"}
    writer, reader = FeatureCache(tmp_path, namespace), FeatureCache(tmp_path, namespace)
    assert reader.get("a|1|2") is None
    writer.put("a|1|2", torch.ones(2, 3))
    writer.flush()
    assert torch.equal(reader.get("a|1|2"), torch.ones(2, 3))  # the mtime moved: listed again
    tick = reader.dir.stat().st_mtime_ns
    writer.put("b|1|2", torch.zeros(2, 3))
    writer.flush()
    os.utime(reader.dir, ns=(tick, tick))  # as if the rename fell in the tick the reader already saw
    time.sleep(0.15)  # listings of an unsettled directory are at most 0.1 s apart
    assert torch.equal(reader.get("b|1|2"), torch.zeros(2, 3))
    assert len(reader) == 2


def test_cache_namespace_changes_with_encoder_layer_and_preprocessing(tiny, tmp_path):
    model, _ = tiny
    vision = copy.deepcopy(model.vision)
    t = ImageTransform(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "pad")
    base = FeatureCache(tmp_path, namespace_for(vision, t, torch.float32))
    base.put("img|1|2", torch.ones(16, 24))
    base.flush()
    assert FeatureCache(tmp_path, namespace_for(vision, t, torch.float32)).get("img|1|2") is not None  # hit
    variants = [namespace_for(vision, replace(t, aspect="resize"), torch.float32),
                namespace_for(vision, t, torch.bfloat16)]  # fmt: skip
    vision.config = replace(vision.config, select_layer=-1)
    variants.append(namespace_for(vision, t, torch.float32))
    vision.config = replace(vision.config, select_layer=-2)
    with torch.no_grad():
        next(vision.parameters()).add_(1.0)  # other weights, same config
    variants.append(namespace_for(vision, t, torch.float32))
    for ns in variants:
        cache = FeatureCache(tmp_path, ns)
        assert cache.dir != base.dir and cache.get("img|1|2") is None


def test_yaml_config_with_cli_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: m\ndata: [a.json]\nstage: instruct\nlr: 1.0e-4\nlora: true\nbatch_size: 8\n")
    cfg = load_config(cfg_file, {"lr": 2e-5, "batch_size": None, "seed": 7})
    assert (cfg.lr, cfg.batch_size, cfg.seed, cfg.lora, cfg.resolved_projector_lr()) == (2e-5, 8, 7, True, 2e-5)
    (tmp_path / "bad.yaml").write_text("lrr: 1\n")
    with pytest.raises(ValueError, match="unknown option.*lrr"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="use --stage instruct"):
        load_config(None, {"model": "m", "data": ["a"], "stage": "align", "lora": True})
    with pytest.raises(ValueError, match="--vision and --llm"):
        load_config(None, {"data": ["a"]})
    assert load_config(None, {"vision": "v", "llm": "l", "data": "x.json"}).resolved_lr() == 1e-3  # align default


def test_recipes_load():
    recipes = sorted(CONFIGS.glob("*.yaml"))
    assert len(recipes) >= 5
    for path in recipes:
        cfg = load_config(path)
        assert cfg.stage in ("align", "instruct")


def test_cli_registers_commands_with_funcs(tmp_path, asset_dir, capsys):
    parser = argparse.ArgumentParser(prog="minillava")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--vision", "v", "--llm", "l", "--data", "d.json", "--lr", "3e-4", "--resume"])
    assert callable(args.func) and args.lr == 3e-4 and args.resume == "latest" and args.batch_size is None
    assert callable(parser.parse_args(["data", "check", "x.json"]).func)
    assert callable(parser.parse_args(["merge-lora", "--model", "a", "--out", "b"]).func)
    from minillava.train.cli import main

    assert main(["merge-lora", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "nothing to merge" in capsys.readouterr().err
    assert main(["train", "--data", "x.json"]) == 1
    assert "--vision and --llm" in capsys.readouterr().err
