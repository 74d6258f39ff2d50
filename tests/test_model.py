import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from minillava.model import MiniLlava
from minillava.processor import IGNORE_INDEX, Encoded

RED = Image.new("RGB", (40, 30), (200, 10, 10))
BLUE = Image.new("RGB", (30, 40), (10, 10, 200))
CONV = [{"role": "user", "content": "<image>\nWhat is in the picture?"}, {"role": "assistant", "content": "A cat."}]


@pytest.mark.parametrize("vision", ["clip", "siglip", "dinov2"])
@pytest.mark.parametrize("llm", ["llama", "qwen2", "opt"])
def test_forward_loss_matches_full_logits(build_tiny, vision, llm):
    model, p = build_tiny(vision=vision, llm=llm)
    assert model.tokens_per_image == 16  # 32 px / 8 px patches, CLS dropped
    batch = p.collate(
        [p.encode(CONV, [RED]), p.encode([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "No."}])]
    )
    out = model(**batch)
    logits = out.logits  # (B, T, V)
    ref = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert torch.allclose(out.loss, ref, atol=1e-5)
    assert out.num_supervised == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_cls_patch_keeps_cls(build_tiny):
    model, p = build_tiny(select_feature="cls_patch")
    assert model.tokens_per_image == 17 == p.tokens_per_image
    model(**p.collate([p.encode(CONV, [RED])]))


def test_text_only_and_multi_image_rows_in_one_batch(tiny):
    model, p = tiny
    two = [{"role": "user", "content": "<image> vs <image>"}, {"role": "assistant", "content": "different"}]
    samples = [
        p.encode(two, [RED, BLUE]),
        p.encode([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]),
    ]
    batch = p.collate(samples)
    out = model(**batch)
    # each row alone gives the same logits as in the batch (right padding)
    for i, s in enumerate(samples):
        alone = model(**p.collate([s]))
        n = len(s.input_ids)
        assert torch.allclose(alone.logits[0], out.logits[i, :n], atol=1e-5)


def test_images_consumed_in_order(tiny):
    model, p = tiny
    two = [{"role": "user", "content": "<image> vs <image>"}]
    a = model(**p.collate([p.encode(two, [RED, BLUE], add_generation_prompt=True)])).logits
    b = model(**p.collate([p.encode(two, [BLUE, RED], add_generation_prompt=True)])).logits
    assert not torch.allclose(a, b, atol=1e-4)


def test_left_and_right_padding_agree(tiny):
    model, p = tiny
    long = p.prompt("What is in the picture? describe it", [RED])
    short = p.prompt("hi", [BLUE])
    for side in ("left", "right"):
        batch = p.collate([long, short], padding_side=side)
        out = model(**batch).logits
        alone = model(**p.collate([short])).logits[0]
        n = len(short.input_ids)
        row = out[1, -n:] if side == "left" else out[1, :n]
        assert torch.allclose(row, alone, atol=1e-5), side


def test_count_mismatch_raises(tiny):
    model, p = tiny
    batch = p.collate([p.encode(CONV, [RED])])
    with pytest.raises(ValueError, match="16 placeholder tokens in the text, 32 image feature vectors"):
        model(batch["input_ids"], batch["attention_mask"], torch.cat([batch["pixel_values"]] * 2))


def test_rows_with_swapped_image_counts_raise(tiny):
    """Row 0 has two images' slots but one image, row 1 one image but no slots: the batch's totals match, so
    only the per-row check (from collate's image_counts) stops row 1's image landing in row 0."""
    model, p = tiny
    two = p.encode([{"role": "user", "content": "<image> vs <image>"}], [RED, BLUE], add_generation_prompt=True)
    text = p.encode([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    wrong = [
        Encoded(two.input_ids, two.labels, two.pixel_values[:1]),
        Encoded(text.input_ids, text.labels, two.pixel_values[1:]),
    ]
    batch = p.collate(wrong)
    assert batch["image_counts"].tolist() == [1, 1]
    with pytest.raises(ValueError, match="row 0: 32 image placeholder tokens in the text, 16 image feature vectors"):
        model(**batch)
    assert p.collate([two, text])["image_counts"].tolist() == [2, 0]
    model(**p.collate([two, text]))  # the right split passes


def test_cached_equals_uncached(tiny):
    model, p = tiny
    batch = p.collate([p.prompt("What is in the picture?", [RED])])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    full = model(ids, mask, batch["pixel_values"]).logits
    k = ids.shape[1] - 3
    pre = model(ids[:, :k], mask[:, :k], batch["pixel_values"], use_cache=True)
    cache = pre.past_key_values
    steps = []
    for t in range(k, ids.shape[1]):
        out = model(ids[:, t : t + 1], mask[:, : t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits[:, -1])
    assert torch.allclose(torch.stack(steps, 1), full[:, k:], atol=1e-5)


def test_save_load_round_trip(tiny, tmp_path):
    model, p = tiny
    model.save_pretrained(tmp_path / "m", p)
    assert not list(tmp_path.glob(".m.*"))  # nothing half-written left behind
    assert not list((tmp_path / "m").rglob("*.bin")) and not list((tmp_path / "m").rglob("*.pt"))
    loaded, lp = MiniLlava.from_pretrained(tmp_path / "m")
    batch = p.collate([p.encode(CONV, [RED])])
    assert torch.allclose(model(**batch).logits, loaded(**lp.collate([lp.encode(CONV, [RED])])).logits, atol=1e-6)
    assert lp.tokens_per_image == p.tokens_per_image and lp.image_token_id == p.image_token_id
    model.save_pretrained(tmp_path / "m", p)  # overwriting an existing directory is atomic too
    assert MiniLlava.from_pretrained(tmp_path / "m")[1].template.name == p.template.name


def test_bfloat16_forward(tiny):
    model, p = tiny
    batch = p.collate([p.encode(CONV, [RED])])
    ref = model(**batch).logits
    bf = MiniLlava(model.config, model.vision, model.projector, model.llm)
    import copy

    bf = copy.deepcopy(bf).to(torch.bfloat16)
    out = bf(**batch).logits
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.1
