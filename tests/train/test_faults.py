"""Training faults: corrupt checkpoints on resume, exploded weights, and a run that collapses without a NaN."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from train_helpers import config, write_images, write_llava

from minillava.train import checkpoint as ckpt
from minillava.train import strategy
from minillava.train.loop import train


@pytest.fixture
def data(tmp_path):
    names = write_images(tmp_path / "images")
    return write_llava(tmp_path / "d.json", names), tmp_path / "images"


def _three_checkpoints(out) -> list:
    return [ckpt.save_checkpoint(out, s, {"w": torch.full((4,), float(s))}, {"step": s}, {}, keep_last=5)
            for s in (1, 2, 3)]  # fmt: skip


def test_latest_falls_back_past_a_corrupt_checkpoint(tmp_path):
    p1, p2, p3 = _three_checkpoints(tmp_path)
    (p3 / ckpt.WEIGHTS).write_bytes((p3 / ckpt.WEIGHTS).read_bytes()[:20])  # truncated: a full disk
    (p2 / ckpt.CONFIG).write_text("{not json")
    warnings: list[str] = []
    path, weights, state = ckpt.load_resume(tmp_path, "latest", warnings.append)
    assert path == p1 and state["step"] == 1 and weights["w"][0] == 1
    assert len(warnings) == 2 and str(p3) in warnings[0] and str(p2) in warnings[1]
    assert "JSONDecodeError" in warnings[1]


def test_no_loadable_checkpoint_names_out_and_each_reason(tmp_path):
    for p in _three_checkpoints(tmp_path):
        (p / ckpt.STATE).write_bytes(b"garbage")
    with pytest.raises(OSError) as e:
        ckpt.load_resume(tmp_path, "latest", lambda _: None)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg
    assert all(f"step-0000000{s}" in msg for s in (1, 2, 3))


def test_explicit_corrupt_checkpoint_is_an_error_without_fallback(tmp_path):
    _, _, p3 = _three_checkpoints(tmp_path)
    (p3 / ckpt.WEIGHTS).write_bytes(b"\x00" * 3)
    with pytest.raises(OSError, match="cannot resume from this checkpoint") as e:
        ckpt.load_resume(tmp_path, str(p3), lambda _: None)
    assert str(p3) in str(e.value) and "\n" not in str(e.value)


def test_exploded_weights_are_never_saved_nor_named_good(tmp_path, asset_dir, data, monkeypatch, caplog):
    # the weights turn NaN right before the step-2 checkpoint: it must be refused, and the NaN loss at step 3
    # must name step 1, the newest checkpoint with finite weights
    calls = {"n": 0}
    original = strategy.DDPStrategy.trainable_state

    def exploding(self, model):
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(math.nan)
        return original(self, model)

    monkeypatch.setattr(strategy.DDPStrategy, "trainable_state", exploding)
    cfg = config(tmp_path, asset_dir, *data, stage="align", lr=1e-3, max_steps=4, save_every=1, keep_last=5)
    with pytest.raises(FloatingPointError, match="at step 3") as e:
        train(cfg)
    out = tmp_path / "run"
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000001"]
    assert str(out / "checkpoints" / "step-00000001") in str(e.value)
    assert "step 2: trainable weights are not all finite; checkpoint not saved" in caplog.text


def test_a_collapse_keeps_the_last_checkpoint_proven_good_and_sets_the_rest_aside(tmp_path, asset_dir, data,
                                                                                   monkeypatch):
    """Gradients die from step 4 (simulated): the checkpoint after step 3 already holds the weights that died, and
    keep_last=2 would rotate away every checkpoint from before. The one proven by a live step after it (step 2)
    is kept, named, and is what --resume picks; those saved during the collapse are renamed, not deleted."""
    from minillava.train import loop

    real = loop.optimizer_step
    monkeypatch.setattr(loop, "optimizer_step",
                        lambda s: real(s) if s.trainee.state["step"] < 3 else 0.0)  # fmt: skip
    cfg = config(tmp_path, asset_dir, *data, stage="align", lr=1e-3, max_steps=30, save_every=1, keep_last=2,
                 collapse_steps=3)  # fmt: skip
    with pytest.raises(FloatingPointError, match="training collapsed at step 6") as e:
        train(cfg)
    out = tmp_path / "run"
    good = out / "checkpoints" / "step-00000002"
    assert f"the last good checkpoint is {good}" in str(e.value)
    assert ckpt.list_checkpoints(out) == [good] and ckpt.latest_checkpoint(out) == good
    aside = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("diverged-"))
    assert aside == ["diverged-step-00000004", "diverged-step-00000005"]  # step 3's was rotated away


def test_a_healthy_run_keeps_keep_last_checkpoints(tmp_path, asset_dir, data):
    cfg = config(tmp_path, asset_dir, *data, stage="align", lr=1e-3, max_steps=4, save_every=1, keep_last=1)
    train(cfg)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step-00000004"]


def test_collapse_check_counts_consecutive_dead_steps():
    from minillava.train.loop import collapse_check

    run = 0
    for step, norm in enumerate([0.0, 0.0, 1.0, 0.0, 1e-9], 1):
        run = collapse_check(3, run, norm, 1.0, step, 10.0)
    assert run == 2
    with pytest.raises(FloatingPointError, match=r"training collapsed at step 6: gradient norm 0 for 3 steps"):
        collapse_check(3, run, 1e-9, 1.0, 6, 10.0)  # 1e-9 of the peak: dead too
    assert collapse_check(0, 99, 0.0, 1.0, 1, 1.0) == 0  # 0 disables
    with pytest.raises(FloatingPointError, match="gradient norm not finite for 1 steps"):
        collapse_check(1, 0, math.inf, 1.0, 1, 1.0)


def test_collapsed_run_stops_with_an_error(tmp_path, asset_dir, data):
    cfg = config(tmp_path, asset_dir, *data, stage="align", lr=1e6, max_steps=30)
    with pytest.raises(FloatingPointError, match=r"training collapsed at step 6: gradient norm 0 for 5 steps"):
        train(cfg)


@pytest.mark.parametrize("which", ["latest", "explicit"])
def test_cli_corrupt_resume_is_a_one_line_error(tmp_path, asset_dir, data, capsys, which):
    from minillava.cli import main

    out = tmp_path / "run"
    for p in _three_checkpoints(out):
        (p / ckpt.WEIGHTS).write_bytes(b"\x00" * 3)
    target = out / "checkpoints" / "step-00000002"
    resume = ["--resume"] if which == "latest" else ["--resume", str(target)]
    argv = ["train", "--vision", str(asset_dir("vision", "clip")), "--llm", str(asset_dir("llm", "llama")),
            "--data", str(data[0]), "--image-root", str(data[1]), "--out", str(out), "--stage", "align",
            "--num-workers", "0", "--precision", "fp32", "--no-progress", "--no-plot", *resume]  # fmt: skip
    logger = logging.getLogger("minillava")
    handlers, level = list(logger.handlers), logger.level
    try:
        assert main(argv) == 1
    finally:  # the CLI points a handler at capsys's stderr, which closes after this test
        logger.handlers[:], logger.level = handlers, level
    err = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert len(err) == 1 and "Traceback" not in err[0]
    if which == "latest":
        assert f"{out}: no checkpoint could be loaded" in err[0] and "step-00000001: " in err[0]
    else:
        assert f"{target}: cannot resume from this checkpoint" in err[0]


def test_resume_with_settings_that_draw_other_batches_is_refused(tmp_path):
    saved = {"data": ["a.json"], "batch_size": 4, "grad_accum": 1, "seed": 0, "lr": 1e-3}
    ckpt.save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {"step": 1}, saved, keep_last=2)
    # the learning rate may change on a resume; the batch size and the data may not
    assert ckpt.load_resume(tmp_path, "latest", lambda _: None, saved | {"lr": 1e-4}) is not None
    with pytest.raises(ValueError, match=r"batch_size 4 -> 8") as e:
        ckpt.load_resume(tmp_path, "latest", lambda _: None, saved | {"batch_size": 8})
    assert "step-00000001" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"data \['a.json'\] -> \['b.json'\]"):
        ckpt.load_resume(tmp_path, "latest", lambda _: None, saved | {"data": ["b.json"]})


def test_a_full_disk_while_checkpointing_leaves_the_previous_checkpoint_and_no_partial_one(tmp_path, monkeypatch):
    import errno

    first = ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {"step": 1}, {}, keep_last=2)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(OSError, match="No space left on device") as e:
        ckpt.save_checkpoint(tmp_path, 2, {"w": torch.ones(2)}, {"step": 2}, {}, keep_last=2)
    msg = str(e.value)
    assert "step-00000002" in msg and str(first) in msg and "\n" not in msg
    assert ckpt.list_checkpoints(tmp_path) == [first]
    assert not [p for p in ckpt.checkpoint_root(tmp_path).iterdir() if p.name.startswith(".tmp")]


def test_a_real_resume_with_another_batch_size_is_refused_unless_asked(tmp_path, asset_dir, data):
    path, images = data
    train(config(tmp_path, asset_dir, path, images, max_steps=2, save_every=1, batch_size=2, halt_at_step=1))
    with pytest.raises(ValueError, match="batch_size 2 -> 3"):
        train(config(tmp_path, asset_dir, path, images, max_steps=2, batch_size=3, resume="latest"))
    summary = train(config(tmp_path, asset_dir, path, images, max_steps=2, batch_size=3, resume="latest",
                           resume_changed=True))  # fmt: skip
    assert summary["steps"] == 2
