"""DeepSpeed on one CUDA GPU, run by `bash benchmarks/gpu_check.sh` (step `deepspeed`); collected everywhere,
skipped without CUDA or without DeepSpeed (on the device machine: its wheel and its missing requirements in .whl/).

`accelerate launch --num_processes 1 --config_file configs/accelerate/deepspeed-zeroN.yaml` runs `minillava train`
through the DeepSpeed engine (ZeRO-2 / ZeRO-3 over a one-rank NCCL group, bf16 autocast over float32 master
weights) on a tiny random model with LoRA: the per-step losses of the same run without DeepSpeed (to bf16's
precision), and an exported model that loads and runs. The 2-process comparison is on CPU
(tests/train/test_distributed_deepspeed.py): one GPU cannot hold two NCCL ranks.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from test_distributed import ACCELERATE, ROOT, _cli_args, _losses, _mixed_data, _port  # noqa: E402
from train_helpers import config  # noqa: E402

from minillava.model import MiniLlava  # noqa: E402
from minillava.train.loop import train  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="device check: needs a CUDA GPU (bash benchmarks/gpu_check.sh)"),
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                       reason="DeepSpeed is not installed (carry its wheel in .whl/, see benchmarks/gpu_check.sh)"),
]  # fmt: skip
STEPS = 4
COMMON = dict(stage="instruct", lora=True, lora_dropout=0.0, lr=1e-2, projector_lr=1e-2, batch_size=4,
              max_steps=STEPS, device="cuda", precision="bf16")  # fmt: skip


def _env() -> dict[str, str]:
    """The launched processes find this checkout first, then DeepSpeed where this process found it (gpu_check.sh
    installs the carried wheels into /tmp/site, on PYTHONPATH)."""
    site = str(Path(importlib.util.find_spec("deepspeed").origin).parents[1])
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", ""), site) if p)
    return {**os.environ, "PYTHONPATH": path, "DS_ACCELERATOR": "cuda", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, asset_dir):
    """The same run without DeepSpeed, in this process: (summary, data file, image dir, tmp dir)."""
    tmp = tmp_path_factory.mktemp("deepspeed-cuda")
    path, images = _mixed_data(tmp)
    return train(config(tmp / "plain", asset_dir, path, images, **COMMON)), path, images, tmp


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_on_one_gpu_matches_the_plain_run(asset_dir, reference, stage):
    plain, path, images, tmp = reference
    assert all(math.isfinite(x) for x in plain["losses"]) and plain["losses"][-1] < plain["losses"][0]
    run = config(tmp / f"zero{stage}", asset_dir, path, images, **COMMON)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ACCELERATE / f"deepspeed-zero{stage}.yaml"), "--num_processes", "1", "--main_process_port",
           str(_port()), "-m", "minillava.train.cli", *_cli_args(run)]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, timeout=150, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr.decode()[-4000:]

    out = Path(run.out)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert records[0]["strategy"] == f"deepspeed-zero{stage}" and records[0]["world_size"] == 1  # the engine ran
    assert all(r["grad_norm"] > 0 for r in records if r["event"] == "step")
    got = _losses(out)
    # bf16 autocast: the same kernels, but the engine's flat fp32 buffers sum and clip in another order
    assert got == pytest.approx(dict(enumerate(plain["losses"], 1)), rel=2e-2), f"ZeRO-{stage}"
    assert got[STEPS] < got[1]  # it trains

    for part in ("projector.safetensors", "llm/model.safetensors"):  # the whole (ZeRO-3: gathered) weights
        a, b = load_file(Path(plain["model"]) / part), load_file(out / "model" / part)
        assert a.keys() == b.keys()
        for k in a:  # an Adam step moves each weight by ~lr: a few steps of bf16 noise stay well inside 0.1
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0.1, msg=f"ZeRO-{stage} {part}: {k}")
    model, processor = MiniLlava.from_pretrained(out / "model")
    batch = processor.collate([processor.prompt("What is in the picture?", [Image.new("RGB", (32, 32), "red")])])
    with torch.no_grad():
        logits = model.to("cuda")(**{k: v.to("cuda") if torch.is_tensor(v) else v for k, v in batch.items()}).logits
    assert torch.isfinite(logits).all()
