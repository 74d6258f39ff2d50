import gzip
import json

import numpy as np

from minillava.demo import fashion, synthetic


def _answers_by_image(data_dir):
    """{image: {question: answer}} over the training samples."""
    out = {}
    for sample in json.loads((data_dir / "train.json").read_text()):
        (question, answer) = (t["value"] for t in sample["conversations"])
        out.setdefault(sample["image"], {})[question.removeprefix("<image>\n")] = answer
    return out


def _answer(qa, start):
    return next((a for q, a in qa.items() if q.startswith(start)), None)


def _train_pairs(data_dir):
    pairs = set()
    for qa in _answers_by_image(data_dir).values():
        if _answer(qa, "What shape"):
            pairs.add((_answer(qa, "What colour"), _answer(qa, "What shape")))
    return pairs


def test_each_training_sample_is_one_question_about_one_image(tmp_path):
    """As evaluation asks: no earlier answers in the context to copy from (the description repeats them all)."""
    synthetic.generate(tmp_path, 20, 2, 2, side=56, seed=0)
    samples = json.loads((tmp_path / "train.json").read_text())
    assert all(len(s["conversations"]) == 2 and s["conversations"][0]["value"].startswith("<image>\n") for s in samples)
    assert len({s["id"] for s in samples}) == len(samples)
    by_image = _answers_by_image(tmp_path)
    assert len(by_image) == 20
    for qa in by_image.values():  # every image is still asked everything: a description and its attributes
        description = _answer(qa, "Describe")
        assert description and _answer(qa, "What colour") in description


def test_deterministic_and_honest_splits(tmp_path):
    a = synthetic.generate(tmp_path / "a", 60, 10, 10, side=56, seed=3)
    b = synthetic.generate(tmp_path / "b", 60, 10, 10, side=56, seed=3)
    for split in a:
        assert a[split].read_text() == b[split].read_text()
    assert (tmp_path / "a/images/train_00007.png").read_bytes() == (tmp_path / "b/images/train_00007.png").read_bytes()
    assert (
        synthetic.generate(tmp_path / "c", 60, 10, 10, side=56, seed=4)["train"].read_text() != a["train"].read_text()
    )

    train_images = {s["image"] for s in json.loads(a["train"].read_text())}
    for split in ("test", "combo"):
        rows = [json.loads(line) for line in a[split].read_text().splitlines()]
        assert rows and not ({r["image"] for r in rows} & train_images)  # held-out images are never trained on
    assert not (_train_pairs(tmp_path / "a") & synthetic.HELD_OUT_COMBOS)  # never-seen colour-shape pairs
    questions = " ".join(q for qa in _answers_by_image(tmp_path / "a").values() for q in qa)
    assert not [p for p in synthetic.HELD_OUT_COMBOS if " ".join(p) in questions]  # not even named in a question
    combo = [json.loads(line) for line in a["combo"].read_text().splitlines()]
    shapes = {r["answer"] for r in combo if r["category"] == "shape"}
    assert shapes and shapes <= set(synthetic.SHAPES)


def test_answers_match_the_pixels(tmp_path):
    synthetic.generate(tmp_path, 30, 2, 2, side=56, seed=0)
    from PIL import Image

    for image, qa in _answers_by_image(tmp_path).items():
        colour = _answer(qa, "What colour")
        pixels = np.asarray(Image.open(tmp_path / image).convert("RGB")).reshape(-1, 3)
        assert (np.abs(pixels - np.array(synthetic.COLOURS[colour])).sum(1) == 0).any(), image


def _idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_reader_on_idx_files(tmp_path, monkeypatch):
    root = tmp_path / "fm"
    root.mkdir()
    rng = np.random.default_rng(0)
    for official, n in (("train", 30), ("t10k", 20)):
        _idx(root / f"{official}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _idx(root / f"{official}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    monkeypatch.setattr(fashion, "FASHION_DIR", root)
    assert fashion.available(root)
    assert fashion.read_idx(root / "t10k-labels-idx1-ubyte.gz").tolist() == [i % 10 for i in range(20)]
    files = fashion.generate(tmp_path / "out", 12, 6, side=56)
    rows = [json.loads(line) for line in files["fashion"].read_text().splitlines()]
    assert len(rows) == 6 and all(r["answer"] in fashion.CLASSES for r in rows)
    assert len(json.loads(files["fashion_train"].read_text())) == 12


def test_yes_no_questions_are_balanced(tmp_path):
    """With one yes in three, answering "no" to everything scored 67 % and the trained model did just that.
    Training asks both about each image (one yes, one no); evaluation asks one, yes or no at random."""
    synthetic.generate(tmp_path, 400, 300, 2, side=56, seed=0)
    by_image: dict[str, list[str]] = {}
    for s in json.loads((tmp_path / "train.json").read_text()):
        if s["conversations"][0]["value"].startswith("<image>\nIs there"):
            by_image.setdefault(s["image"], []).append(s["conversations"][1]["value"])
    assert len(by_image) > 200 and all(sorted(a) == ["no", "yes"] for a in by_image.values())
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    answers = [r["answer"] for r in test if r["category"] == "yes/no"]
    assert len(answers) > 150 and len(answers) == len({r["image"] for r in test if r["category"] == "yes/no"})
    assert 0.4 < answers.count("yes") / len(answers) < 0.6
    questions = [r["question"] for r in test if r["category"] == "yes/no"]
    assert any(q.startswith("Is there an orange ") for q in questions)
    assert not any(q.startswith("Is there a orange ") for q in questions)
