import gzip
import json

import numpy as np

from minillava.demo import fashion, synthetic


def _train_pairs(data_dir):
    pairs = set()
    for sample in json.loads((data_dir / "train.json").read_text()):
        turns = sample["conversations"]
        shape = (
            next(turns[k + 1]["value"] for k in range(0, len(turns), 2) if "What shape" in turns[k]["value"])
            if any("What shape" in t["value"] for t in turns)
            else None
        )
        colour = next(turns[k + 1]["value"] for k in range(0, len(turns), 2) if "What colour" in turns[k]["value"])
        if shape:
            pairs.add((colour, shape))
    return pairs


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
    combo = [json.loads(line) for line in a["combo"].read_text().splitlines()]
    shapes = {r["answer"] for r in combo if r["category"] == "shape"}
    assert shapes and shapes <= set(synthetic.SHAPES)


def test_answers_match_the_pixels(tmp_path):
    synthetic.generate(tmp_path, 30, 2, 2, side=56, seed=0)
    from PIL import Image

    for sample in json.loads((tmp_path / "train.json").read_text()):
        turns = sample["conversations"]
        colour = next(turns[k + 1]["value"] for k in range(0, len(turns), 2) if "What colour" in turns[k]["value"])
        pixels = np.asarray(Image.open(tmp_path / sample["image"]).convert("RGB")).reshape(-1, 3)
        assert (np.abs(pixels - np.array(synthetic.COLOURS[colour])).sum(1) == 0).any(), sample["id"]


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
