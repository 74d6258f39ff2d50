"""TrainConfig: every option coerced to its declared type and checked against its range, from a YAML file or code."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minillava.train.cli import add_commands
from minillava.train.config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
BASE = "vision: v\nllm: l\ndata: [a.json]\n"


def _load(tmp_path: Path, body: str) -> TrainConfig:
    path = tmp_path / "cfg.yaml"
    path.write_text(BASE + body)
    return load_config(path)


def test_yaml_values_are_coerced_to_the_declared_types(tmp_path):
    # PyYAML reads 1e-3 (no dot) as a string; the scheduler used to fail on it with a traceback
    cfg = _load(tmp_path, 'lr: 1e-3\nprojector_lr: "2e-5"\nmax_steps: 1e3\nbatch_size: 8.0\nmax_grad_norm: 1\n'
                          "adam_betas: [0.9, '0.95']\nresume: true\nlora_targets: [q_proj]\n")  # fmt: skip
    assert (cfg.lr, cfg.projector_lr, cfg.max_steps, cfg.batch_size) == (0.001, 2e-5, 1000, 8)
    assert type(cfg.max_steps) is int and type(cfg.batch_size) is int and type(cfg.max_grad_norm) is float
    assert cfg.adam_betas == (0.9, 0.95) and cfg.resume == "latest" and cfg.lora_targets == ["q_proj"]
    assert cfg.resolved_lr() == 0.001


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('max_steps: "two"', "max_steps: expected an integer, got 'two'"),
        ("batch_size: 4.5", "batch_size: expected an integer, got 4.5"),
        ("batch_size:", "batch_size: expected an integer, got null"),
        ("max_steps: true", "max_steps: expected an integer, got True"),
        ("lr: fast", "lr: expected a number, got 'fast'"),
        ("lr: .nan", "lr: expected a finite number, got nan"),
        ('truncate: "no"', "truncate: expected true or false, got 'no'"),
        ("lora: 1", "lora: expected true or false, got 1"),
        ("device: 0", "device: expected a string, got 0"),
        ("data: {a: 1}", "data: expected a list, got {'a': 1}"),
        ("adam_betas: [0.9]", "adam_betas: expected a list of 2 values, got [0.9]"),
        ("max_steps: -5", "max_steps must be at least 1, got -5"),
        ("lr: -1e-3", "lr must not be negative, got -0.001"),
        ("warmup_ratio: 1.5", "warmup_ratio must be between 0 and 1, got 1.5"),
        ("warmup_ratio: -0.1", "warmup_ratio must be between 0 and 1, got -0.1"),
        ("epochs: 0", "epochs must be positive, got 0.0"),
        ("lora_dropout: 1", "lora_dropout must be at least 0 and below 1, got 1.0"),
        ("adam_betas: [0.9, 1.0]", "adam_betas must each be at least 0 and below 1, got [0.9, 1.0]"),
        ("num_workers: -1", "num_workers must not be negative, got -1"),
    ],
)  # fmt: skip
def test_bad_yaml_values_are_one_line_errors_naming_file_and_option(tmp_path, body, message):
    with pytest.raises(ValueError) as e:
        _load(tmp_path, body + "\n")
    assert str(e.value) == f"{tmp_path / 'cfg.yaml'}: {message}"


def test_code_built_configs_are_checked_too(tmp_path):
    cfg = TrainConfig(vision="v", llm="l", data=[tmp_path / "a.json"], out=tmp_path / "run", lr="1e-3")
    cfg.validate()
    assert cfg.lr == 0.001 and cfg.out == str(tmp_path / "run") and cfg.data == [str(tmp_path / "a.json")]
    assert cfg.lora_targets == "all-linear"  # `list[str] | str`: a string stays one (not a list of one)
    for bad, message in [({"epochs": 0}, "epochs must be positive"), ({"data_format": "csv"}, "data_format must be"),
                         ({"resume": "latest", "overwrite": True}, "give one of them")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            TrainConfig(vision="v", llm="l", data=["a"], **bad).validate()


def test_train_help_lists_the_no_flags(capsys):
    parser = argparse.ArgumentParser(prog="minillava")
    add_commands(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--no-truncate", "--no-group-by-length", "--no-progress", "--no-plot", "--no-merge-lora",
                 "--overwrite", "--no-overwrite"):  # fmt: skip
        assert flag in text, flag
    args = parser.parse_args(["train", "--no-progress", "--plot", "--overwrite"])
    assert (args.progress, args.plot, args.overwrite, args.truncate) == (False, True, True, None)


def test_cli_bad_config_value_exits_non_zero_with_one_line(tmp_path):
    (tmp_path / "cfg.yaml").write_text(BASE + 'max_steps: "two"\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "minillava", "train", "--config", "cfg.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    line = "minillava train: error: cfg.yaml: max_steps: expected an integer, got 'two'"
    assert proc.stderr.strip().splitlines() == [line]
