"""benchmarks/retention_drift.py: zero drift from a model to itself, and drift once the LLM's weights move."""

import copy
import json
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def drift(import_benchmark):
    return import_benchmark("retention_drift")


def run(drift, monkeypatch, capsys, *argv: str) -> dict:
    monkeypatch.setattr(sys, "argv", ["retention_drift.py", *argv])
    assert drift.main() == 0
    return json.loads(capsys.readouterr().out)


def test_drift_is_zero_to_itself_and_grows_with_the_weights(drift, tiny, tmp_path, monkeypatch, capsys):
    model, processor = tiny
    model.save_pretrained(tmp_path / "base", processor)
    moved = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in moved.llm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    moved.save_pretrained(tmp_path / "tuned", processor)

    same = run(drift, monkeypatch, capsys, "--model", str(tmp_path / "base"), "--base", str(tmp_path / "base"))
    assert same["n"] == len(drift.CHECKS["validation"]) and same["mean_kl"] == 0 and same["first_token_flips"] == 0
    changed = run(drift, monkeypatch, capsys, "--model", str(tmp_path / "tuned"), "--base", str(tmp_path / "base"),
                  "--check", "test")  # fmt: skip
    assert changed["n"] == len(drift.CHECKS["test"]) and changed["mean_kl"] > 0.001
    assert all(r["base_answer"] is not None for r in changed["prompts"])


def test_a_model_directory_that_does_not_load_is_a_one_line_error(drift, tiny, tmp_path, monkeypatch, capsys):
    tiny[0].save_pretrained(tmp_path / "base", tiny[1])
    monkeypatch.setattr(sys, "argv", ["retention_drift.py", "--model", str(tmp_path / "none"), "--base",
                                      str(tmp_path / "base")])  # fmt: skip
    assert drift.main() == 2
    err = capsys.readouterr().err  # the base's loading progress comes first
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("retention_drift.py: error:") and str(tmp_path / "none") in last
