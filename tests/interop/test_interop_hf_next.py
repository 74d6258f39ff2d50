"""transformers LlavaNext interop: import and export compute exactly what transformers' LLaVA-NeXT computes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tiny_models import louden, make_tokenizer
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
)

import minillava
from minillava.config import ModelConfig, VisionConfig
from minillava.generate import GenerationConfig, decode
from minillava.interop.hf import ExportError, export_hf_llava, is_hf_llava_dir, load_hf_llava
from minillava.model import MiniLlava, positions_from_mask
from minillava.processor import Encoded, Processor

ATOL = 1e-4
NEW_TOKENS = 8
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # LLaVA-NeXT's 336-px set, for a 32-px tower


# ---- fixtures ---------------------------------------------------------------------------------------------


def older_key(key: str) -> str:
    """Current LlavaNext key -> the layout of llava-hf v1.6 checkpoints written before transformers 4.52."""
    for new, old in (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.image_newline", "image_newline"),
    ):
        if key.startswith(new):
            return old + key[len(new) :]
    raise AssertionError(key)


def image_processor(mean: list[float], std: list[float]) -> LlavaNextImageProcessorPil:
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS,
        image_mean=mean, image_std=std,
    )  # fmt: skip


@pytest.fixture(scope="module")
def hf_next(tmp_path_factory):
    """A random tiny llava-v1.6-style model (CLIP + Llama, untied head) and its directories in both layouts."""
    root = tmp_path_factory.mktemp("hf-llava-next")
    tok = make_tokenizer(root / "tok")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    text = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.1,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
    )
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=image_id, image_grid_pinpoints=PINPOINTS
    )
    torch.manual_seed(0)
    hf = LlavaNextForConditionalGeneration(config).eval()
    dirs = {}
    for layout in ("current", "older"):
        d = root / layout
        d.mkdir()
        tok.save_pretrained(d)
        image_processor([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]).save_pretrained(d)
        hf.config.save_pretrained(d)
        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if layout == "older":
            state = {older_key(k): v for k, v in state.items()}
        save_file(state, d / "model.safetensors", metadata={"format": "pt"})
        dirs[layout] = d
    return hf, dirs


@pytest.fixture(scope="module")
def imported(hf_next):
    return load_hf_llava(hf_next[1]["current"])


def picture(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def samples(processor: Processor) -> list[Encoded]:
    """A tall image; a wide and a square one in one text; a text-only row (different lengths, for padding)."""
    return [
        processor.prompt("What is in the picture?", [picture(100, 30, 0)]),
        processor.encode_raw("compare <image> with <image> please", [picture(20, 90, 1), picture(48, 48, 2)]),
        processor.encode_raw("hello world, how are you today?"),
    ]


def hf_logits(hf: LlavaNextForConditionalGeneration, batch: dict) -> torch.Tensor:
    """Positions as minillava counts them (real tokens only), so padded rows compare fairly."""
    with torch.no_grad():
        return hf(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
            image_sizes=batch["image_sizes"], position_ids=positions_from_mask(batch["attention_mask"]),
        ).logits  # fmt: skip


def mini_logits(model: MiniLlava, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def assert_same_logits(model: MiniLlava, hf: LlavaNextForConditionalGeneration, batch: dict) -> None:
    real = batch["attention_mask"].bool()  # padded positions attend to nothing: their outputs are arbitrary
    diff = (mini_logits(model, batch) - hf_logits(hf, batch))[real].abs().max().item()
    assert diff < ATOL, f"max |logit diff| {diff}"


def assert_same_greedy(model: MiniLlava, processor: Processor, hf: LlavaNextForConditionalGeneration, batch) -> None:
    # No stop ids: both sides run exactly NEW_TOKENS steps.
    steps = decode(model, batch, GenerationConfig(max_new_tokens=NEW_TOKENS), [], processor.pad_token_id)
    ours = torch.stack([token for token, _ in steps], dim=1)
    theirs = hf.generate(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
        image_sizes=batch["image_sizes"], do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        eos_token_id=None, pad_token_id=0, suppress_tokens=[model.config.image_token_id],
    )[:, batch["input_ids"].shape[1] :]  # fmt: skip
    assert ours.tolist() == theirs.tolist()
    assert len(set(ours.flatten().tolist())) > 1  # not a degenerate constant answer


# ---- import -----------------------------------------------------------------------------------------------


def test_import_maps_config(imported, hf_next):
    model, processor = imported
    assert is_hf_llava_dir(hf_next[1]["current"])
    assert model.config.image_grid_pinpoints == PINPOINTS and model.config.vision.select_feature == "patch"
    assert processor.anyres == model.anyres_layout and processor.anyres.grid == (4, 4)
    assert (processor.image_transform.size, processor.image_transform.aspect) == (32, "resize")
    assert torch.equal(model.anyres.image_newline, hf_next[0].model.image_newline)


@pytest.mark.parametrize("which", ["one_image", "two_images"])
def test_import_logits_single(imported, hf_next, which):
    model, processor = imported
    sample = samples(processor)[0 if which == "one_image" else 1]
    assert_same_logits(model, hf_next[0], processor.collate([sample]))


@pytest.mark.parametrize("side", ["left", "right"])
def test_import_logits_padded_batch(imported, hf_next, side):
    model, processor = imported
    batch = processor.collate(samples(processor), padding_side=side)
    assert bool((batch["attention_mask"] == 0).any())
    assert_same_logits(model, hf_next[0], batch)


def test_import_greedy(imported, hf_next):
    model, processor = imported
    assert_same_greedy(model, processor, hf_next[0], processor.collate(samples(processor), "left"))


def test_import_older_layout(imported, hf_next):
    model, processor = imported
    old, _ = load_hf_llava(hf_next[1]["older"])
    batch = processor.collate(samples(processor), padding_side="left")
    assert torch.equal(mini_logits(old, batch), mini_logits(model, batch))


def test_minillava_load_dispatches(hf_next):
    model, _ = minillava.load(str(hf_next[1]["current"]))
    assert isinstance(model, MiniLlava) and model.anyres is not None


def edited_copy(src: Path, dst: Path, name: str, **changes: object) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / name).read_text())
    cfg.update(changes)
    (dst / name).write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    ("name", "changes", "message"),
    [
        ("preprocessor_config.json", {"image_grid_pinpoints": [[32, 64]]}, "image_grid_pinpoints .* differ"),
        ("preprocessor_config.json", {"crop_size": {"height": 64, "width": 64}}, "64px tiles"),
        ("config.json", {"vision_feature_select_strategy": "full"}, "AnyRes needs one token per patch"),
        ("config.json", {"image_grid_pinpoints": [[40, 64]]}, "pinpoint 40x64 is not a positive multiple"),
    ],
)
def test_import_refusals(hf_next, tmp_path, name, changes, message):
    directory = edited_copy(hf_next[1]["current"], tmp_path / "bad", name, **changes)
    if name == "config.json" and "image_grid_pinpoints" in changes:  # keep the processor in step with the model
        edited_copy(directory, tmp_path / "bad2", "preprocessor_config.json", **changes)
        directory = tmp_path / "bad2"
    with pytest.raises(ValueError, match=message):
        load_hf_llava(directory)


# ---- export -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(asset_dir, tmp_path_factory):
    cfg = ModelConfig(
        vision=VisionConfig(source=str(asset_dir("vision", "clip"))), llm_source=str(asset_dir("llm", "llama")),
        aspect="resize", image_grid_pinpoints=PINPOINTS,
    )  # fmt: skip
    torch.manual_seed(3)
    model, processor = MiniLlava.build(cfg)
    # Larger weights than the init: images then move the logits and greedy decoding varies its tokens.
    louden(model, scale=0.2)
    for p in model.projector.parameters():
        torch.nn.init.normal_(p, std=0.1)
    out = export_hf_llava(model.eval(), processor, tmp_path_factory.mktemp("export") / "llava-next")
    return model, processor, out, LlavaNextForConditionalGeneration.from_pretrained(out).eval()


def test_export_logits_and_greedy(exported):
    model, processor, _, hf = exported
    for side in ("left", "right"):
        assert_same_logits(model, hf, processor.collate(samples(processor), padding_side=side))
    assert_same_greedy(model, processor, hf, processor.collate(samples(processor), "left"))


def test_export_layout_and_processor(exported):
    model, processor, out, _ = exported
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llava_next" and cfg["image_grid_pinpoints"] == PINPOINTS
    assert cfg["vision_feature_select_strategy"] == "default"
    hf_processor = AutoProcessor.from_pretrained(out)
    for size in ((100, 30), (20, 90), (48, 48), (5, 7), (300, 200)):
        image = picture(*size, seed=4)
        got = hf_processor(images=[image], text="look <image> here", return_tensors="pt")
        ours = processor.encode_raw("look <image> here", [image])
        assert int((got["input_ids"] == model.config.image_token_id).sum()) == processor.anyres.num_tokens(size)
        crops = ours.pixel_values.shape[0]
        assert (got["pixel_values"][0, :crops] - ours.pixel_values).abs().max() < 1e-5


def test_export_reimports(exported):
    model, processor, out, _ = exported
    again, again_processor = load_hf_llava(out)
    batch = processor.collate(samples(processor), padding_side="left")
    assert (mini_logits(again, batch) - mini_logits(model, batch)).abs().max() < ATOL
    assert again_processor.anyres == processor.anyres
    assert again_processor.image_transform == processor.image_transform


def test_export_refuses_padded_base_view(asset_dir, tmp_path):
    cfg = ModelConfig(
        vision=VisionConfig(source=str(asset_dir("vision", "clip"))), llm_source=str(asset_dir("llm", "llama")),
        aspect="pad", image_grid_pinpoints=PINPOINTS,
    )  # fmt: skip
    model, processor = MiniLlava.build(cfg)
    with pytest.raises(ExportError, match="base view uses aspect 'pad'"):
        export_hf_llava(model, processor, tmp_path / "out")
    assert not (tmp_path / "out").exists()
