"""--packing: rows of several samples with block-diagonal causal attention and per-sample positions.

Packed and unpacked batches must give the same per-sample losses and gradients (float32, 1e-5 relative), no
packed sample may see another (its logits are bit-identical whatever the others hold), and a packed run
trains and resumes exactly like any other.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from train_helpers import config, write_images, write_llava

from minillava.data.dataset import Collator, SupervisedDataset
from minillava.data.packing import (
    block_causal_mask,
    next_fit_rows,
    padding_waste,
    positions_from_segments,
)
from minillava.processor import IGNORE_INDEX
from minillava.train.config import TrainConfig
from minillava.train.loop import train

TEXT_ONLY = [
    ("t-short", "yes", "no"),
    ("t-long", "What is in the picture? describe the image", "a red square on the left of a blue circle, two three"),
]


def _write_data(tmp_path):
    names = write_images(tmp_path / "images")
    path = write_llava(tmp_path / "d.json", names)
    rows = json.loads(path.read_text())
    rows += [{"id": i, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
             for i, q, a in TEXT_ONLY]  # fmt: skip
    path.write_text(json.dumps(rows))
    return path, tmp_path / "images"


@pytest.fixture(scope="module")
def setup(build_tiny, tmp_path_factory):
    """A fresh tiny model (float32, every part trainable), its processor and the 7 samples' items."""
    model, processor = build_tiny()
    path, images = _write_data(tmp_path_factory.mktemp("packing"))
    dataset = SupervisedDataset(path, processor, images)
    return model, processor, [dataset[i] for i in range(len(dataset))]


def _forward(model, batch, packed: bool):
    return model(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"],
                 labels=batch["labels"], image_counts=batch["image_counts"],
                 segment_ids=batch["segment_ids"] if packed else None)  # fmt: skip


def _spans(batch) -> dict[str, tuple[int, int, int]]:
    """Sample id -> (row, start, length) in a packed batch (its samples are listed in row order)."""
    out, k = {}, 0
    for r, row in enumerate(batch["rows"]):
        at = 0
        for segment in range(1, len(row) + 1):
            n = int((batch["segment_ids"][r] == segment).sum())
            out[batch["ids"][k]] = (r, at, n)
            at, k = at + n, k + 1
    return out


def _sample_losses(logits, labels, where: dict[str, tuple[int, int, int]], own_labels) -> dict[str, torch.Tensor]:
    """Summed next-token loss of each sample over its own span; targets from the sample's own labels."""
    out = {}
    for sid, (r, a, n) in where.items():
        targets = own_labels[sid][1:n]
        keep = targets != IGNORE_INDEX
        out[sid] = F.cross_entropy(logits[r, a : a + n - 1][keep].float(), targets[keep], reduction="sum")
    return out


def test_rows_follow_the_order_balanced_and_budget_error():
    assert next_fit_rows([5, 3, 4, 4], 8) == [[0, 1], [2, 3]]  # the sampler's rows, in order
    assert next_fit_rows([5, 3, 4, 2], 8) == [[0, 3], [1, 2]]  # 8 + 6 evened out to 7 + 7: width 7, not 8
    assert next_fit_rows([8, 8], 8) == [[0], [1]]
    with pytest.raises(ValueError, match="sample big has 9 tokens, more than --max-tokens-per-batch 8"):
        next_fit_rows([3, 9], 8, ["a", "big"])
    assert padding_waste([[4, 2]]) == pytest.approx(0.25)  # padded: 8 slots, 6 real
    assert padding_waste([[4, 2]], budget=6) == 0.0  # packed: one row of 6


def test_positions_restart_and_mask_is_block_diagonal_causal():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0]])
    assert positions_from_segments(seg).tolist() == [[0, 1, 2, 0, 1, 0]]
    mask = block_causal_mask(seg, torch.float32, additive=False)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)  # fmt: skip
    assert torch.equal(mask, expected)
    additive = block_causal_mask(seg, torch.float32, additive=True)[0, 0]
    assert torch.equal(additive == 0, expected) and (additive[~expected] == torch.finfo(torch.float32).min).all()


