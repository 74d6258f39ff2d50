"""What the Llava and LlavaNext interop tests share: the tiny transformers models' parts, the comparisons with
transformers (logits, greedy tokens) and HfParityChecks, the tests both formats pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import make_tokenizer
from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast

from minillava.generate import GenerationConfig, decode
from minillava.interop.hf import load_hf_llava
from minillava.model import MiniLlava, positions_from_mask
from minillava.processor import Encoded, Processor

ATOL = 1e-4
NEW_TOKENS = 8


# ---- the tiny transformers models -------------------------------------------------------------------------


def tiny_parts(root: Path) -> tuple[PreTrainedTokenizerFast, LlamaConfig, CLIPVisionConfig]:
    """The tokenizer (with an `<image>` token), the Llama text config (untied head) and the CLIP vision config
    both tiny transformers models are made of."""
    tok = make_tokenizer(root / "tok")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.1,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
    )
    return tok, text, vision


def older_key(key: str) -> str:
    """Current Llava / LlavaNext key -> the layout of llava-hf checkpoints written before transformers 4.52."""
    for new, old in (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.image_newline", "image_newline"),  # LlavaNext only
    ):
        if key.startswith(new):
            return old + key[len(new) :]
    raise AssertionError(key)


def write_both_layouts(root: Path, hf: PreTrainedModel, tok, image_processor) -> dict[str, Path]:
    """root/current and root/older: tokenizer, image processor, config and the weights under that key layout,
    written by hand."""
    dirs = {}
    for layout in ("current", "older"):
        d = root / layout
        d.mkdir()
        tok.save_pretrained(d)
        image_processor.save_pretrained(d)
        hf.config.save_pretrained(d)
        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if layout == "older":
            state = {older_key(k): v for k, v in state.items()}
        save_file(state, d / "model.safetensors", metadata={"format": "pt"})
        dirs[layout] = d
    return dirs


def edited_copy(src: Path, dst: Path, name: str, **changes: object) -> Path:
    """A copy of the directory src whose JSON file `name` has these keys changed."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / name).read_text())
    cfg.update(changes)
    (dst / name).write_text(json.dumps(cfg))
    return dst


# ---- comparisons with transformers ------------------------------------------------------------------------


def hf_inputs(batch: dict) -> dict:
    """The batch as transformers takes it: image_sizes only where there are any (LlavaNext's AnyRes)."""
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values")}
    if batch["image_sizes"] is not None:
        inputs["image_sizes"] = batch["image_sizes"]
    return inputs


def hf_logits(hf: PreTrainedModel, batch: dict) -> torch.Tensor:
    """Positions as minillava counts them (real tokens only), so padded rows compare fairly."""
    with torch.no_grad():
        return hf(**hf_inputs(batch), position_ids=positions_from_mask(batch["attention_mask"])).logits


def mini_logits(model: MiniLlava, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
        return model(ids, mask, pixels, image_sizes=batch["image_sizes"]).logits


def assert_same_logits(model: MiniLlava, hf: PreTrainedModel, batch: dict) -> None:
    real = batch["attention_mask"].bool()  # padded positions attend to nothing: their outputs are arbitrary
    diff = (mini_logits(model, batch) - hf_logits(hf, batch))[real].abs().max().item()
    assert diff < ATOL, f"max |logit diff| {diff}"


def assert_same_greedy(
    model: MiniLlava, processor: Processor, hf: PreTrainedModel, batch: dict, varied: bool = False
) -> None:
    """The same NEW_TOKENS greedy tokens; varied: and more than one distinct token among them."""
    # No stop ids: both sides run exactly NEW_TOKENS steps.
    steps = decode(model, batch, GenerationConfig(max_new_tokens=NEW_TOKENS), [], processor.pad_token_id)
    ours = torch.stack([token for token, _ in steps], dim=1)
    theirs = hf.generate(
        **hf_inputs(batch), do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, eos_token_id=None,
        pad_token_id=0, suppress_tokens=[model.config.image_token_id],  # minillava never emits an image slot either
    )[:, batch["input_ids"].shape[1] :]  # fmt: skip
    assert ours.tolist() == theirs.tolist()
    if varied:
        assert len(set(ours.flatten().tolist())) > 1  # not a degenerate constant answer


# ---- the tests both formats pass --------------------------------------------------------------------------


class HfParityChecks:
    """Subclassed by a `Test...` class in each format's test module. That module provides the fixtures
    `hf_reference` ((the tiny transformers model, {"current": dir, "older": dir})), `imported` (load_hf_llava of
    the current dir) and `exported` ((model, processor, export dir, transformers model loaded from it)); the
    class sets `samples` and `check_reimported`, and `greedy_varies` where it applies."""

    greedy_varies = False  # also require greedy decoding to emit more than one distinct token

    @staticmethod
    def samples(processor: Processor) -> list[Encoded]:
        """The format's samples: images in one or two per text, and a text-only row (lengths differ)."""
        raise NotImplementedError

    def check_reimported(self, model, processor, again, again_processor) -> None:
        """What the format's re-import must keep besides the logits and the image transform."""
        raise NotImplementedError

    # ---- import

    @pytest.mark.parametrize("which", ["one_image", "two_images"])
    def test_import_logits_single(self, imported, hf_reference, which):
        model, processor = imported
        sample = self.samples(processor)[0 if which == "one_image" else 1]
        assert_same_logits(model, hf_reference[0], processor.collate([sample]))

    @pytest.mark.parametrize("side", ["left", "right"])
    def test_import_logits_padded_batch(self, imported, hf_reference, side):
        model, processor = imported
        batch = processor.collate(self.samples(processor), padding_side=side)
        assert bool((batch["attention_mask"] == 0).any())
        assert_same_logits(model, hf_reference[0], batch)

    def test_import_greedy(self, imported, hf_reference):
        model, processor = imported
        batch = processor.collate(self.samples(processor), "left")
        assert_same_greedy(model, processor, hf_reference[0], batch, varied=self.greedy_varies)

    def test_import_older_layout(self, imported, hf_reference):
        model, processor = imported
        old, _ = load_hf_llava(hf_reference[1]["older"])
        batch = processor.collate(self.samples(processor), padding_side="left")
        assert torch.equal(mini_logits(old, batch), mini_logits(model, batch))

    # ---- export

    def test_export_logits_and_greedy(self, exported):
        model, processor, _, hf = exported
        for side in ("left", "right"):
            assert_same_logits(model, hf, processor.collate(self.samples(processor), padding_side=side))
        batch = processor.collate(self.samples(processor), "left")
        assert_same_greedy(model, processor, hf, batch, varied=self.greedy_varies)

    def test_export_reimports(self, exported):
        model, processor, out, _ = exported
        again, again_processor = load_hf_llava(out)
        batch = processor.collate(self.samples(processor), padding_side="left")
        assert (mini_logits(again, batch) - mini_logits(model, batch)).abs().max() < ATOL
        assert again_processor.image_transform == processor.image_transform
        self.check_reimported(model, processor, again, again_processor)
