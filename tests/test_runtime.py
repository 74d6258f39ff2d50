"""Precision choice ("auto": bf16 only where it is faster) and regional compilation of the LLM's layers."""

from __future__ import annotations

import pytest
import torch

from minillava import runtime


@pytest.fixture
def cpu(monkeypatch):
    """Pretend CPU: set (bf16 instructions, AMX tiles, bf16 seconds, float32 seconds), then ask fast_bfloat16."""

    def ask(bf16_isa: bool, amx: bool, seconds: dict | None = None) -> bool:
        def timed(dtype, **_):
            if seconds is None:
                raise AssertionError("measured where the flags already decide")
            return seconds[dtype]

        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: bf16_isa)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(runtime, "_matmul_seconds", timed)
        runtime._cpu_bf16_pays.cache_clear()
        try:
            return runtime.fast_bfloat16("cpu")
        finally:
            runtime._cpu_bf16_pays.cache_clear()

    return ask


def test_bf16_is_picked_only_where_it_is_faster(cpu):
    assert cpu(bf16_isa=False, amx=False) is False  # AVX2: emulated bf16, not even measured
    assert cpu(bf16_isa=True, amx=True) is True  # AMX tiles
    # AVX-512 BF16 without AMX: measured; this machine's Xeon gave 1.8 ms bf16 against 1.0 ms float32
    assert cpu(True, False, {torch.bfloat16: 1.8e-3, torch.float32: 1.0e-3}) is False
    assert cpu(True, False, {torch.bfloat16: 1.1e-3, torch.float32: 1.2e-3}) is False  # < 20 % faster
    assert cpu(True, False, {torch.bfloat16: 0.5e-3, torch.float32: 1.0e-3}) is True


def test_auto_dtype_follows_the_measurement(monkeypatch):
    monkeypatch.setattr(runtime, "fast_bfloat16", lambda device="cpu": False)
    assert runtime.parse_dtype("auto") == torch.float32
    monkeypatch.setattr(runtime, "fast_bfloat16", lambda device="cpu": True)
    assert runtime.parse_dtype("auto") == torch.bfloat16


def test_compile_decoder_layers_needs_a_layer_list(tiny):
    with pytest.raises(ValueError, match="no decoder layer list"):
        runtime.compile_decoder_layers(tiny[0].projector)


def test_the_measurement_leaves_the_callers_random_stream_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    runtime._matmul_seconds(torch.float32, n=64, reps=1)
    assert torch.equal(torch.rand(3), expected)
