"""AnyRes (LLaVA-NeXT): geometry and token counts against transformers' own functions and LlavaNextProcessor,
the packed features, batching of a varying number of crops, gradients, save/load, the trainer and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.image_utils import ChannelDimension
from transformers.models.llava_next.modeling_llava_next import unpad_image

from minillava.anyres import AnyRes, fit_size, parse_pinpoints, unpad_slices
from minillava.anyres import select_best_resolution as our_best_resolution
from minillava.cli import main
from minillava.config import ModelConfig, VisionConfig
from minillava.model import MiniLlava

PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # LLaVA-NeXT's 336-px set, for the 32-px tiny tower
SIZES = {"tall": (100, 30), "wide": (40, 90), "square": (64, 64), "tiny": (5, 7), "large": (300, 200), "tile": (32, 32)}


def picture(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def anyres_tiny(asset_dir):
    """CLIP (32 px, 8 px patches) + Llama + mlp2x_gelu with AnyRes, LLaVA-NeXT's "resize" base view."""
    cfg = ModelConfig(
        vision=VisionConfig(source=str(asset_dir("vision", "clip"))), llm_source=str(asset_dir("llm", "llama")),
        aspect="resize", image_grid_pinpoints=PINPOINTS,
    )  # fmt: skip
    torch.manual_seed(2)
    return MiniLlava.build(cfg)


@pytest.fixture(scope="module")
def hf_processor(anyres_tiny):
    """transformers' LlavaNextProcessor for the same tower and pinpoints (PIL backend: no torchvision here)."""
    _, processor = anyres_tiny
    t = processor.image_transform
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS,
        image_mean=list(t.mean), image_std=list(t.std),
    )  # fmt: skip
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=processor.tokenizer, patch_size=8,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,  # CLIP's CLS, dropped by "default"
    )  # fmt: skip


# ---- geometry, against transformers' functions ----------------------------------------------------------------

ODD_SIZES = [(h, w) for h in (1, 5, 31, 32, 33, 47, 64, 100, 257, 1000) for w in (1, 7, 32, 45, 64, 90, 333, 999)]


def test_best_resolution_and_fit_match_transformers():
    canvases = [tuple(p) for p in PINPOINTS]
    for size in ODD_SIZES:
        best = our_best_resolution(size, canvases)
        assert best == tuple(select_best_resolution(size, PINPOINTS)), size
        image = np.zeros((3, *size), dtype=np.uint8)
        assert fit_size(size, best) == tuple(get_patch_output_size(image, best, ChannelDimension.FIRST)), size


def test_unpad_matches_transformers():
    for size in ODD_SIZES:
        for grid in ((8, 16), (16, 8), (8, 8), (12, 4), (4, 12)):
            feature_map = torch.arange(grid[0] * grid[1]).view(1, *grid)
            rows, cols = unpad_slices(size, grid)
            assert torch.equal(feature_map[:, rows, cols], unpad_image(feature_map, list(size))), (size, grid)


def test_layout_rejects_bad_pinpoints():
    with pytest.raises(ValueError, match="pinpoint 40x64 is not a positive multiple of the vision tower's 32px"):
        AnyRes(((40, 64),), 32, (4, 4))
    with pytest.raises(ValueError, match="at least one"):
        AnyRes((), 32, (4, 4))
    assert parse_pinpoints("64x32, 32X96") == [[64, 32], [32, 96]]
    with pytest.raises(ValueError, match="'64by32' is not HEIGHTxWIDTH"):
        parse_pinpoints("64by32")


# ---- the processor, against LlavaNextProcessor ------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(SIZES))
def test_token_counts_and_pixels_match_llava_next_processor(anyres_tiny, hf_processor, shape):
    _, processor = anyres_tiny
    image = picture(SIZES[shape])
    theirs = hf_processor(images=[image], text="look <image> here", return_tensors="pt")
    ours = processor.encode_raw("look <image> here", [image])
    image_id = processor.image_token_id
    assert ours.input_ids.count(image_id) == int((theirs["input_ids"] == image_id).sum())
    assert ours.input_ids.count(image_id) == processor.anyres.num_tokens(SIZES[shape])
    assert ours.image_sizes.tolist() == theirs["image_sizes"].tolist() == [list(SIZES[shape])]
    crops = processor.anyres.num_crops(SIZES[shape])
    assert ours.pixel_values.shape == (crops, 3, 32, 32)
    # Same resampling (PIL bicubic), same black padding, same crop order: equal up to float rounding.
    assert (ours.pixel_values - theirs["pixel_values"][0, :crops]).abs().max() < 1e-5


def test_two_images_in_one_text_match_llava_next_processor(anyres_tiny, hf_processor):
    _, processor = anyres_tiny
    images = [picture(SIZES["tall"]), picture(SIZES["wide"], seed=1)]
    text = "compare <image> with <image> please"
    theirs = hf_processor(images=images, text=text, return_tensors="pt")
    ours = processor.encode_raw(text, images)
    assert ours.input_ids == theirs["input_ids"][0].tolist()


