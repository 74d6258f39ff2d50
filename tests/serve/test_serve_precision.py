"""The serving precision: float32 unless asked, and the choice and its reason always logged."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch

from minillava import runtime
from minillava.serve import cli
from minillava.serve.cli import add_commands, choose_dtype, load_for_serving

CPU = torch.device("cpu")


def test_default_dtype_is_float32(tmp_path):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["serve", "--model", str(tmp_path)]).dtype == "float32"


@pytest.mark.parametrize("fast", [True, False])
def test_auto_follows_the_speed_check_and_says_why(monkeypatch, fast):
    monkeypatch.setattr(runtime, "fast_bfloat16", lambda device: fast)
    dtype, why = choose_dtype("auto", CPU)
    assert dtype == (torch.bfloat16 if fast else torch.float32)
    assert why.startswith("--dtype auto") and ("faster" in why)


def test_aliases_and_bad_names():
    assert choose_dtype("bf16", CPU) == (torch.bfloat16, "--dtype bf16")
    assert choose_dtype("float32", CPU)[0] == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        choose_dtype("int3", CPU)
    with pytest.raises(ValueError, match="CUDA"):
        choose_dtype("fp16", CPU)


def test_the_choice_is_logged_with_a_warning_off_float32(serve_dir, caplog, monkeypatch):
    monkeypatch.setattr(runtime, "fast_bfloat16", lambda device: True)
    with caplog.at_level(logging.INFO, logger="minillava.serve"):
        model, _ = load_for_serving(str(serve_dir), "auto", "cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "bfloat16" in warning[0].message and "may get different" in warning[0].message
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="minillava.serve"):
        model, _ = load_for_serving(str(serve_dir), "float32", "cpu")
    assert next(model.parameters()).dtype == torch.float32
    assert [r.levelno for r in caplog.records] == [logging.INFO] and "float32" in caplog.records[0].message


def test_serve_reports_a_bad_dtype_in_one_line(serve_dir, capsys):
    assert cli.main(["serve", "--model", str(serve_dir), "--dtype", "int3"]) == 2
    err = capsys.readouterr().err
    assert "unknown dtype" in err and "Traceback" not in err


def test_quantize_int8_swaps_the_llm_layers_and_says_so(serve_dir, tmp_path, caplog):
    from minillava.quantize import Int8Linear, quantize_dir

    float_model, processor = load_for_serving(str(serve_dir), "float32", "cpu")
    with caplog.at_level(logging.INFO, logger="minillava.serve"):
        model, _ = load_for_serving(str(serve_dir), "float32", "cpu", "int8")
    assert any(isinstance(m, Int8Linear) for m in model.llm.modules())
    assert not any(isinstance(m, Int8Linear) for m in float_model.llm.modules())
    assert any(r.levelno == logging.WARNING and "int8" in r.message for r in caplog.records)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        a, b = float_model.llm(input_ids=ids).logits, model.llm(input_ids=ids).logits
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.05 * a.abs().max().item())
    # a `minillava quantize` directory serves its stored int8 layers without --quantize
    saved = quantize_dir(str(serve_dir), tmp_path / "q8")
    stored, _ = load_for_serving(str(saved), "float32", "cpu")
    layers = [m for m in stored.llm.modules() if isinstance(m, Int8Linear)]
    fresh = [m for m in model.llm.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == len(fresh)
    assert all(torch.equal(x.weight_int8, y.weight_int8) for x, y in zip(layers, fresh, strict=True))