def test_packed_batch_keeps_every_sample_and_its_boundaries(setup):
    _, processor, items = setup
    budget = max(len(it.encoded.input_ids) for it in items) + 12
    batch = Collator(processor, budget)(items)
    plain = {it.id: it.encoded for it in items}
    assert sorted(batch["ids"]) == sorted(plain) and batch["input_ids"].shape[0] < len(items)
    assert int(batch["attention_mask"].sum()) == sum(len(e.input_ids) for e in plain.values())
    assert (batch["attention_mask"].sum(-1) <= budget).all()
    where = _spans(batch)
    for sid, (r, a, n) in where.items():
        enc = plain[sid]
        assert n == len(enc.input_ids)
        assert batch["input_ids"][r, a : a + n].tolist() == enc.input_ids
        assert batch["position_ids"][r, a : a + n].tolist() == list(range(n))  # restart at 0 per sample
        assert batch["labels"][r, a].item() == IGNORE_INDEX  # never the previous sample's target
        assert batch["labels"][r, a + 1 : a + n].tolist() == enc.labels[1:]
    assert torch.equal(positions_from_segments(batch["segment_ids"]), batch["position_ids"])
    tail = batch["segment_ids"] == 0
    assert (batch["labels"][tail] == IGNORE_INDEX).all() and (batch["input_ids"][tail] == processor.pad_token_id).all()
    images = {it.id: len(it.features) for it in items}
    where_rows = [[sid for sid, (r2, _, _) in where.items() if r2 == r] for r in range(len(batch["rows"]))]
    per_row = [sum(images[sid] for sid in sids) for sids in where_rows]
    assert batch["image_counts"].tolist() == per_row
    # the supervised tokens the loss is normalised by are exactly the unpacked batch's
    unpacked = Collator(processor)(items)
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == int((unpacked["labels"][:, 1:] != IGNORE_INDEX).sum())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_unpacked_give_the_same_losses_and_gradients(setup, attn):
    model, processor, items = setup
    model.llm.config._attn_implementation = attn
    try:
        budget = max(len(it.encoded.input_ids) for it in items) + 12
        unpacked, packed = Collator(processor)(items), Collator(processor, budget)(items)
        results = []
        for batch, is_packed in ((unpacked, False), (packed, True)):
            model.zero_grad(set_to_none=True)
            out = _forward(model, batch, is_packed)
            out.loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((out, grads))
    finally:
        model.llm.config._attn_implementation = "sdpa"
    (u, gu), (p, gp) = results
    assert u.num_supervised == p.num_supervised
    torch.testing.assert_close(p.loss, u.loss, rtol=1e-5, atol=0)
    assert gu.keys() == gp.keys() and len(gu) > 10
    for name, g in gu.items():
        err = (gp[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert err < 1e-5, f"{name}: relative gradient error {err:.2e}"
    own = {it.id: torch.tensor(it.encoded.labels) for it in items}
    row_of = {sid: (i, 0, len(own[sid])) for i, sid in enumerate(unpacked["ids"])}
    per_u = _sample_losses(u.logits.detach(), unpacked["labels"], row_of, own)
    per_p = _sample_losses(p.logits.detach(), packed["labels"], _spans(packed), own)
    for sid in own:
        torch.testing.assert_close(per_p[sid], per_u[sid], rtol=1e-5, atol=0)


def test_perturbing_one_sample_leaves_the_others_bit_identical(setup):
    model, processor, items = setup
    budget = sum(len(it.encoded.input_ids) for it in items)  # one row: every sample next to every other
    batch = Collator(processor, budget)(items)
    assert batch["input_ids"].shape[0] == 1
    where = _spans(batch)
    victim = next(sid for sid in batch["ids"] if sid.startswith("cap-"))
    r, a, n = where[victim]
    changed = dict(batch, input_ids=batch["input_ids"].clone(), pixel_values=batch["pixel_values"].clone())
    text = changed["input_ids"][r, a : a + n]
    text[text != processor.image_token_id] = (text[text != processor.image_token_id] + 7) % 300
    k = [s for s in batch["ids"] if s.startswith("cap-")].index(victim)  # its image, in reading order
    changed["pixel_values"][k] = torch.randn_like(changed["pixel_values"][k])
    with torch.no_grad():
        before, after = _forward(model, batch, True).logits, _forward(model, changed, True).logits
    assert not torch.equal(before[r, a : a + n], after[r, a : a + n])  # the test can see a change
    for sid, (r2, a2, n2) in where.items():
        if sid != victim:
            assert torch.equal(before[r2, a2 : a2 + n2], after[r2, a2 : a2 + n2]), sid


def test_without_the_mask_samples_would_leak(setup):
    """The check above can fail: with plain causal attention over the packed row the later samples change."""
    model, processor, items = setup
    batch = Collator(processor, sum(len(it.encoded.input_ids) for it in items))(items)
    with torch.no_grad():
        masked = _forward(model, batch, True).logits
        leaky = model(batch["input_ids"], pixel_values=batch["pixel_values"], image_counts=batch["image_counts"],
                      position_ids=batch["position_ids"]).logits  # fmt: skip
    r, a, n = list(_spans(batch).values())[-1]
    assert not torch.allclose(masked[r, a : a + n], leaky[r, a : a + n])


def _run_cfg(tmp_path, asset_dir, name, path, images, **kw):
    common = dict(stage="instruct", lora=True, lora_dropout=0.0, lr=1e-3, projector_lr=1e-3, batch_size=3,
                  max_steps=4, grad_checkpointing=True, feature_cache=str(tmp_path / "fc"))  # fmt: skip
    return config(tmp_path / name, asset_dir, path, images, **{**common, **kw})


# token-budget batches: 1 row of 128 tokens a micro-batch, 3 per step: the 7 samples (293 tokens) fill 3 rows, so
# every step is the whole data set, as one padded batch of 7 is
PACKED = dict(packing=True, max_tokens_per_batch=128, batch_size=1, grad_accum=3)


def test_packed_run_trains_like_the_padded_one_and_resumes_exactly(tmp_path, asset_dir):
    path, images = _write_data(tmp_path)
    padded = train(_run_cfg(tmp_path, asset_dir, "padded", path, images, batch_size=7))
    packed = train(_run_cfg(tmp_path, asset_dir, "packed", path, images, **PACKED))
    torch.testing.assert_close(torch.tensor(packed["losses"]), torch.tensor(padded["losses"]), rtol=1e-5, atol=0)
    assert 0 <= packed["padding"] < padded["padding"]  # the metric the packing exists for, measured per run
    steps = [json.loads(x) for x in (tmp_path / "packed" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["padding"] < 1 for r in steps if r.get("event") == "step")
    assert packed["feature_cache"]["hits"] > 0  # later epochs read the cache through the packed collator
    halted = train(_run_cfg(tmp_path, asset_dir, "resumed", path, images, save_every=2, halt_at_step=3, **PACKED))
    assert halted["halted"] and halted["losses"] == packed["losses"][:3]
    resumed = train(_run_cfg(tmp_path, asset_dir, "resumed", path, images, resume="latest", **PACKED))
    assert resumed["losses"] == packed["losses"][2:]  # exact: from the step-2 checkpoint


def test_a_sample_longer_than_the_budget_is_named(tmp_path, asset_dir):
    path, images = _write_data(tmp_path)
    message = r"--packing: sample cap-\w+ has \d+ tokens, more than --max-tokens-per-batch 20"
    with pytest.raises(ValueError, match=message):
        train(_run_cfg(tmp_path, asset_dir, "x", path, images, packing=True, max_tokens_per_batch=20, max_steps=1))


def test_max_tokens_per_batch_needs_packing():
    cfg = TrainConfig(vision="v", llm="l", data=["d.json"], max_tokens_per_batch=64)
    with pytest.raises(ValueError, match="--max-tokens-per-batch sizes packed rows: give it with --packing"):
        cfg.validate()


def test_each_samples_first_token_is_never_a_target():
    """Even when a sample's own first label is supervised, packing must not train the previous sample's last
    token to predict it."""
    from minillava.data.packing import pack_batch

    batch = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]), "labels": torch.tensor([[5, 6, 7], [8, 9, -100]]),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]), "image_counts": torch.tensor([0, 0])}  # fmt: skip
    packed = pack_batch(batch, [[0, 1]], pad_id=0)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert packed["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert packed["segment_ids"].tolist() == [[1, 1, 1, 2, 2]] and packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]


def test_data_check_reports_padded_and_packed_waste():
    from minillava.data.check import CheckReport

    report = CheckReport(lengths=[10, 2, 2, 2], max_length=16)
    line = report.padding_line(batch_size=4)
    assert line == "padding waste (batch 4, length-grouped): padded 60.0%, packed (4 rows of 16 tokens) 0.0%"


def test_ddp_packed_two_processes_match_one_process_accumulating(tmp_path, asset_dir):
    """2 ranks x 1 token-budget micro-batch give the losses of 1 process x 2 accumulated ones: the ranks share a
    step's micro-batches, and the loss is the global token mean."""
    from pathlib import Path

    from test_distributed import _losses, _mixed_data, _torchrun

    path, images = _mixed_data(tmp_path)
    common = dict(stage="instruct", lr=1e-2, projector_lr=1e-2, max_steps=3, packing=True, max_tokens_per_batch=128,
                  batch_size=1)  # fmt: skip
    one = train(config(tmp_path / "one", asset_dir, path, images, grad_accum=2, **common))
    ddp = config(tmp_path / "two", asset_dir, path, images, **common)
    _torchrun(ddp)
    losses = _losses(Path(ddp.out))
    # step 1 is two whole micro-batches on both sides; at the epoch's tail (this small set's step 2) the second
    # rank repeats the epoch's first micro-batch where one process has none, so only step 1 must match
    assert len(losses) == 3 and losses[1] == pytest.approx(one["losses"][0], rel=1e-5)


def test_fsdp_packed_two_processes_match_one_process_accumulating(tmp_path, asset_dir):
    """The same with LoRA under FSDP FULL_SHARD (accelerate's config): packed rows, sharded parameters."""
    from pathlib import Path

    from test_distributed import ACCELERATE, _launch, _losses, _mixed_data, _port

    path, images = _mixed_data(tmp_path)
    common = dict(stage="instruct", lora=True, lora_dropout=0.0, lr=1e-2, projector_lr=1e-2, max_steps=3,
                  packing=True, max_tokens_per_batch=128, batch_size=1)  # fmt: skip
    one = train(config(tmp_path / "one", asset_dir, path, images, grad_accum=2, **common))
    fsdp = config(tmp_path / "two", asset_dir, path, images, **common)
    _launch(["accelerate", "launch", "--config_file", str(ACCELERATE / "fsdp-full-shard.yaml"), "--num_processes",
             "2", "--main_process_port", str(_port())], fsdp)  # fmt: skip
    records = [json.loads(x) for x in (Path(fsdp.out) / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["strategy"] == "fsdp-full-shard" and records[0]["world_size"] == 2
    losses = _losses(Path(fsdp.out))
    assert len(losses) == 3 and losses[1] == pytest.approx(one["losses"][0], rel=1e-5)  # step 1: see the DDP test
