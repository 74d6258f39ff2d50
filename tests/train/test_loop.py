"""The training loop's run directory (a fresh run never mixes with an earlier one) and wholly skipped batches."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from train_helpers import add_ghost, config, write_images, write_llava

from minillava.cli import main
from minillava.train import checkpoint as ckpt
from minillava.train.kernels import MATH_ATTENTION_MAX_TOKENS, attention_kernel
from minillava.train.loop import train


def _events(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_batch_whose_samples_were_all_skipped_is_no_update(tmp_path, asset_dir):
    names = write_images(tmp_path / "images")
    data = write_llava(tmp_path / "d.json", names)
    rows = add_ghost(data)
    # one sample a batch: the ghost's batch is empty after skipping (it used to stop the run with "loss is nan")
    cfg = config(tmp_path, asset_dir, data, tmp_path / "images", stage="instruct", lr=1e-3, batch_size=1,
                 max_steps=len(rows), on_bad_sample="skip", group_by_length=False)  # fmt: skip
    summary = train(cfg)
    assert summary["steps"] == len(rows) and summary["skipped"] == 1 and summary["skipped_steps"] == 1
    assert len(summary["losses"]) == len(rows) - 1 and all(loss == loss for loss in summary["losses"])
    events = _events(tmp_path / "run")
    skipped = [e for e in events if e["event"] == "skipped_step"]
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert len(skipped) == 1 and sorted(steps + [skipped[0]["step"]]) == list(range(1, len(rows) + 1))
    assert (tmp_path / "run" / "model").is_dir()


def test_a_fresh_run_into_an_earlier_runs_out_is_refused_unless_overwrite(tmp_path, asset_dir):
    names = write_images(tmp_path / "images")
    data = write_llava(tmp_path / "d.json", names)
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")  # not a run's record: no reason to refuse
    common = dict(stage="instruct", lr=1e-3, batch_size=5, keep_last=5)
    train(config(tmp_path, asset_dir, data, tmp_path / "images", max_steps=3, save_every=1, **common))
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000001", "step-00000002", "step-00000003"]

    again = config(tmp_path, asset_dir, data, tmp_path / "images", max_steps=1, **common)
    refused = r"holds an earlier run \(checkpoints, model, metrics\.jsonl.*--overwrite"
    with pytest.raises(FileExistsError, match=refused):
        train(again)
    assert len(ckpt.list_checkpoints(run)) == 3  # refused before touching anything

    again.overwrite = True
    summary = train(again)
    assert summary["steps"] == 1 and [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000001"]
    assert [e["event"] for e in _events(run)].count("start") == 1
    assert json.loads((run / "summary.json").read_text())["steps"] == 1
    assert (run / "notes.txt").read_text() == "mine"


@pytest.fixture
def cli_logging():
    """`minillava train` adds a handler on this test's captured stderr: later tests must not write to it closed."""
    logger = logging.getLogger("minillava")
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


def test_cli_refuses_an_earlier_runs_out_in_one_line(tmp_path, capsys, cli_logging):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    args = ["train", "--vision", "v", "--llm", "l", "--data", "d.json", "--out", str(tmp_path / "run")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"minillava train: error: {tmp_path / 'run'}: holds an earlier run (metrics.jsonl); give "
                          "--resume to continue it, --overwrite to replace it")  # fmt: skip


def test_cpu_training_attention_on_short_rows_runs_on_the_math_kernel_and_the_choice_is_undone_after():
    def flags() -> tuple[bool, bool, bool]:
        return (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
                torch.backends.cuda.math_sdp_enabled())  # fmt: skip

    before = flags()
    with attention_kernel(torch.device("cpu"), MATH_ATTENTION_MAX_TOKENS):
        assert flags() == (False, False, True)
    assert flags() == before
    with attention_kernel(torch.device("cpu"), MATH_ATTENTION_MAX_TOKENS + 1):  # long rows: flash is faster there
        assert flags() == before
    with attention_kernel(torch.device("cuda"), 16):  # other devices keep SDPA's own choice (nothing runs here)
        assert flags() == before
