"""Checkpoints: atomic, keep-last-K, exact resume, SIGKILL mid-run, 2-process DDP equivalence."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import config, write_images, write_llava

from minillava.train import checkpoint as ckpt
from minillava.train.loop import train


@pytest.fixture
def data(tmp_path):
    names = write_images(tmp_path / "images")
    return write_llava(tmp_path / "d.json", names), tmp_path / "images"


@pytest.mark.parametrize("workers", [0, 1], ids=["main-process", "persistent-worker"])
def test_resume_gives_the_same_losses_exactly(tmp_path, asset_dir, data, workers):
    # LoRA dropout > 0 consumes RNG every step; 5 samples / batch 2 crosses epoch boundaries; cosine schedule;
    # a worker outlives epochs, and the resumed run starts mid-epoch (step 5 of 3 per epoch)
    common = dict(stage="instruct", lora=True, lora_dropout=0.1, lr=1e-3, projector_lr=1e-3, batch_size=2,
                  max_steps=7, scheduler="cosine", warmup_ratio=0.2, num_workers=workers)  # fmt: skip
    full = train(config(tmp_path / "a", asset_dir, *data, **common))
    halted = train(config(tmp_path / "b", asset_dir, *data, save_every=2, keep_last=2, halt_at_step=5, **common))
    assert halted["halted"] and halted["losses"] == full["losses"][:5]
    kept = [p.name for p in ckpt.list_checkpoints(tmp_path / "b" / "run")]
    assert kept == ["step-00000002", "step-00000004"]  # keep_last=2 of 2, 4
    resumed = train(config(tmp_path / "b", asset_dir, *data, resume="latest", **common))
    assert resumed["losses"] == full["losses"][4:]  # exact, float32 CPU
    steps = [json.loads(x) for x in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["event"] == "step"] == list(range(1, 8))  # step 5 redone once


def test_partial_checkpoints_are_never_picked_up(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-00000009-abc").mkdir(parents=True)
    (root / "step-00000008").mkdir()  # no state: incomplete
    good = ckpt.save_checkpoint(tmp_path, 3, {}, {"step": 3}, {}, keep_last=3)
    assert ckpt.latest_checkpoint(tmp_path) == good
    ckpt.clean_partial(tmp_path)
    assert not (root / ".tmp-step-00000009-abc").exists()


def test_resume_from_missing_dir_is_an_error(tmp_path):
    with pytest.raises(OSError, match="no such checkpoint"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "nope"))


def _train_cmd(cfg) -> list[str]:
    args = [sys.executable, "-m", "minillava.train.cli", "train", "--vision", cfg.vision, "--llm", cfg.llm,
            "--data", *cfg.data, "--image-root", cfg.image_root, "--out", cfg.out, "--stage", cfg.stage,
            "--batch-size", str(cfg.batch_size), "--num-workers", "0", "--precision", "fp32", "--no-progress",
            "--no-plot", "--scheduler", "constant", "--warmup-ratio", "0", "--lr", str(cfg.lr)]  # fmt: skip
    if cfg.max_steps:
        args += ["--max-steps", str(cfg.max_steps)]
    if cfg.save_every:
        args += ["--save-every", str(cfg.save_every)]
    return args


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}


def _losses(run: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in recs if r["event"] == "step"}


def test_sigkill_mid_run_then_resume(tmp_path, asset_dir, data):
    cfg = config(tmp_path, asset_dir, *data, stage="align", lr=1e-3, batch_size=2, max_steps=2000, save_every=5)
    proc = subprocess.Popen(_train_cmd(cfg), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run = Path(cfg.out)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        latest = ckpt.latest_checkpoint(run)
        if latest is not None and int(latest.name[5:]) >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = _losses(run)
    last = ckpt.latest_checkpoint(run)
    saved_step = int(last.name[5:])
    assert saved_step >= 10 and max(killed) >= saved_step
    cfg.resume, cfg.halt_at_step = "latest", saved_step + 3
    resumed = train(cfg)
    assert resumed["steps"] == saved_step + 3
    redone = _losses(run)
    # lost at most the steps after the checkpoint; redone steps give the killed run's losses
    for step in range(saved_step + 1, min(max(killed), saved_step + 3) + 1):
        assert redone[step] == pytest.approx(killed[step], rel=1e-6, abs=1e-7)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process(tmp_path, asset_dir, data):
    """Same global batch (1 x 4 vs 2 ranks x 2); one global batch mixes images and text-only samples, so
    one rank gets only text (the projector still joins the backward: no hang)."""
    path, images = data
    rows = json.loads(path.read_text())
    img = [r for r in rows if "image" in r]
    extra = [{**r, "id": r["id"] + "-b"} for r in img[:2]]
    text = [r for r in rows if "image" not in r]
    path.write_text(json.dumps(img + extra + text + [{**text[0], "id": "text-2"}]))  # 6 image + 2 text samples
    common = dict(stage="instruct", lr=1e-3, max_steps=2)
    one = train(config(tmp_path / "one", asset_dir, path, images, batch_size=4, **common))
    ddp = config(tmp_path / "two", asset_dir, path, images, batch_size=2, **common)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "minillava.train.cli", *_train_cmd(ddp)[3:]]  # fmt: skip
    two = subprocess.run(cmd, env=_env(), capture_output=True, timeout=240)
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    b = _losses(Path(ddp.out))
    assert sorted(b) == [1, 2]
    for step, loss in enumerate(one["losses"], 1):
        assert b[step] == pytest.approx(loss, rel=1e-5)