def test_marker_and_image_counts_must_agree(anyres_tiny):
    _, processor = anyres_tiny
    with pytest.raises(ValueError, match="2 <image> markers but 1 images"):
        processor.encode_raw("<image> and <image>", [picture(SIZES["tall"])])


# ---- the model ----------------------------------------------------------------------------------------------------


def test_collate_packs_a_varying_number_of_crops(anyres_tiny):
    model, processor = anyres_tiny
    one = processor.encode_raw("a <image>", [picture(SIZES["tall"])])
    two = processor.encode_raw("<image> b <image>", [picture(SIZES["square"]), picture(SIZES["tiny"])])
    text = processor.encode_raw("just text")
    batch = processor.collate([one, text, two])
    sizes = [SIZES["tall"], SIZES["square"], SIZES["tiny"]]
    assert batch["image_sizes"].tolist() == [list(s) for s in sizes]
    assert batch["pixel_values"].shape[0] == sum(processor.anyres.num_crops(s) for s in sizes)
    assert len({processor.anyres.num_crops(s) for s in sizes}) > 1  # the test needs different crop counts
    features = model.encode_images(batch["pixel_values"], batch["image_sizes"])
    assert features.shape == (sum(processor.anyres.num_tokens(s) for s in sizes), model.llm.config.hidden_size)
    # Each row alone gives the logits it gets in the batch (right padding).
    out = model(**batch).logits
    for row, sample in enumerate([one, text, two]):
        alone = model(**processor.collate([sample])).logits[0]
        assert torch.allclose(alone, out[row, : len(sample.input_ids)], atol=1e-5)


def test_packed_features_are_base_then_unpadded_rows_with_newlines(anyres_tiny):
    model, processor = anyres_tiny
    size = (20, 90)  # -> a 32 x 96 canvas: 1 x 3 tiles, black bars above and below
    layout = processor.anyres
    rows, cols = layout.tile_grid(size)
    tokens = torch.randn(layout.num_crops(size), 16, 32)
    packed = model.anyres(tokens, torch.tensor([size]))
    kept_rows, kept_cols = layout.feature_slices(size)
    height, width = kept_rows.stop - kept_rows.start, kept_cols.stop - kept_cols.start
    assert (rows, cols) == (1, 3) and height < 4 and width == 12
    assert torch.equal(packed[:16], tokens[0])  # the base view first
    grid = packed[16:].view(height, width + 1, 32)
    assert torch.equal(grid[:, -1], model.anyres.image_newline.detach().expand(height, 32))
    # Row r, col c of the map is patch (r % 4, c % 4) of tile c // 4 (one row of tiles).
    r, c = 1, 9
    tile, patch = 1 + (c // 4), ((kept_rows.start + r) % 4) * 4 + c % 4
    assert torch.equal(grid[r, c], tokens[tile, patch])


def test_wrong_counts_raise_naming_both(anyres_tiny):
    model, processor = anyres_tiny
    batch = processor.collate([processor.encode_raw("a <image>", [picture(SIZES["tall"])])])
    with pytest.raises(ValueError, match=r"AnyRes: \d+ crops were encoded but the 1 image sizes call for \d+"):
        model(batch["input_ids"], pixel_values=batch["pixel_values"][:-1], image_sizes=batch["image_sizes"])
    with pytest.raises(ValueError, match=r"\d+ placeholder tokens in the text, \d+ image feature vectors"):
        model(batch["input_ids"][:, :-3], pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    with pytest.raises(ValueError, match="needs image_sizes"):
        model(batch["input_ids"], pixel_values=batch["pixel_values"])


def test_rows_image_counts_are_checked_with_each_images_token_count(anyres_tiny):
    """Per-row image counts that split the packed images wrongly raise, with each image's own token count."""
    model, processor = anyres_tiny
    one = processor.encode_raw("a <image>", [picture(SIZES["tall"])])
    two = processor.encode_raw("<image> b <image>", [picture(SIZES["square"]), picture(SIZES["tiny"])])
    batch = processor.collate([one, two])
    assert batch["image_counts"].tolist() == [1, 2]
    model(**batch)
    batch["image_counts"] = torch.tensor([2, 1])
    with pytest.raises(ValueError, match=r"^row 0: \d+ image placeholder tokens in the text, \d+ image feature"):
        model(**batch)


def test_projector_must_keep_the_patch_grid(asset_dir):
    cfg = ModelConfig(
        vision=VisionConfig(source=str(asset_dir("vision", "clip")), select_feature="cls_patch"),
        llm_source=str(asset_dir("llm", "llama")), image_grid_pinpoints=PINPOINTS,
    )  # fmt: skip
    with pytest.raises(ValueError, match="AnyRes needs one token per patch of the 4x4 grid"):
        MiniLlava.build(cfg)


def test_gradients_reach_projector_and_newline_not_tower(anyres_tiny):
    model, processor = anyres_tiny
    conv = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "a cat"}]
    batch = processor.collate([processor.encode(conv, [picture(SIZES["tall"])])])
    model.zero_grad()
    model.projector.requires_grad_(True)
    model.anyres.requires_grad_(True)
    model(**batch).loss.backward()
    assert model.anyres.image_newline.grad is not None and model.anyres.image_newline.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.projector.parameters())
    assert all(p.grad is None for p in model.vision.parameters())
    model.zero_grad()


