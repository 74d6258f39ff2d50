"""transformers LlavaNext interop: import and export compute exactly what transformers' LLaVA-NeXT computes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hf_parity import HfParityChecks, edited_copy, tiny_parts, write_both_layouts
from PIL import Image
from tiny_models import louden
from transformers import AutoProcessor, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil

import minillava
from minillava.config import ModelConfig, VisionConfig
from minillava.interop.hf import ExportError, export_hf_llava, is_hf_llava_dir, load_hf_llava
from minillava.model import MiniLlava
from minillava.processor import Encoded, Processor

PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # LLaVA-NeXT's 336-px set, for a 32-px tower


# ---- fixtures ---------------------------------------------------------------------------------------------


def image_processor(mean: list[float], std: list[float]) -> LlavaNextImageProcessorPil:
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS,
        image_mean=mean, image_std=std,
    )  # fmt: skip


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    """A random tiny llava-v1.6-style model (CLIP + Llama, untied head) and its directories in both layouts."""
    root = tmp_path_factory.mktemp("hf-llava-next")
    tok, text, vision = tiny_parts(root)
    image_id = tok.convert_tokens_to_ids("<image>")
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=image_id, image_grid_pinpoints=PINPOINTS
    )
    torch.manual_seed(0)
    hf = LlavaNextForConditionalGeneration(config).eval()
    anyres_processor = image_processor([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
    return hf, write_both_layouts(root, hf, tok, anyres_processor)


@pytest.fixture(scope="module")
def imported(hf_reference):
    return load_hf_llava(hf_reference[1]["current"])


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


# ---- what LLaVA checks too: import and export logits, greedy tokens, the re-import (see hf_parity.py) -----


class TestLlavaNextParity(HfParityChecks):
    samples = staticmethod(samples)
    greedy_varies = True

    def check_reimported(self, model, processor, again, again_processor):
        assert again_processor.anyres == processor.anyres


# ---- import -----------------------------------------------------------------------------------------------


def test_import_maps_config(imported, hf_reference):
    model, processor = imported
    assert is_hf_llava_dir(hf_reference[1]["current"])
    assert model.config.image_grid_pinpoints == PINPOINTS and model.config.vision.select_feature == "patch"
    assert processor.anyres == model.anyres_layout and processor.anyres.grid == (4, 4)
    assert (processor.image_transform.size, processor.image_transform.aspect) == (32, "resize")
    assert torch.equal(model.anyres.image_newline, hf_reference[0].model.image_newline)


def test_minillava_load_dispatches(hf_reference):
    model, _ = minillava.load(str(hf_reference[1]["current"]))
    assert isinstance(model, MiniLlava) and model.anyres is not None


@pytest.mark.parametrize(
    ("name", "changes", "message"),
    [
        ("preprocessor_config.json", {"image_grid_pinpoints": [[32, 64]]}, "image_grid_pinpoints .* differ"),
        ("preprocessor_config.json", {"crop_size": {"height": 64, "width": 64}}, "64px tiles"),
        ("config.json", {"vision_feature_select_strategy": "full"}, "AnyRes needs one token per patch"),
        ("config.json", {"image_grid_pinpoints": [[40, 64]]}, "pinpoint 40x64 is not a positive multiple"),
    ],
)
def test_import_refusals(hf_reference, tmp_path, name, changes, message):
    directory = edited_copy(hf_reference[1]["current"], tmp_path / "bad", name, **changes)
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


def test_export_refuses_padded_base_view(asset_dir, tmp_path):
    cfg = ModelConfig(
        vision=VisionConfig(source=str(asset_dir("vision", "clip"))), llm_source=str(asset_dir("llm", "llama")),
        aspect="pad", image_grid_pinpoints=PINPOINTS,
    )  # fmt: skip
    model, processor = MiniLlava.build(cfg)
    with pytest.raises(ExportError, match="base view uses aspect 'pad'"):
        export_hf_llava(model, processor, tmp_path / "out")
    assert not (tmp_path / "out").exists()
