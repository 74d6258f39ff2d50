"""Data formats, label masks token by token, the grouped sampler, and every `data check` bad case."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minillava.data.check import check_data
from minillava.data.dataset import Collator, SupervisedDataset
from minillava.data.formats import BadSampleError, load_records
from minillava.data.packing import next_fit_rows, padding_waste
from minillava.data.sampler import GroupedBatchSampler, TokenBudgetSampler, global_batches
from minillava.processor import IGNORE_INDEX
from minillava.train.cli import main as cli_main


def _img(path: Path, rgb=(200, 10, 10)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), rgb).save(path)
    return path.name


def _turns(*pairs):
    return [{"from": who, "value": text} for who, text in pairs]


def test_formats_llava_coco_captions(tmp_path):
    a = _img(tmp_path / "a.png")
    (tmp_path / "l.jsonl").write_text(
        json.dumps({"id": 1, "image": a, "conversations": _turns(("human", "<image>\nq"), ("gpt", "ans"))}) + "\n"
        + json.dumps({"id": "t", "conversations": _turns(("human", "hi"), ("gpt", "yo"))}) + "\n"
    )  # fmt: skip
    recs = load_records(tmp_path / "l.jsonl")
    assert [r.id for r in recs] == ["1", "t"] and recs[0].images == [a] and recs[1].images == []
    assert recs[0].messages[1] == {"role": "assistant", "content": "ans"} and not any(r.error for r in recs)
    coco = {"images": [{"id": 7, "file_name": a}], "annotations": [{"id": 70, "image_id": 7, "caption": " A dog. "},
                                                                    {"id": 71, "image_id": 8, "caption": "x"}]}
    (tmp_path / "captions_train.json").write_text(json.dumps(coco))
    recs = load_records(tmp_path / "captions_train.json")
    assert recs[0].messages == [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "A dog."}]
    assert "image_id 8" in recs[1].error
    (tmp_path / "c.csv").write_text(f"image,caption\n{a},a red thing\n{a},\n")
    recs = load_records(tmp_path / "c.csv")
    assert recs[0].images == [a] and recs[1].error == "empty caption" and recs[1].source.endswith("c.csv:3")
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": a, "caption": "red"}) + "\n")
    assert load_records(tmp_path / "c.jsonl")[0].messages[1]["content"] == "red"
    (tmp_path / "odd.json").write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(ValueError, match="unknown data format"):
        load_records(tmp_path / "odd.json")


def test_label_mask_multi_turn_multi_image_token_by_token(tiny, tmp_path):
    model, processor = tiny
    a, b = _img(tmp_path / "a.png"), _img(tmp_path / "b.png", (0, 0, 250))
    row = {"id": "mm", "image": [a, b], "conversations": _turns(
        ("system", "Be brief."), ("human", "<image>\nwhat is this?"), ("gpt", "a red square"),
        ("human", "and <image>?"), ("gpt", "hello world"))}  # fmt: skip
    (tmp_path / "d.json").write_text(json.dumps([row]))
    item = SupervisedDataset(tmp_path / "d.json", processor, tmp_path)[0]
    tok, n = processor.tokenizer, processor.tokens_per_image
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    img = [processor.image_token_id] * n
    # expected ids and labels, piece by piece (ChatML template of the tiny tokenizer)
    pieces = [
        (enc("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"), False), (img, False),
        (enc("\nwhat is this?<|im_end|>\n<|im_start|>assistant\n"), False), (enc("a red square<|im_end|>"), True),
        (enc("\n<|im_start|>user\nand "), False), (img, False), (enc("?<|im_end|>\n<|im_start|>assistant\n"), False),
        (enc("hello world<|im_end|>"), True), (enc("\n"), False),
    ]  # fmt: skip
    ids = [t for p, _ in pieces for t in p]
    labels = [t if sup else IGNORE_INDEX for p, sup in pieces for t in p]
    assert item.encoded.input_ids == ids
    assert item.encoded.labels == labels
    assert item.encoded.pixel_values.shape[0] == 2
    batch = Collator(processor)([item, item])
    assert batch["pixel_values"].shape[0] == 4 and batch["labels"].shape == batch["input_ids"].shape


def test_bad_samples_raise_with_file_id_reason_or_skip(tiny, tmp_path):
    _, processor = tiny
    a = _img(tmp_path / "a.png")
    rows = [{"id": "ok", "image": a, "conversations": _turns(("human", "<image>"), ("gpt", "x"))},
            {"id": "two", "image": a, "conversations": _turns(("human", "<image><image>"), ("gpt", "x"))}]  # fmt: skip
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds = SupervisedDataset(tmp_path / "d.json", processor, tmp_path)
    with pytest.raises(BadSampleError, match=r"d\.json:\[1\] \(id two\): 2 <image> markers in the text but 1 images"):
        ds[1]
    ds = SupervisedDataset(tmp_path / "d.json", processor, tmp_path, on_bad_sample="skip")
    batch = Collator(processor)([ds[0], ds[1]])
    assert batch["num_samples"] == 1 and batch["skipped"][0].id == "two"


def test_grouped_sampler_groups_resumes_and_splits_ranks():
    lengths = [100, 90, -10, 80, -12, 70, 60, -14, 50, -16]  # 6 image, 4 text-only
    chunks = global_batches(lengths, 2, seed=0, epoch=0)
    assert sorted(i for c in chunks for i in c) == list(range(10))
    assert all(len({lengths[i] > 0 for i in c}) == 1 for c in chunks)  # never mixed while both have full batches
    assert all(abs(lengths[c[0]]) >= abs(lengths[c[-1]]) for c in chunks)
    assert global_batches(lengths, 2, 0, 0) == chunks and global_batches(lengths, 2, 0, 1) != chunks
    one = list(GroupedBatchSampler(lengths, 4, seed=3))
    ranks = [list(GroupedBatchSampler(lengths, 2, world_size=2, rank=r, seed=3)) for r in (0, 1)]
    for k, batch in enumerate(one[:-1]):  # full global batches: the ranks' halves make up the single batch
        assert sorted(ranks[0][k] + ranks[1][k]) == sorted(batch)
    s = GroupedBatchSampler(lengths, 2, grad_accum=2, seed=3)
    s.set_epoch(0, start_step=1)
    assert list(s) == list(GroupedBatchSampler(lengths, 2, grad_accum=2, seed=3))[2:] and len(s) == 4


def _skewed_lengths(n: int = 600, seed: int = 0) -> list[int]:
    """LLaVA-665k-like token counts: mostly one image + a short answer (~250-650), some long conversations up to
    the 1024 cut, a few short text-only samples."""
    rng = np.random.default_rng(seed)
    body = rng.lognormal(np.log(420), 0.3, n).astype(int)
    long = rng.integers(700, 1025, n)
    short = rng.integers(20, 120, n)
    pick = rng.random(n)
    return [int(min(1024, max(8, x))) for x in np.where(pick < 0.1, long, np.where(pick < 0.16, short, body))]


def test_token_budget_batches_fill_their_rows():
    """--packing takes as many samples as fit `rows` rows of the budget: <= 5 % padding on skewed lengths, where
    a fixed 4 samples a micro-batch packed leaves far more (rows padded to the longest, part empty)."""
    lengths = _skewed_lengths()
    filled = TokenBudgetSampler(lengths, 4, 1024, seed=1).epoch_batches(0)
    assert all(len(next_fit_rows([lengths[i] for i in b], 1024)) <= 4 for b in filled)  # the collator's rows
    fixed = [[lengths[i] for i in c] for c in global_batches(lengths, 4, seed=1, epoch=0)]
    waste = padding_waste([[lengths[i] for i in b] for b in filled], 1024)
    assert waste <= 0.05 < 0.10 < padding_waste(fixed, 1024), (waste, padding_waste(fixed, 1024))


def test_token_budget_sampler_sees_every_sample_once_resumes_and_splits_ranks():
    lengths = _skewed_lengths(200, seed=2)
    one = TokenBudgetSampler(lengths, 2, 1024, grad_accum=2, seed=3)
    batches = list(one)
    assert sorted(i for b in batches for i in b) == list(range(200))  # every sample once in the epoch
    assert batches == list(TokenBudgetSampler(lengths, 2, 1024, grad_accum=2, seed=3))  # (seed, epoch) only
    one.set_epoch(1)
    assert list(one) != batches and sorted(i for b in one for i in b) == list(range(200))
    one.set_epoch(0, start_step=3)  # resume: the same micro-batches from step 3 on
    assert list(one) == batches[3 * 2 :] and len(one) == len(batches) - 6
    ranks = [list(TokenBudgetSampler(lengths, 2, 1024, world_size=2, rank=r, seed=3)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) and all(b for r in ranks for b in r)  # every rank has work each time
    full = [b for b in batches if b]
    assert [b for pair in zip(*ranks, strict=True) for b in pair][: len(full)] == full  # a step's batches, shared


@pytest.mark.parametrize("world", [2, 3])
def test_token_budget_ranks_fill_the_epochs_tail_with_its_first_micro_batches(world):
    """201 samples give 49 micro-batches: the last step has work for fewer ranks than there are, and the others
    take the epoch's first micro-batches again (what the DDP/FSDP/DeepSpeed packing tests rely on); one process
    gets an empty micro-batch there instead."""
    lengths = _skewed_lengths(201, seed=2)
    full = TokenBudgetSampler(lengths, 2, 1024, seed=3).epoch_batches(0)
    ranks = [list(TokenBudgetSampler(lengths, 2, 1024, world_size=world, rank=r, seed=3)) for r in range(world)]
    steps = [b for step in zip(*ranks, strict=True) for b in step]
    tail = steps[len(full) :]
    assert len(full) == 49 and len(tail) == world - 1
    assert steps[: len(full)] == full and tail == full[: len(tail)]
    assert list(TokenBudgetSampler(lengths, 2, 1024, grad_accum=2, seed=3))[-1] == []


def test_data_check_reports_every_bad_case(tiny, tmp_path, capsys):
    model, processor = tiny
    a = _img(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png at all")
    ok = _turns(("human", "<image>\nq"), ("gpt", "a"))
    rows = [
        {"id": "good", "image": a, "conversations": ok},
        {"id": "text", "conversations": _turns(("human", "hi"), ("gpt", "yo"))},
        {"id": "missing", "image": "nope.png", "conversations": ok},
        {"id": "unreadable", "image": "broken.png", "conversations": ok},
        {"id": "count", "image": [a, a], "conversations": ok},
        {"id": "empty", "image": a, "conversations": _turns(("human", "<image>"), ("gpt", "  "))},
        {"id": "order", "image": a, "conversations": _turns(("gpt", "<image>"), ("human", "x"))},
        {"id": "lastq", "image": a, "conversations": _turns(("human", "<image>"), ("gpt", "a"), ("human", "b"))},
        {"id": "role", "conversations": _turns(("bot", "x"), ("gpt", "y"))},
        {"id": "noconv", "image": a},
        {"id": "long", "image": a, "conversations": _turns(("human", "<image>" + " hello" * 300), ("gpt", "a"))},
    ]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(rows))
    checker = processor.with_template("chatml")
    checker.max_length = 64
    report = check_data([data], tmp_path / "img", checker)
    text = report.format(max_errors=50)
    assert report.samples == 11 and report.text_only == 1 and not report.ok
    bad = {e.split("(id ")[1].split(")")[0] for e in report.errors}
    assert bad == {"missing", "unreadable", "count", "empty", "order", "lastq", "role", "noconv", "long"}
    for needle in ("nope.png not found", "not a readable image", "1 <image> markers in the text but 2 images",
                   "is empty", "turns out of order", "last turn is not an answer", "unknown speaker", "conversations",
                   "exceed max_length 64", "tokens after image expansion: min"):  # fmt: skip
        assert needle in text, needle
    # the CLI: a summary, exit 1 on errors and 0 on a clean file
    assert cli_main(["data", "check", str(data), "--image-root", str(tmp_path / "img")]) == 1
    out = capsys.readouterr().out
    assert "samples: 11 (9 with images, 1 text-only)" in out and "errors: 8 bad samples" in out  # long: not tokenised
    data.write_text(json.dumps(rows[:2]))
    model.save_pretrained(tmp_path / "m", processor)
    assert cli_main(["data", "check", str(data), "--image-root", str(tmp_path / "img"), "--model",
                     str(tmp_path / "m")]) == 0  # fmt: skip
    assert "no errors" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "conversations": []}\n{oops\n')
    assert cli_main(["data", "check", str(tmp_path / "bad.jsonl")]) == 1
    assert "bad.jsonl:2: not valid JSON: Expecting property name" in capsys.readouterr().out
    assert cli_main(["data", "check", str(tmp_path / "none.json")]) == 1
    assert "data file not found" in capsys.readouterr().err


def _sample(sid, image=None):
    row = {"id": sid, "conversations": _turns(("human", ("<image>\n" if image else "") + "q"), ("gpt", "a"))}
    return {**row, "image": image} if image else row


def test_jsonl_bad_utf8_or_json_line_is_one_bad_sample_at_its_line(tiny, tmp_path, capsys):
    _, processor = tiny
    a = _img(tmp_path / "a.png")
    good = json.dumps(_sample("g1", a)).encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(good + b"\n\n" + b'{"id": "x\xff\xfe", "conversations": []}\n' + b"{oops\n"
                     + json.dumps(_sample("g2", a)).encode() + b"\n")  # fmt: skip
    recs = load_records(path)
    assert [r.source.rsplit(":", 1)[1] for r in recs] == ["1", "3", "4", "5"]
    assert recs[1].error.startswith("not valid UTF-8") and recs[2].error.startswith("not valid JSON")
    ds = SupervisedDataset(path, processor, tmp_path)
    with pytest.raises(BadSampleError) as e:
        ds[1]
    assert str(e.value).startswith(f"bad sample {path}:3: not valid UTF-8") and "\n" not in str(e.value)
    with pytest.raises(BadSampleError, match=r"d\.jsonl:4: not valid JSON"):
        ds[2]
    ds = SupervisedDataset(path, processor, tmp_path, on_bad_sample="skip")
    batch = Collator(processor)([ds[i] for i in range(4)])
    assert batch["ids"] == ["g1", "g2"] and [s.where for s in batch["skipped"]] == [f"{path}:3", f"{path}:4"]
    assert batch["skipped"][0].reason.startswith("not valid UTF-8")
    assert cli_main(["data", "check", str(path), "--image-root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:3: not valid UTF-8" in out and f"{path}:4: not valid JSON" in out and "samples: 4" in out
    # a JSON list: one bad byte spoils the document; the error names the file, byte offset and line
    (tmp_path / "d.json").write_bytes(b'[\n{"id": "a"},\n{"id": "\xff"}]')
    with pytest.raises(ValueError, match=r"d\.json: not valid UTF-8 at byte offset 23 \(line 3\)"):
        load_records(tmp_path / "d.json")
    assert cli_main(["data", "check", str(tmp_path / "d.json")]) == 1
    assert "d.json: not valid UTF-8 at byte offset 23 (line 3)" in capsys.readouterr().err


def test_jsonl_positions_are_1_based_lines_everywhere(tiny, tmp_path, capsys):
    _, processor = tiny
    a = _img(tmp_path / "a.png")
    path = tmp_path / "d.jsonl"
    bad = {"id": "two", "image": a, "conversations": _turns(("human", "<image><image>"), ("gpt", "x"))}
    path.write_text("\n" + json.dumps(_sample("ok", a)) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(BadSampleError, match=r"d\.jsonl:4 \(id two\): 2 <image> markers"):
        SupervisedDataset(path, processor, tmp_path)[1]
    skipped = SupervisedDataset(path, processor, tmp_path, on_bad_sample="skip")[1]
    assert skipped.where == f"{path}:4"
    report = check_data([path], tmp_path)
    assert report.errors == [f"{path}:4 (id two): 2 <image> markers in the text but 1 images"]
    # a JSON list: by 0-based index, written "file:[i]" so that it never reads as a line
    (tmp_path / "d.json").write_text(json.dumps([_sample("ok", a), bad]))
    assert check_data([tmp_path / "d.json"], tmp_path).errors[0].startswith(f"{tmp_path / 'd.json'}:[1] (id two): ")


def test_image_paths_leaving_the_image_root_are_bad_unless_allowed(tiny, tmp_path, capsys):
    _, processor = tiny
    root = tmp_path / "root"
    a = _img(root / "a.png")
    _img(tmp_path / "outside.png")
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    rows = [_sample("rel", a), _sample("abs-inside", str(root / a)), _sample("up", "../outside.png"),
            _sample("abs-outside", str(tmp_path / "outside.png")), _sample("link", "link.png")]  # fmt: skip
    data = tmp_path / "d.json"
    data.write_text(json.dumps(rows))
    ds = SupervisedDataset(data, processor, root)
    ds[0], ds[1]  # inside the root, relative or absolute: fine
    with pytest.raises(BadSampleError, match=r"d\.json:\[2\] \(id up\): image path leaves the image root: \.\./out"):
        ds[2]
    ds = SupervisedDataset(data, processor, root, on_bad_sample="skip")
    skipped = Collator(processor)([ds[i] for i in range(5)])["skipped"]
    assert [s.id for s in skipped] == ["up", "abs-outside", "link"]
    assert all(s.reason.startswith("image path leaves the image root: ") for s in skipped)
    ds = SupervisedDataset(data, processor, root, allow_outside_image_root=True)
    assert all(ds[i].encoded.pixel_values.shape[0] == 1 for i in range(5))
    report = check_data([data], root)
    assert sorted(e.split("(id ")[1].split(")")[0] for e in report.errors) == ["abs-outside", "link", "up"]
    assert check_data([data], root, allow_outside_image_root=True).ok
    assert cli_main(["data", "check", str(data), "--image-root", str(root)]) == 1
    assert "image path leaves the image root: ../outside.png" in capsys.readouterr().out
    assert cli_main(["data", "check", str(data), "--image-root", str(root), "--allow-outside-image-root"]) == 0
    import argparse

    from minillava.train.cli import add_train_parser
    from minillava.train.config import TrainConfig

    assert TrainConfig().allow_outside_image_root is False
    sub = argparse.ArgumentParser().add_subparsers()
    add_train_parser(sub)
    args = sub.choices["train"].parse_args(["--allow-outside-image-root"])
    assert args.allow_outside_image_root is True


def test_duplicate_ids_warned_once_and_reported_by_data_check(tmp_path, caplog, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(_sample(s)) + "\n" for s in ["a", "b", "a", "c", "b", "a"]))
    with caplog.at_level("WARNING", logger="minillava"):
        recs = load_records(path)
    assert len(recs) == 6
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{path}: 2 duplicate sample ids: 'a' (x3), 'b' (x2)"]
    report = check_data([path])
    assert report.ok and report.duplicates == [f"{path}: 2 duplicate sample ids: 'a' (x3), 'b' (x2)"]
    assert cli_main(["data", "check", str(path)]) == 0
    assert "warning: " + report.duplicates[0] in capsys.readouterr().out