def test_save_load_round_trip(anyres_tiny, tmp_path):
    model, processor = anyres_tiny
    model.save_pretrained(tmp_path / "m", processor)
    again, again_processor = MiniLlava.from_pretrained(tmp_path / "m")
    assert again_processor.anyres == processor.anyres and again.anyres_layout == model.anyres_layout
    assert torch.equal(again.anyres.image_newline, model.anyres.image_newline)
    batch = processor.collate([processor.encode_raw("a <image> b", [picture(SIZES["large"])])])
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, model(**batch).logits)


# ---- data, training and the CLI --------------------------------------------------------------------------------------


SHAPES = ["tall", "wide", "square", "tiny"]


def write_data(root: Path) -> Path:
    """One captioned picture of each shape and a text-only sample, LLaVA json."""

    def turns(question: str, answer: str) -> list[dict]:
        return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]

    for i, shape in enumerate(SHAPES):
        picture(SIZES[shape], seed=i).save(root / f"{shape}.png")
    rows = [
        {"id": s, "image": f"{s}.png", "conversations": turns("<image>\nWhat is it?", f"a {s} one")} for s in SHAPES
    ]
    rows.append({"id": "text", "conversations": turns("hi", "hello")})
    (root / "data.json").write_text(json.dumps(rows))
    return root / "data.json"


def test_dataset_and_data_check_expand_by_image_size(anyres_tiny, tmp_path):
    from minillava.data.check import check_data
    from minillava.data.dataset import SupervisedDataset

    _, processor = anyres_tiny
    data = write_data(tmp_path)
    dataset = SupervisedDataset(data, processor, tmp_path)
    items = [dataset[i] for i in range(len(dataset))]
    for shape, item in zip(SHAPES, items, strict=False):
        assert item.encoded.input_ids.count(processor.image_token_id) == processor.anyres.num_tokens(SIZES[shape])
        assert item.encoded.pixel_values.shape[0] == processor.anyres.num_crops(SIZES[shape])
    report = check_data([data], tmp_path, processor)
    assert report.ok and sorted(report.lengths) == sorted(len(it.encoded.input_ids) for it in items)
    with pytest.raises(ValueError, match="feature cache"):
        SupervisedDataset(data, processor, tmp_path, feature_cache=object())


def test_trainer_runs_anyres(anyres_tiny, tmp_path):
    from minillava.train.config import TrainConfig
    from minillava.train.loop import train

    model, processor = anyres_tiny
    model.save_pretrained(tmp_path / "start", processor)
    data = write_data(tmp_path)
    cfg = TrainConfig(
        model=str(tmp_path / "start"), data=[str(data)], image_root=str(tmp_path),
        out=str(tmp_path / "run"), stage="align", batch_size=5, max_steps=4, lr=1e-2, num_workers=0,
        precision="fp32", progress=False, plot=False, warmup_ratio=0.0, scheduler="constant", seed=0,
        feature_cache=str(tmp_path / "cache"),  # ignored with AnyRes
    )  # fmt: skip
    cfg.validate()
    before = model.anyres.image_newline.detach().clone()
    summary = train(cfg)
    assert summary["steps"] == 4 and summary["skipped"] == 0 and summary["final_loss"] < summary["losses"][0]
    trained, trained_processor = MiniLlava.from_pretrained(summary["model"])
    assert trained_processor.anyres == processor.anyres
    assert not torch.equal(trained.anyres.image_newline, before)  # the newline trains with the projector
    frozen = model.vision.state_dict()
    assert all(torch.equal(v, frozen[k]) for k, v in trained.vision.state_dict().items())


def test_cli_build_anyres_and_info(asset_dir, tmp_path, capsys):
    out = tmp_path / "m"
    args = ["build", "--vision", str(asset_dir("vision", "clip")), "--llm", str(asset_dir("llm", "llama"))]
    assert main([*args, "--anyres", "32x64,64x32,64x64", "--out", str(out)]) == 0
    assert "AnyRes" in capsys.readouterr().out
    assert main(["info", "--model", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["anyres"] == {"pinpoints": [[32, 64], [64, 32], [64, 64]], "tile": 32, "grid": [4, 4]}
    assert json.loads((out / "minillava.json").read_text())["aspect"] == "resize"  # LLaVA-NeXT's base view
    assert main([*args, "--anyres", "40x64", "--out", str(tmp_path / "bad")]) == 1
    assert "pinpoint 40x64 is not a positive multiple" in capsys.readouterr().err


def test_viz_refuses_anyres_before_generating(anyres_tiny):
    from minillava.viz.attention import visualize

    model, processor = anyres_tiny
    with pytest.raises(ValueError, match="does not support AnyRes"):
        visualize(model, processor, picture((40, 72)), "What is it?")
