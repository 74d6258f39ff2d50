"""Shared pieces of the benchmarks: the bench shapes (../shared/BENCHMARK.md), timing (CUDA-synchronised on a
GPU), the machine's matmul peak, memory, JSON output."""

from __future__ import annotations

import json
import os
import platform
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from minillava.runtime import fast_bfloat16

IMAGE_TOKENS = 196  # CLIP ViT-B/16 at 224 px, CLS dropped
VOCAB = 49_152
IMAGE_TOKEN_ID = VOCAB  # one past the text vocabulary, as when `<image>` is added to a tokenizer


def bench_llava_config() -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=16)  # fmt: skip
    text = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=VOCAB + 1, tie_word_embeddings=True,
                       max_position_embeddings=2048, rope_theta=100_000.0)  # fmt: skip
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", tie_word_embeddings=True)  # fmt: skip


def build_peer_and_dir(workdir: Path, seed: int = 0) -> tuple[LlavaForConditionalGeneration, Path]:
    """The peer with random weights, saved so minillava can import the very same weights."""
    torch.manual_seed(seed)
    peer = LlavaForConditionalGeneration(bench_llava_config()).eval()
    out = workdir / "peer"
    peer.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "crop_size": {"height": 224, "width": 224},
        "size": {"shortest_edge": 224}, "do_center_crop": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }))  # fmt: skip
    return peer, out


def save_bench_tokenizer(directory: Path) -> None:
    """A real-vocabulary-sized tokenizer is not needed for timing; ids are fed directly."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)} | {"<image>": IMAGE_TOKEN_ID}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  eos_token="t2", pad_token="t0", unk_token="t0")  # fmt: skip
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.save_pretrained(directory)


def sync(device: torch.device | str = "cpu") -> None:
    """Wait for the GPU's queued kernels, so wall time measures the work and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn: Callable[[], object], repeats: int = 3, device: torch.device | str = "cpu") -> float:
    """Warm up once, then the best wall time of `repeats` runs (these machines are noisy)."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_peak(dtype: torch.dtype, device: torch.device | str = "cpu", n: int | None = None) -> float:
    """Measured matmul throughput of this machine in `dtype`, FLOP/s (an 8192^3 product on a GPU)."""
    n = n or (8192 if torch.device(device).type == "cuda" else 2048)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n**3 / best_of(lambda: a @ b, 5, device)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine(device: torch.device | str) -> dict[str, object]:
    """What ran the benchmark: the GPU's name and peak allocated memory, or the CPU's bf16 support."""
    device = torch.device(device)
    info: dict[str, object] = {"device": device.type, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info |= cpu_info()
    info["bf16_auto"] = fast_bfloat16(device)  # what precision auto picks here
    return info


def cpu_info() -> dict[str, object]:
    """The CPU's model name, core count and the matmul-relevant flags (Linux /proc/cpuinfo; else what platform says)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"cpu": name, "cpu_count": os.cpu_count(), "cpu_flags": [f for f in wanted if f in flags]}


def peak_memory(device: torch.device | str) -> dict[str, float]:
    out = {"peak_rss_mb": round(peak_rss_mb())}
    if torch.device(device).type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    return out


def write_json(result: dict, path: str | None) -> None:
    """Print the result; with a path, also write it there atomically (temp file, then rename)."""
    text = json.dumps(result, indent=1)
    print(text)
    if path:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, target)


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="minillava-bench-"))
