"""transformers Llava interop: import and export must compute exactly what transformers computes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tiny_models import make_tokenizer
from transformers import (
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

import minillava
from minillava.generate import GenerationConfig, decode
from minillava.interop.hf import ExportError, export_hf_llava, is_hf_llava_dir, load_hf_llava
from minillava.model import MiniLlava, positions_from_mask
from minillava.processor import Encoded, Processor
from minillava.vision import VisionTower

ATOL = 1e-4
NEW_TOKENS = 8


# ---- fixtures ---------------------------------------------------------------------------------------------


def older_key(key: str) -> str:
    """Current Llava key -> the layout of llava-hf checkpoints written before transformers 4.52."""
    for new, old in (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if key.startswith(new):
            return old + key[len(new) :]
    raise AssertionError(key)


def write_llava_dir(directory: Path, hf: LlavaForConditionalGeneration, layout: str) -> Path:
    """Config, tokenizer, CLIP image processor and the weights under one key layout, written by hand."""
    hf.config.save_pretrained(directory)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if layout == "older":
        state = {older_key(k): v for k, v in state.items()}
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def hf_llava(tmp_path_factory):
    """A random tiny llava-1.5-style model (CLIP + Llama, untied head) and its directories in both layouts."""
    root = tmp_path_factory.mktemp("hf-llava")
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
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id, image_seq_length=16)
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(config).eval()
    dirs = {}
    for layout in ("current", "older"):
        d = root / layout
        d.mkdir()
        tok.save_pretrained(d)
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
        dirs[layout] = write_llava_dir(d, hf, layout)
    return hf, dirs


@pytest.fixture(scope="module")
def imported(hf_llava):
    return load_hf_llava(hf_llava[1]["current"])


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def samples(processor: Processor) -> list[Encoded]:
    """One image; two `<image>` runs in one sample; a text-only sample (different lengths, for padding)."""
    return [
        processor.prompt("What is in the picture?", images(1)),
        processor.encode_raw("compare <image> with <image> please", images(2, seed=1)),
        processor.encode_raw("hello world, how are you today?"),
    ]


def hf_logits(hf: LlavaForConditionalGeneration, batch: dict) -> torch.Tensor:
    """Positions as minillava counts them (real tokens only), so padded rows compare fairly."""
    with torch.no_grad():
        return hf(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
            position_ids=positions_from_mask(batch["attention_mask"]),
        ).logits  # fmt: skip


def mini_logits(model: MiniLlava, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits


def assert_same_logits(model: MiniLlava, hf: LlavaForConditionalGeneration, batch: dict) -> None:
    real = batch["attention_mask"].bool()  # padded positions attend to nothing: their outputs are arbitrary
    diff = (mini_logits(model, batch) - hf_logits(hf, batch))[real].abs().max().item()
    assert diff < ATOL, f"max |logit diff| {diff}"


def greedy_tokens(model: MiniLlava, processor: Processor, batch: dict) -> torch.Tensor:
    # No stop ids: both sides run exactly NEW_TOKENS steps.
    steps = decode(model, batch, GenerationConfig(max_new_tokens=NEW_TOKENS), [], processor.pad_token_id)
    return torch.stack([token for token, _ in steps], dim=1)


def hf_greedy(hf: LlavaForConditionalGeneration, batch: dict, image_token_id: int) -> torch.Tensor:
    out = hf.generate(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
        do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, eos_token_id=None,
        pad_token_id=0, suppress_tokens=[image_token_id],  # minillava never emits an image slot either
    )  # fmt: skip
    return out[:, batch["input_ids"].shape[1] :]


def assert_same_greedy(model: MiniLlava, processor: Processor, hf: LlavaForConditionalGeneration, batch) -> None:
    ours = greedy_tokens(model, processor, batch)
    theirs = hf_greedy(hf, batch, model.config.image_token_id)
    assert ours.tolist() == theirs.tolist()


# ---- import -----------------------------------------------------------------------------------------------


def test_is_hf_llava_dir(hf_llava, tmp_path):
    assert is_hf_llava_dir(hf_llava[1]["current"])
    assert not is_hf_llava_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert not is_hf_llava_dir(tmp_path)
    assert not is_hf_llava_dir(tmp_path / "missing")


def test_import_maps_config(imported, hf_llava):
    model, processor = imported
    cfg = model.config
    assert (cfg.vision.select_layer, cfg.vision.select_feature) == (-2, "patch")
    assert cfg.projector.name == "mlp2x_gelu" and cfg.image_token_id == hf_llava[0].config.image_token_id
    assert processor.tokens_per_image == model.tokens_per_image == 16
    assert (processor.image_transform.size, processor.image_transform.aspect) == (32, "center_crop")
    assert processor.template_name == "auto"  # the tokenizer's ChatML template renders string contents


@pytest.mark.parametrize("which", ["one_image", "two_images"])
def test_import_logits_single(imported, hf_llava, which):
    model, processor = imported
    sample = samples(processor)[0 if which == "one_image" else 1]
    assert_same_logits(model, hf_llava[0], processor.collate([sample]))


@pytest.mark.parametrize("side", ["left", "right"])
def test_import_logits_padded_batch(imported, hf_llava, side):
    model, processor = imported
    batch = processor.collate(samples(processor), padding_side=side)
    assert bool((batch["attention_mask"] == 0).any())
    assert_same_logits(model, hf_llava[0], batch)


def test_import_greedy(imported, hf_llava):
    model, processor = imported
    assert_same_greedy(model, processor, hf_llava[0], processor.collate(samples(processor), "left"))


def test_import_older_layout(imported, hf_llava):
    model, processor = imported
    old, _ = load_hf_llava(hf_llava[1]["older"])
    batch = processor.collate(samples(processor), padding_side="left")
    assert torch.equal(mini_logits(old, batch), mini_logits(model, batch))


def test_minillava_load_dispatches(hf_llava):
    model, _ = minillava.load(str(hf_llava[1]["current"]))
    assert isinstance(model, MiniLlava)


# ---- export -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(build_tiny, tmp_path_factory):
    model, processor = build_tiny()  # CLIP + Llama (tied head) + mlp2x_gelu, "pad" aspect
    torch.manual_seed(3)
    # Larger weights than the 0.02 init: images then move the logits and greedy decoding varies its tokens,
    # so the comparisons below can fail.
    for p in model.projector.parameters():
        torch.nn.init.normal_(p, std=0.1)
    for p in model.llm.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.2)
    out = export_hf_llava(model.eval(), processor, tmp_path_factory.mktemp("export") / "llava")
    return model, processor, out, LlavaForConditionalGeneration.from_pretrained(out).eval()


def test_export_logits_and_greedy(exported):
    model, processor, _, hf = exported
    for side in ("left", "right"):
        assert_same_logits(model, hf, processor.collate(samples(processor), padding_side=side))
    assert_same_greedy(model, processor, hf, processor.collate(samples(processor), "left"))


def test_export_layout_and_processor(exported):
    model, processor, out, hf = exported
    keys = json.loads((out / "config.json").read_text())
    assert keys["model_type"] == "llava" and keys["vision_feature_select_strategy"] == "default"
    assert not list(out.parent.glob(".llava.*"))  # the temp dir was renamed into place
    llava_processor = AutoProcessor.from_pretrained(out)
    image = images(1)[0]
    got = llava_processor(images=[image], text="look <image> here", return_tensors="pt")
    assert int((got["input_ids"] == model.config.image_token_id).sum()) == model.tokens_per_image
    ours = processor.preprocess_images([image])
    assert (got["pixel_values"] - ours).abs().max() < 0.05  # pad-to-square + resize, up to resampling details


def test_export_reimports(exported):
    model, processor, out, _ = exported
    again, again_processor = load_hf_llava(out)
    batch = processor.collate(samples(processor), padding_side="left")
    assert (mini_logits(again, batch) - mini_logits(model, batch)).abs().max() < ATOL
    assert again_processor.image_transform == processor.image_transform
    assert again.config.vision.select_feature == model.config.vision.select_feature


@pytest.mark.parametrize(("vision", "feature"), [("clip", "cls_patch"), ("siglip", "patch"), ("dinov2", "patch")])
def test_export_other_encoders(build_tiny, tmp_path, vision, feature):
    model, processor = build_tiny(vision=vision, select_feature=feature)
    out = export_hf_llava(model.eval(), processor, tmp_path / "llava")
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert_same_logits(model, hf, processor.collate(samples(processor)[:2], padding_side="left"))


def test_export_merges_lora(build_tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    model, processor = build_tiny()
    torch.manual_seed(4)
    # init_lora_weights=False: random B, so the adapters change the logits and merging has to be right.
    get_peft_model(model.llm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = export_hf_llava(model.eval(), processor, tmp_path / "llava")
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert_same_logits(model, hf, processor.collate(samples(processor)[:1]))
    assert any(isinstance(m, BaseTunerLayer) for m in model.llm.modules())  # the caller's model keeps its adapters


def test_export_replaces_existing_dir(exported, tmp_path):
    model, processor, _, _ = exported
    out = tmp_path / "llava"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    export_hf_llava(model, processor, out)
    assert not (out / "stale.txt").exists() and is_hf_llava_dir(out)


# ---- refusals ---------------------------------------------------------------------------------------------


def test_export_refuses_linear_projector(build_tiny, tmp_path):
    model, processor = build_tiny(projector="linear")
    with pytest.raises(ExportError, match="projector 'linear'"):
        export_hf_llava(model, processor, tmp_path / "llava")
    assert not (tmp_path / "llava").exists()


def test_export_refuses_non_hf_vision(build_tiny, tmp_path):
    model, processor = build_tiny()

    class Other(VisionTower):  # stands in for the torchvision backend (torchvision may be absent)
        pass

    model.config.vision.backend = "torchvision"
    bad = MiniLlava(model.config, Other(model.config.vision), model.projector, model.llm)
    with pytest.raises(ExportError, match="vision backend 'torchvision'"):
        export_hf_llava(bad, processor, tmp_path / "llava")


def edited_copy(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"projector_hidden_act": "relu"}, "projector_hidden_act is 'relu'"),
        ({"multimodal_projector_bias": False}, "multimodal_projector_bias"),
        ({"vision_feature_layer": [-2, -1]}, "vision_feature_layer is \\[-2, -1\\]"),
        ({"image_token_index": 5}, "image_token_index is 5"),
    ],
)
def test_import_refusals(hf_llava, tmp_path, changes, message):
    directory = edited_copy(hf_llava[1]["current"], tmp_path / "bad", **changes)
    with pytest.raises(ValueError, match=message):
        load_hf_llava(directory)


def test_export_folds_the_input_standardisation(build_tiny, tmp_path):
    model, processor = build_tiny()
    torch.manual_seed(4)
    for p in model.projector.parameters():
        torch.nn.init.normal_(p, std=0.1)
    dim = model.vision.hidden_size
    model.projector.set_feature_stats(torch.randn(dim), torch.rand(dim) + 0.5)
    out = export_hf_llava(model.eval(), processor, tmp_path / "llava")
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert_same_logits(model, hf, processor.collate(samples(processor)[:2], padding_side="left"))
    again, _ = load_hf_llava(out)
    assert not again.projector.standardizes  # folded into linear_1, so the import reads raw features
