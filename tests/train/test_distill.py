"""--distill-text: text-only rows learn the base LLM's distribution (KL), image rows their labels."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from train_helpers import config, write_images

from minillava.model import SoftTargets
from minillava.processor import IGNORE_INDEX
from minillava.train.distill import adapters_off, text_teacher
from minillava.train.loop import TrainStep, train
from minillava.train.stages import LoraSettings, add_lora, freeze


def _lora_model(tiny):
    model = copy.deepcopy(tiny[0])
    settings = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    freeze(model, "instruct", lora=settings, log_fn=lambda s: None)
    torch.manual_seed(0)
    for n, p in model.llm.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5)  # adapters that change the output
    return model.eval()


def _batch(tiny):
    """Row 0 asks about an image, row 1 is text only; both supervise their answers."""
    _, processor = tiny
    picture = Image.new("RGB", (32, 32), (200, 30, 30))
    with_image = processor.encode([{"role": "user", "content": "<image>\nWhat?"},
                                   {"role": "assistant", "content": "a red square"}], [picture])  # fmt: skip
    text = processor.encode([{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "world"}])
    width = max(len(with_image.input_ids), len(text.input_ids))
    pad = processor.tokenizer.pad_token_id or 0
    ids = torch.full((2, width), pad)
    labels = torch.full((2, width), IGNORE_INDEX)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, enc in enumerate((with_image, text)):
        n = len(enc.input_ids)
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(enc.input_ids), torch.tensor(enc.labels), 1
    return ids, mask, labels


def test_loss_is_kl_at_soft_rows_and_cross_entropy_elsewhere(tiny):
    model = tiny[0]
    torch.manual_seed(1)
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 3:5] = torch.tensor([5, 7])
    labels[1, 2:6] = torch.tensor([1, 2, 3, 4])
    hidden = torch.randn(2, 6, model.llm.config.hidden_size)
    vocab = model.llm.config.vocab_size
    teacher = F.log_softmax(torch.randn(4, vocab), dim=-1)
    loss, n = model.loss(hidden, labels, SoftTargets(torch.tensor([False, True]), teacher))
    logits = model.lm_head(hidden).float()
    ce = F.cross_entropy(logits[0, 2:4], labels[0, 3:5], reduction="sum")
    student = F.log_softmax(logits[1, 1:5], dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum()
    assert n == 6
    torch.testing.assert_close(loss, (ce + kl) / 6, rtol=1e-5, atol=1e-6)
    weighted, _ = model.loss(hidden, labels, SoftTargets(torch.tensor([False, True]), teacher, weight=3.0))
    torch.testing.assert_close(weighted, (ce + 3 * kl) / 6, rtol=1e-5, atol=1e-6)
    plain, _ = model.loss(hidden, labels)
    assert not torch.allclose(loss, plain)
    with pytest.raises(ValueError, match="soft targets for 3 positions"):
        model.loss(hidden, labels, SoftTargets(torch.tensor([False, True]), teacher[:3]))


def test_adapters_off_is_the_base_llm_and_leaves_what_trains(tiny):
    model = _lora_model(tiny)
    ids = torch.tensor([[1, 5, 9, 3]])
    trains = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        tuned = model(ids).logits
        with adapters_off(model.llm):
            base = model(ids).logits
        again = model(ids).logits
        torch.testing.assert_close(base, tiny[0](ids).logits)
    assert not torch.allclose(tuned, base, atol=1e-3)
    torch.testing.assert_close(again, tuned)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trains
    with pytest.raises(ValueError, match="needs LoRA"), adapters_off(tiny[0].llm):
        pass


def test_text_teacher_covers_the_text_rows_supervised_positions(tiny):
    model = _lora_model(tiny)
    ids, mask, labels = _batch(tiny)
    soft = text_teacher(model, ids, mask, labels)
    assert soft.rows.tolist() == [False, True]
    supervised = int((labels[1, 1:] != IGNORE_INDEX).sum())
    assert soft.logprobs.shape == (supervised, model.llm.config.vocab_size)
    with torch.no_grad(), adapters_off(model.llm):
        base = F.log_softmax(model(ids[1:], mask[1:]).logits[0, :-1][labels[1, 1:] != IGNORE_INDEX].float(), -1)
    torch.testing.assert_close(soft.logprobs, base)
    assert text_teacher(model, ids[:1], mask[:1], labels[:1]) is None  # no text row


def test_train_step_weights_the_text_rows_kl_by_distill_weight(tiny):
    """--distill-weight reaches the loss: a text-only batch's loss is its KL times the weight."""
    model = _lora_model(tiny)
    ids, mask, labels = (t[1:] for t in _batch(tiny))  # the text row alone
    steps = [TrainStep(model, False, distill_text=True, distill_weight=w) for w in (1.0, 3.0)]
    with torch.no_grad():
        once, thrice = (step(ids, mask, labels, None, None, None) for step in steps)
    assert once > 0
    torch.testing.assert_close(thrice, 3 * once)


def test_text_only_run_stays_at_the_base_model(tmp_path, asset_dir):
    """Fresh adapters (B = 0) equal the teacher: the first loss is 0 and the run on text alone stays near it (Adam
    turns rounding-sized gradients into small steps); with cross-entropy on the same answers it learns them."""
    data = tmp_path / "text.json"
    answer = {"from": "gpt", "value": "one two three four"}
    turns = [[{"from": "human", "value": f"count {i}"}, answer] for i in range(4)]
    rows = [{"id": f"t{i}", "conversations": t} for i, t in enumerate(turns)]
    data.write_text(json.dumps(rows))
    images = tmp_path / "images"
    write_images(images)
    common = dict(stage="instruct", lora=True, lr=1e-2, max_steps=4, batch_size=4)
    distilled = train(config(tmp_path / "a", asset_dir, data, images, distill_text=True, **common))
    plain = train(config(tmp_path / "b", asset_dir, data, images, **common))
    assert distilled["losses"][0] < 1e-6 and max(distilled["losses"]) < 0.01, distilled["losses"]
    assert plain["losses"][0] > 1.0 and plain["losses"][-1] < plain["losses"][0] - 0.1, plain["losses"]


@pytest.mark.parametrize(("options", "message"), [
    ({"stage": "instruct"}, "give --lora or --qlora"),
    ({"stage": "instruct", "lora": True, "packing": True}, "give one of them"),
    ({"stage": "instruct", "lora": True, "distill_weight": 0.0}, "must be more than 0"),
])  # fmt: skip
def test_distill_text_refuses_what_it_cannot_do(tmp_path, asset_dir, options, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, asset_dir, tmp_path / "d.json", tmp_path, distill_text=True, **options)
