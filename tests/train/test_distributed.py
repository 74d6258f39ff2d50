"""Multi-process training on CPU (gloo): FSDP2 through the accelerate configs, resume, skipped samples under DDP
(DeepSpeed: test_distributed_deepspeed.py).

Each test launches 2 real processes and compares their per-step losses with one process on the same global
batch (1 x 4 against 2 ranks x 2).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import config, write_images, write_llava

from minillava.train.config import TrainConfig
from minillava.train.loop import TrainStep, build_model, train
from minillava.train.stages import LoraSettings, freeze
from minillava.train.strategy import make_strategy, resolve_strategy

ROOT = Path(__file__).parents[2]
ACCELERATE = ROOT / "configs" / "accelerate"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _cli_args(cfg: TrainConfig) -> list[str]:
    """The options that differ from the defaults, as `minillava train` flags."""
    args = ["train", "--data", *cfg.data]
    defaults = TrainConfig().to_dict()
    for key, value in cfg.to_dict().items():
        if key == "data" or value == defaults[key]:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return args


def _launch(prefix: list[str], cfg) -> None:
    cmd = [*prefix, "-m", "minillava.train.cli", *_cli_args(cfg)]
    run = subprocess.run(cmd, env=_env(), capture_output=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr.decode()[-4000:]


def _torchrun(cfg) -> None:
    _launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port())],
            cfg)  # fmt: skip


def _losses(run: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in recs if r["event"] == "step"}


def _mixed_data(tmp: Path) -> tuple[Path, Path]:
    """6 image + 2 text-only samples: one global batch of 4 gives a rank only text (no hang)."""
    names = write_images(tmp / "images")
    path = write_llava(tmp / "d.json", names)
    rows = json.loads(path.read_text())
    img = [r for r in rows if "image" in r]
    text = [r for r in rows if "image" not in r]
    path.write_text(json.dumps(img + [{**r, "id": r["id"] + "-b"} for r in img[:2]] + text +
                               [{**text[0], "id": "text-2"}]))  # fmt: skip
    return path, tmp / "images"


def _module_order(step: TrainStep, *inputs) -> list[tuple[str, str]]:
    """The modules one forward and backward runs, in order, as DeepSpeed ZeRO-3 traces them: a forward
    pre-hook on each, and in backward the moment the gradient of its output is complete."""
    order, hooks = [], []

    def on_output(name):
        def hook(_module, _args, out):
            for t in out if isinstance(out, tuple) else (out,):
                if torch.is_tensor(t) and t.requires_grad:
                    t.register_hook(lambda _g: order.append(("backward", name)))

        return hook

    for name, module in step.named_modules():
        hooks.append(module.register_forward_pre_hook(lambda _m, _a, n=name: order.append(("forward", n))))
        hooks.append(module.register_forward_hook(on_output(name)))
    try:
        step(*inputs).backward()
    finally:
        for h in hooks:
            h.remove()
    return order


@pytest.mark.parametrize("tune_vision", [False, True])
def test_text_only_micro_batch_runs_the_modules_of_an_image_batch(asset_dir, tune_vision):
    """DeepSpeed ZeRO-3 records the order of the modules a micro-batch runs (forward and backward) and, on a
    rank where it changes, runs a check the other ranks do not (they hang). A text-only micro-batch must run
    the modules of one with images, in the same order; with LoRA the input embeddings are frozen, so without
    the projector's zero edge into them the first decoder layer's frozen modules would drop out of backward."""
    cfg = TrainConfig(vision=str(asset_dir("vision", "clip")), llm=str(asset_dir("llm", "llama")))
    model, _ = build_model(cfg)
    freeze(model, "instruct", lora=LoraSettings(dropout=0.0), tune_vision=tune_vision, log_fn=lambda _s: None)
    step = TrainStep(model, tune_vision)
    pixels = torch.randn(1, 3, model.vision.image_size, model.vision.image_size)
    with torch.no_grad():
        features = model.vision(pixels)
        n = model.project(features).shape[1]
    text = torch.tensor([[5, 6, 7, 8, 9, 10]])
    ids = torch.cat([text[:, :2], torch.full((1, n), model.config.image_token_id), text[:, 2:]], dim=1)
    labels = torch.where(ids == model.config.image_token_id, -100, ids)
    image = (ids, torch.ones_like(ids), labels, None if tune_vision else features, pixels if tune_vision else None)
    with_image = _module_order(step, *image, None)
    text_only = _module_order(step, text, torch.ones_like(text), text, None, None, None)
    assert ("backward", "model.projector") in with_image
    assert text_only == with_image


@pytest.mark.parametrize(
    "name, expected", [("fsdp-full-shard", "fsdp-full-shard"), ("fsdp-shard-grad-op", "fsdp-shard-grad-op"),
                       ("multi-gpu", "ddp")],
)  # fmt: skip
def test_accelerate_configs_pick_the_strategy(tmp_path, name, expected):
    """The environment `accelerate launch --config_file` really sets, read by `--strategy auto`."""
    pytest.importorskip("accelerate", reason="accelerate is not installed: `pip install accelerate`")
    probe = tmp_path / "env.py"
    probe.write_text("import json, os; print(json.dumps(dict(os.environ)))")
    cmd = ["accelerate", "launch", "--config_file", str(ACCELERATE / f"{name}.yaml"), "--num_processes", "1",
           str(probe)]  # fmt: skip
    run = subprocess.run(cmd, env=_env(), capture_output=True, timeout=120, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    env = json.loads(run.stdout.strip().splitlines()[-1])
    assert resolve_strategy("auto", env) == expected


def test_strategy_env_errors():
    with pytest.raises(ValueError, match="offload"):
        resolve_strategy("auto", {"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true"})
    with pytest.raises(ValueError, match="NO_SHARD"):
        resolve_strategy("auto", {"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "NO_SHARD"})
    fsdp1 = {"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}  # an FSDP1-style config
    assert resolve_strategy("auto", fsdp1) == "fsdp-shard-grad-op"
    assert resolve_strategy("ddp", fsdp1) == "ddp"  # the flag wins over the launcher


@pytest.mark.parametrize("anyres, fusion", [(True, "splice"), (False, "xattn")])
def test_zero3_refuses_image_only_modules(anyres, fusion):
    """AnyRes's packer and xattn's cross-attention blocks run only when a micro-batch has images."""
    model = torch.nn.Module()
    model.anyres = torch.nn.Module() if anyres else None
    model.config = SimpleNamespace(fusion=fusion)
    with pytest.raises(ValueError, match="fsdp-full-shard"):
        make_strategy("deepspeed-zero3", 2, torch.device("cpu")).wrap(torch.nn.Module(), model, False)


def test_fsdp_two_processes_match_one_process_and_resume(tmp_path, asset_dir):
    """LoRA (frozen and trainable parameters in one FSDP unit, tied embeddings) through the FULL_SHARD
    accelerate config: same losses as one process, same exported (merged) weights; then an FSDP
    SHARD_GRAD_OP run resumes from its step-2 checkpoint (sharded optimizer state) and redoes steps 3-4."""
    pytest.importorskip("accelerate", reason="accelerate is not installed: `pip install accelerate`")
    path, images = _mixed_data(tmp_path)
    common = dict(stage="instruct", lora=True, lora_dropout=0.0, lr=1e-2, projector_lr=1e-2, max_steps=4)
    one = train(config(tmp_path / "one", asset_dir, path, images, batch_size=4, **common))
    fsdp = config(tmp_path / "fsdp", asset_dir, path, images, batch_size=2, save_every=2, **common)
    _launch(["accelerate", "launch", "--config_file", str(ACCELERATE / "fsdp-full-shard.yaml"), "--num_processes",
             "2", "--main_process_port", str(_port())], fsdp)  # fmt: skip
    records = [json.loads(x) for x in (Path(fsdp.out) / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["strategy"] == "fsdp-full-shard" and records[0]["world_size"] == 2
    got = _losses(Path(fsdp.out))
    assert got == pytest.approx(dict(enumerate(one["losses"], 1)), rel=1e-5)
    assert got[4] < got[1]  # it trains
    for part in ("projector.safetensors", "llm/model.safetensors"):
        a, b = load_file(Path(one["model"]) / part), load_file(Path(fsdp.out) / "model" / part)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=f"{part}: {k}")

    resumed = config(tmp_path / "resumed", asset_dir, path, images, batch_size=2, strategy="fsdp-shard-grad-op",
                     resume=str(Path(fsdp.out) / "checkpoints" / "step-00000002"), **common)  # fmt: skip
    _torchrun(resumed)  # step 4's loss depends on the restored Adam moments
    assert _losses(Path(resumed.out)) == pytest.approx({3: one["losses"][2], 4: one["losses"][3]}, rel=1e-5)


def test_ddp_rank_whose_samples_are_all_skipped_joins(tmp_path, asset_dir):
    """`--on-bad-sample skip` with 2 ranks: the two longest samples (rank 0's half of the length-sorted global
    batch) have missing images; rank 0 joins with a zero-weight micro-batch and the loss is that of one
    process over the same 4 samples (2 skipped)."""
    names = write_images(tmp_path / "images")
    good = [{"id": f"ok-{c}", "image": names[c], "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "a red square"}]}
        for c in ("red", "blue")]  # fmt: skip
    long_answer = "a red square on the left of a blue circle " * 3
    bad = [{"id": f"ghost-{i}", "image": f"missing-{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": long_answer}]}
        for i in range(2)]  # fmt: skip
    path = tmp_path / "d.json"
    path.write_text(json.dumps(good + bad))
    common = dict(stage="instruct", lr=1e-2, max_steps=2, on_bad_sample="skip")
    one = train(config(tmp_path / "one", asset_dir, path, tmp_path / "images", batch_size=4, **common))
    assert one["skipped"] == 4  # 2 per step
    ddp = config(tmp_path / "two", asset_dir, path, tmp_path / "images", batch_size=2, **common)
    _torchrun(ddp)
    got = _losses(Path(ddp.out))
    assert got == pytest.approx(dict(enumerate(one["losses"], 1)), rel=1e-5)
    summary = json.loads((Path(ddp.out) / "summary.json").read_text())
    assert sorted(s["id"] for s in summary["skipped_samples"]) == ["ghost-0", "ghost-0", "ghost-1", "ghost-1"]


def test_ddp_tunes_the_vision_tower(tmp_path, asset_dir):
    """`--tune-vision` under DDP: the tower's layers above `select_layer` and its final norms never reach the loss,
    so they must not be trainable (DDP waits for a gradient of every trainable parameter); 2 ranks give the
    losses of one process."""
    path, images = _mixed_data(tmp_path)
    common = dict(stage="instruct", lr=1e-2, projector_lr=1e-2, tune_vision=True, vision_lr=1e-2, max_steps=3)
    one = train(config(tmp_path / "one", asset_dir, path, images, batch_size=4, **common))
    ddp = config(tmp_path / "two", asset_dir, path, images, batch_size=2, **common)
    _torchrun(ddp)
    assert _losses(Path(ddp.out)) == pytest.approx(dict(enumerate(one["losses"], 1)), rel=1e-5)
