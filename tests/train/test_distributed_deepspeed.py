"""DeepSpeed ZeRO-2 / ZeRO-3 on CPU (gloo, DeepSpeed's CPU accelerator, no compiled ops), 2 processes against 1.

Skipped where DeepSpeed is not installed (`pip install 'minillava[deepspeed]'`, DS_BUILD_OPS=0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import ACCELERATE, ROOT, _cli_args, _losses, _mixed_data, _port
from train_helpers import config

from minillava.train.loop import train
from minillava.train.strategy import resolve_strategy

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed: pip install 'minillava[deepspeed]'")


def _env() -> dict[str, str]:
    """The launched processes find this checkout first, and DeepSpeed wherever this process found it."""
    import deepspeed

    extra = str(Path(deepspeed.__file__).parents[1])
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", ""), extra) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "DS_ACCELERATOR": "cpu"}


def _launch(prefix: list[str], cfg) -> None:
    cmd = [*prefix, "-m", "minillava.train.cli", *_cli_args(cfg)]
    run = subprocess.run(cmd, env=_env(), capture_output=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr.decode()[-4000:]


def _accelerate(name: str, cfg) -> None:
    _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / f"{name}.yaml"),
             "--num_processes", "2", "--main_process_port", str(_port())], cfg)  # fmt: skip


def test_deepspeed_env_picks_the_strategy():
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    assert resolve_strategy("auto", env) == "deepspeed-zero3"
    assert resolve_strategy("auto", {**env, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}) == "deepspeed-zero2"
    assert resolve_strategy("ddp", env) == "ddp"  # the flag wins over the launcher
    with pytest.raises(ValueError, match="zero_stage 1"):
        resolve_strategy("auto", {**env, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"})
    with pytest.raises(ValueError, match="offload"):
        resolve_strategy("auto", {**env, "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"})
    with pytest.raises(ValueError, match="deepspeed_config_file"):
        resolve_strategy("auto", {**env, "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"})


@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_deepspeed_configs_pick_the_strategy(tmp_path, stage):
    """The environment `accelerate launch --config_file deepspeed-zeroN.yaml` really sets."""
    probe = tmp_path / "env.py"
    probe.write_text("import json, os; print(json.dumps(dict(os.environ)))")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ACCELERATE / f"deepspeed-zero{stage}.yaml"), "--num_processes", "1", str(probe)]  # fmt: skip
    run = subprocess.run(cmd, env=_env(), capture_output=True, timeout=120, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    env = json.loads(run.stdout.strip().splitlines()[-1])
    assert resolve_strategy("auto", env) == f"deepspeed-zero{stage}"


def _check_run(run, stage: int, one: dict, steps: int, world: int = 2) -> None:
    records = [json.loads(x) for x in (Path(run.out) / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["strategy"] == f"deepspeed-zero{stage}" and records[0]["world_size"] == world
    got = _losses(Path(run.out))
    assert got == pytest.approx(dict(enumerate(one["losses"][:steps], 1)), rel=1e-5), f"ZeRO-{stage}"
    assert got[steps] < got[1]  # it trains
    assert all(r["grad_norm"] > 0 for r in records if r["event"] == "step")
    for part in ("projector.safetensors", "llm/model.safetensors"):
        a, b = load_file(Path(one["model"]) / part), load_file(Path(run.out) / "model" / part)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=f"ZeRO-{stage} {part}: {k}")


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_processes_match_one_process_and_resume(tmp_path, asset_dir, stage):
    """LoRA (frozen and trainable parameters, tied embeddings), global batches that give one rank only text
    (steps 1-2 and 3-4 are two epochs, shuffled differently): ZeRO-N through its accelerate config gives the
    losses and exported (merged) weights of one process over 4 steps, and a run resumed from its step-2
    checkpoint (whole AdamW state, gathered) redoes steps 3-4 with the same losses. ZeRO-3 hung at step 3
    when a text-only micro-batch ran other modules in backward than an image one (loop.TrainStep)."""
    path, images = _mixed_data(tmp_path)
    common = dict(stage="instruct", lora=True, lora_dropout=0.0, lr=1e-2, projector_lr=1e-2)
    one = train(config(tmp_path / "one", asset_dir, path, images, batch_size=4, max_steps=4, **common))
    run = config(tmp_path / "zero", asset_dir, path, images, batch_size=2, save_every=2, max_steps=4, **common)
    _accelerate(f"deepspeed-zero{stage}", run)
    _check_run(run, stage, one, 4)

    resumed = config(tmp_path / "resumed", asset_dir, path, images, batch_size=2, strategy=f"deepspeed-zero{stage}",
                     max_steps=4, resume=str(Path(run.out) / "checkpoints" / "step-00000002"), **common)  # fmt: skip
    _launch(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port())], resumed
    )  # step 4's loss depends on the restored Adam moments
    assert _losses(Path(resumed.out)) == pytest.approx({3: one["losses"][2], 4: one["losses"][3]}, rel=1e-5)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_one_process_runs_the_engine(tmp_path, asset_dir, stage):
    """One process started without a launcher, --strategy deepspeed-zeroN: the engine still runs (a one-rank
    group, as on one GPU in tests/gpu/test_deepspeed_cuda.py) and gives the bare module's losses and weights."""
    path, images = _mixed_data(tmp_path)
    common = dict(stage="instruct", lora=True, lora_dropout=0.0, lr=1e-2, projector_lr=1e-2, batch_size=4,
                  max_steps=2)  # fmt: skip
    one = train(config(tmp_path / "one", asset_dir, path, images, **common))
    run = config(tmp_path / "zero", asset_dir, path, images, strategy=f"deepspeed-zero{stage}", **common)
    _launch([sys.executable], run)
    _check_run(run, stage, one, 2, world=1)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_packed_two_processes_match_one_process_accumulating(tmp_path, asset_dir, stage):
    """--packing under ZeRO-N: 2 ranks x 1 token-budget micro-batch give the first step of 1 process x 2
    accumulated ones (later steps differ at the epoch's tail by design: tests/train/test_packing.py's DDP test)."""
    path, images = _mixed_data(tmp_path)
    common = dict(stage="instruct", lora=True, lora_dropout=0.0, lr=1e-2, projector_lr=1e-2, max_steps=3,
                  packing=True, max_tokens_per_batch=128, batch_size=1)  # fmt: skip
    one = train(config(tmp_path / "one", asset_dir, path, images, grad_accum=2, **common))
    run = config(tmp_path / "zero", asset_dir, path, images, **common)
    _accelerate(f"deepspeed-zero{stage}", run)
    losses = _losses(Path(run.out))
    assert len(losses) == 3 and losses[1] == pytest.approx(one["losses"][0], rel=1e-5)
