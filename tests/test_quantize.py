"""Weight-only int8: the quantized layers against float32, greedy batched == single in int8, save/load, CLI.

Tolerance of a quantized Linear vs float32: per-channel symmetric int8 rounds each weight by at most half its
row's step (max|w_row| / 127 / 2), and the kernel takes bf16 activations (8-bit mantissa), so each output's
error is bounded by sum_k |x_k| * (step_n / 2 + |w_nk| * 2^-8) (plus the output's own bf16 rounding, 2^-8 |y|).
The tests check that bound per element, and a relative error under 2 % overall.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image
from tiny_models import louden

from minillava.cli import main
from minillava.generate import GenerationConfig, Generator, decode
from minillava.quantize import Int8Linear, load, quantize_dir, quantize_model

RED = Image.new("RGB", (40, 30), (200, 10, 10))
BLUE = Image.new("RGB", (30, 40), (10, 10, 200))
IMAGE = "examples/images/chelsea.jpg"


def bound(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    step = w.abs().amax(1) / 127
    per_weight = step[None, :] / 2 + w.abs().T * 2**-8  # (in, out)
    return x.abs() @ per_weight + y.abs() * 2**-8 + 1e-5


# in_features 64 and 48 take torch's int8 kernel; 24 (not a multiple of 16) the dequantizing fallback
@pytest.mark.parametrize("in_features,out_features,bias", [(64, 96, False), (48, 33, True), (24, 10, True)])
def test_int8_linear_matches_float32_within_bound(in_features, out_features, bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_features, out_features, bias=bias)
    q = Int8Linear.from_linear(lin)
    for shape in [(1, in_features), (4, in_features), (2, 3, in_features)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            ref, got = lin(x), q(x)
        assert got.shape == ref.shape and got.dtype == ref.dtype
        lim = bound(x.reshape(-1, in_features), lin.weight.detach(), ref.reshape(-1, out_features))
        err = (got - ref).abs().reshape(-1, out_features)
        assert bool((err <= lim).all()), float((err - lim).max())
        assert float((got - ref).norm() / ref.norm()) < 0.02


def test_int8_weights_are_per_channel_symmetric():
    lin = torch.nn.Linear(32, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(128, dtype=torch.float32).reshape(4, 32) - 60)
    q = Int8Linear.from_linear(lin)
    assert q.weight_int8.dtype == torch.int8
    assert q.weight_int8.abs().amax(1).tolist() == [127] * 4  # each row's largest weight uses the full range
    assert torch.allclose(q.scale, lin.weight.abs().amax(1) / 127)


def test_quantize_model_replaces_every_llm_linear_including_the_lm_head(build_tiny):
    model, _ = build_tiny()
    float_model = copy.deepcopy(model)
    quantize_model(model, "int8")
    assert not [n for n, m in model.llm.named_modules() if type(m) is torch.nn.Linear]
    assert isinstance(model.llm.get_output_embeddings(), Int8Linear)
    assert type(model.llm.get_input_embeddings()) is torch.nn.Embedding  # the gather stays float
    # the vision tower and projector are untouched
    assert [type(m) for m in model.projector.modules()] == [type(m) for m in float_model.projector.modules()]
    quantize_model(model, "int8")  # twice: a no-op
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_model(model, "int3")


def test_quantized_logits_stay_close_to_float32(build_tiny):
    model, p = build_tiny()
    q = quantize_model(copy.deepcopy(model), "int8")
    batch = p.collate([p.prompt("What is in the picture?", [RED])], padding_side="left")
    with torch.inference_mode():
        ref, got = model(**batch).logits, q(**batch).logits
    assert float((got - ref).norm() / ref.norm()) < 0.05


def raw_tokens(gen, samples, cfg, static_cache=None):
    batch = gen.processor.collate(samples, padding_side="left")
    steps = decode(gen.model, batch, cfg, stop_ids=[], pad_id=gen.processor.pad_token_id, static_cache=static_cache)
    return torch.stack([t for t, _ in steps], 1)


@pytest.mark.parametrize("llm", ["llama", "opt"])  # opt: a 24-wide projection, the fallback path
def test_int8_greedy_batched_equals_batch_of_one(build_tiny, llm):
    model, p = build_tiny(llm=llm)
    louden(model)
    quantize_model(model, "int8")
    gen = Generator(model, p)
    samples = [
        p.prompt("What is in the picture? describe it in detail", [RED]),
        p.prompt("hi", [BLUE]),
        p.prompt("no image here, just text"),
    ]
    cfg = GenerationConfig(max_new_tokens=10)
    batched = raw_tokens(gen, samples, cfg)
    rows = [tuple(r) for r in batched.tolist()]
    assert len(set(rows)) == len(rows) and all(len(set(r)) > 1 for r in rows), rows  # varied: a mix-up shows
    for i, s in enumerate(samples):
        assert torch.equal(raw_tokens(gen, [s], cfg)[0], batched[i]), f"row {i}"
    if llm == "llama":  # the static-cache decode too
        assert torch.equal(raw_tokens(gen, samples, cfg, static_cache=True), batched)


def test_saved_quantized_dir_loads_int8_without_requantizing(build_tiny, tmp_path):
    model, p = build_tiny()
    louden(model)
    src = tmp_path / "float"
    model.save_pretrained(src, p)
    out = quantize_dir(str(src), tmp_path / "int8")
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["scheme"] == "int8" and "lm_head" in meta["layers"]
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # safetensors only
    loaded, lp = load(str(out), "float32", "cpu")
    assert isinstance(loaded.llm.get_output_embeddings(), Int8Linear)
    fresh = quantize_model(copy.deepcopy(model), "int8")
    for (n, a), (_, b) in zip(fresh.llm.named_buffers(), loaded.llm.named_buffers(), strict=True):
        assert torch.equal(a, b), n
    cfg = GenerationConfig(max_new_tokens=8)
    samples = [p.prompt("What is this?", [RED])]
    assert torch.equal(raw_tokens(Generator(loaded, lp), samples, cfg), raw_tokens(Generator(fresh, p), samples, cfg))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_dir(str(out), tmp_path / "again")
    with pytest.raises(ValueError, match="not empty"):
        quantize_dir(str(src), out)


def test_cli_quantize_then_generate(build_tiny, tmp_path, capsys):
    model, p = build_tiny()
    louden(model)
    src, out = tmp_path / "float", tmp_path / "int8"
    model.save_pretrained(src, p)
    assert main(["quantize", "--model", str(src), "--out", str(out)]) == 0
    capsys.readouterr()
    ask = ["--image", IMAGE, "--prompt", "What is this?", "--max-new-tokens", "6", "--dtype", "float32"]
    assert main(["generate", "--model", str(out), *ask]) == 0
    saved = capsys.readouterr().out
    assert main(["generate", "--model", str(src), "--quantize", "int8", *ask]) == 0
    assert capsys.readouterr().out == saved  # quantized on load == loaded quantized
    assert main(["quantize", "--model", str(src), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(src), "--quantize", "int3", *ask])
