"""Device checks on a CUDA GPU, run by `bash benchmarks/gpu_check.sh`; collected everywhere, skipped without CUDA.

Tiny random models: CUDA forward and greedy generation equal the CPU's; the CUDA-graph decode equals the eager
one; bf16 autocast and fp16 + GradScaler
training lower the loss; QLoRA (bitsandbytes 4-bit) trains and exports a loadable model; the feature cache
hits on CUDA and changes nothing.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import louden

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from train_helpers import config, write_images, write_llava  # noqa: E402

from minillava import generate as generate_module  # noqa: E402
from minillava.generate import GenerationConfig, decode  # noqa: E402
from minillava.model import MiniLlava  # noqa: E402
from minillava.train.loop import train  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="device check: needs a CUDA GPU (bash benchmarks/gpu_check.sh)"
)
DEVICE = "cuda"
RED = Image.new("RGB", (40, 30), (200, 10, 10))
BLUE = Image.new("RGB", (30, 40), (10, 10, 200))


@pytest.fixture
def no_tf32():
    """Float32 on the GPU as on the CPU: TF32 matmuls/convolutions would round to 10-bit mantissas."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture
def data(tmp_path):
    names = write_images(tmp_path / "images")
    return write_llava(tmp_path / "d.json", names), tmp_path / "images"


def _on(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _greedy(model: MiniLlava, batch: dict, pad_id: int, cuda_graphs=None, static_cache=None) -> torch.Tensor:
    cfg = GenerationConfig(max_new_tokens=12, cuda_graphs=cuda_graphs)
    steps = decode(model, batch, cfg, stop_ids=[], pad_id=pad_id, static_cache=static_cache)
    return torch.stack([t.cpu() for t, _ in steps], 1)


def test_forward_and_greedy_generation_match_the_cpu(build_tiny, no_tf32):
    model, processor = build_tiny()
    louden(model)  # answers that depend on the prompt and image
    samples = [processor.prompt("What is in the picture?", [RED]), processor.prompt("hi", [BLUE]),
               processor.prompt("no image here")]  # fmt: skip
    batch = processor.collate(samples, padding_side="left")
    cuda = copy.deepcopy(model).to(DEVICE)
    with torch.no_grad():
        ref, got = model(**batch).logits, cuda(**_on(batch, DEVICE)).logits
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(_greedy(cuda, batch, processor.pad_token_id), _greedy(model, batch, processor.pad_token_id))


class CountingGraph(torch.cuda.CUDAGraph):
    replays = 0

    def replay(self):
        CountingGraph.replays += 1
        super().replay()


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager_decode(build_tiny, no_tf32, monkeypatch, rows, dtype):
    model, processor = build_tiny()
    louden(model)
    model = model.to(DEVICE, dtype)
    samples = [processor.prompt("What is in the picture? describe it", [RED]), processor.prompt("hi", [BLUE]),
               processor.prompt("no image"), processor.prompt("<image> vs <image>", [RED, BLUE])]  # fmt: skip
    batch = processor.collate(samples[:rows], padding_side="left")  # left-padded rows of different lengths
    monkeypatch.setattr(torch.cuda, "CUDAGraph", CountingGraph)
    CountingGraph.replays = 0
    graphed = _greedy(model, batch, processor.pad_token_id)  # auto: graphs on CUDA
    assert CountingGraph.replays == 12 - 1 - generate_module.StaticStep.WARMUP  # the steps after the warm-up
    static_eager = _greedy(model, batch, processor.pad_token_id, cuda_graphs=False, static_cache=True)
    assert torch.equal(graphed, static_eager)  # the very same kernels, replayed
    if dtype == torch.float32:  # other attention lengths: equal tokens, not equal bits, so float32 only
        assert torch.equal(graphed, _greedy(model, batch, processor.pad_token_id, cuda_graphs=False))
    if rows > 1:
        assert len({tuple(r) for r in graphed.tolist()}) > 1  # rows answer differently: the check can fail


@pytest.mark.parametrize("precision", ["bf16", "fp16"])  # fp16: autocast + GradScaler
def test_mixed_precision_training_lowers_the_loss(tmp_path, asset_dir, data, precision):
    s = train(config(tmp_path, asset_dir, *data, stage="instruct", lr=1e-2, max_steps=16, device=DEVICE,
                     precision=precision))  # fmt: skip
    assert all(math.isfinite(x) for x in s["losses"])
    assert s["losses"][-1] < 0.7 * s["losses"][0], s["losses"]
    MiniLlava.from_pretrained(s["model"])  # the export left the GPU behind


def test_qlora_trains_and_exports_a_loadable_model(tmp_path, asset_dir, data):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (carry its wheel in .whl/)")
    s = train(config(tmp_path, asset_dir, *data, stage="instruct", qlora=True, lr=1e-2, projector_lr=1e-2,
                     max_steps=10, device=DEVICE, precision="bf16"))  # fmt: skip
    assert all(math.isfinite(x) for x in s["losses"]) and s["losses"][-1] < s["losses"][0], s["losses"]
    model, processor = MiniLlava.from_pretrained(s["model"])  # LoRA merged into the dequantized base
    assert all(type(m).__name__ != "Linear4bit" for m in model.modules())
    batch = processor.collate([processor.prompt("What is in the picture?", [RED])], padding_side="left")
    assert _greedy(model, batch, processor.pad_token_id).shape == (1, 12)


def test_feature_cache_on_cuda(tmp_path, asset_dir, data):
    common = dict(stage="align", lr=1e-3, max_steps=2, device=DEVICE)  # 1 step per epoch: 2 epochs
    plain = train(config(tmp_path / "nocache", asset_dir, *data, **common))
    first = train(config(tmp_path / "a", asset_dir, *data, feature_cache=str(tmp_path / "fc"), **common))
    second = train(config(tmp_path / "b", asset_dir, *data, feature_cache=str(tmp_path / "fc"), **common))
    assert first["feature_cache"] == {"hits": 4, "misses": 4}  # epoch 1 computes, epoch 2 reads
    assert second["feature_cache"] == {"hits": 8, "misses": 0}  # a later run reads them all
    for run in (first, second):
        assert run["losses"] == pytest.approx(plain["losses"], rel=1e-5)
