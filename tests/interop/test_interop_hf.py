"""transformers Llava interop: import and export must compute exactly what transformers computes."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from hf_parity import HfParityChecks, assert_same_logits, edited_copy, tiny_parts, write_both_layouts
from tiny_models import images, samples
from transformers import AutoProcessor, CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration

import minillava
from minillava.interop.hf import ExportError, export_hf_llava, is_hf_llava_dir, load_hf_llava
from minillava.model import MiniLlava
from minillava.vision import VisionTower

# ---- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    """A random tiny llava-1.5-style model (CLIP + Llama, untied head) and its directories in both layouts."""
    root = tmp_path_factory.mktemp("hf-llava")
    tok, text, vision = tiny_parts(root)
    image_id = tok.convert_tokens_to_ids("<image>")
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id, image_seq_length=16)
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return hf, write_both_layouts(root, hf, tok, image_processor)


@pytest.fixture(scope="module")
def imported(hf_reference):
    return load_hf_llava(hf_reference[1]["current"])


# ---- what LlavaNext checks too: import and export logits, greedy tokens, the re-import (see hf_parity.py) -


class TestLlavaParity(HfParityChecks):
    samples = staticmethod(samples)

    def check_reimported(self, model, processor, again, again_processor):
        assert again.config.vision.select_feature == model.config.vision.select_feature


# ---- import -----------------------------------------------------------------------------------------------


def test_is_hf_llava_dir(hf_reference, tmp_path):
    assert is_hf_llava_dir(hf_reference[1]["current"])
    assert not is_hf_llava_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert not is_hf_llava_dir(tmp_path)
    assert not is_hf_llava_dir(tmp_path / "missing")


def test_import_maps_config(imported, hf_reference):
    model, processor = imported
    cfg = model.config
    assert (cfg.vision.select_layer, cfg.vision.select_feature) == (-2, "patch")
    assert cfg.projector.name == "mlp2x_gelu" and cfg.image_token_id == hf_reference[0].config.image_token_id
    assert processor.tokens_per_image == model.tokens_per_image == 16
    assert (processor.image_transform.size, processor.image_transform.aspect) == (32, "center_crop")
    assert processor.template_name == "auto"  # the tokenizer's ChatML template renders string contents


def test_minillava_load_dispatches(hf_reference):
    model, _ = minillava.load(str(hf_reference[1]["current"]))
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


def test_export_layout_and_processor(exported):
    model, processor, out, hf = exported
    keys = json.loads((out / "config.json").read_text())
    assert keys["model_type"] == "llava" and keys["vision_feature_select_strategy"] == "default"
    assert not list(out.parent.glob(".llava.*"))  # the temp dir was renamed into place
    llava_processor = AutoProcessor.from_pretrained(out)
    image = images(1)[0]
    got = llava_processor(images=[image], text="look <image> here", return_tensors="pt")
    assert int((got["input_ids"] == model.config.image_token_id).sum()) == model.tokens_per_image
    # the exported processor, with whichever back end this transformers picked, gives our pixels (float ulps apart)
    backend = getattr(llava_processor.image_processor, "backend", "pil")
    transform = dataclasses.replace(processor.image_transform, resize_backend=backend)
    assert (got["pixel_values"][0] - transform(image.convert("RGB"))).abs().max() < 1e-5


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


def test_export_keeps_a_legacy_tokenizer_legacy(build_tiny, tmp_path):
    """The exported tokenizer splits text after a special token (a `▁` after `</s>`, as a legacy Llama tokenizer
    does) as the model's own did."""
    from transformers import AutoTokenizer

    model, processor = build_tiny(llm="llama-sp")
    assert processor.tokenizer.legacy
    out = export_hf_llava(model.eval(), processor, tmp_path / "llava")
    text = "</s>USER: what is it?"
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == processor.tokenizer(text).input_ids


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


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"projector_hidden_act": "relu"}, "projector_hidden_act is 'relu'"),
        ({"multimodal_projector_bias": False}, "multimodal_projector_bias"),
        ({"vision_feature_layer": [-2, -1]}, "vision_feature_layer is \\[-2, -1\\]"),
        ({"image_token_index": 5}, "image_token_index is 5"),
    ],
)
def test_import_refusals(hf_reference, tmp_path, changes, message):
    directory = edited_copy(hf_reference[1]["current"], tmp_path / "bad", "config.json", **changes)
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


class _Tokenizer:
    def __init__(self, template: str | None, renders: bool) -> None:
        self.chat_template, self.renders = template, renders

    def apply_chat_template(self, messages: list[dict], tokenize: bool) -> str:
        return f"<user>{messages[0]['content'] if self.renders else ''}</user>"


def test_an_unusable_chat_template_is_a_logged_choice_not_a_silent_default(caplog):
    from pathlib import Path

    from minillava.interop.hf import _pick_template

    with caplog.at_level(logging.WARNING, logger="minillava.interop.hf"):
        assert _pick_template(_Tokenizer("{{ x }}", renders=True), Path("ok")) == "auto"
        assert not caplog.records  # the model's own template: nothing to say
        assert _pick_template(_Tokenizer(None, renders=True), Path("bare")) == "vicuna_v1"
        assert _pick_template(_Tokenizer("{{ x }}", renders=False), Path("parts")) == "vicuna_v1"
    said = [r.getMessage() for r in caplog.records]
    assert said[0].startswith("bare: prompt template vicuna_v1") and "no chat template" in said[0]
    assert said[1].startswith("parts: prompt template vicuna_v1") and "drops plain-string" in said[1]
