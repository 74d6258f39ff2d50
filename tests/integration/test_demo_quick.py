"""`minillava demo --quick` end to end on the real built-ins: every artefact it promises is there and usable."""

import json
from pathlib import Path

from minillava.cli import main
from minillava.demo import phrasing
from minillava.eval.metrics import exact_match, wilson_interval


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "sample conversations" in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report["eval"]) >= {"test", "phrasing", "combo", "shift", "mixed"}
    for split in report["eval"].values():
        low, high = split["ci95"]
        assert 0.0 <= low <= split["accuracy"] <= high <= 1.0 and split["n"] > 0 and split["by_type"]
    text = report["text_retention"]
    assert text["n"] >= 30 and 0.0 <= text["after"] <= 1.0 and text["before"] > 0.8  # the base LLM knows them
    assert text["dtype"] in ("float32", "bfloat16") and len(text["responses_before"]) == text["n"]
    assert json.loads((out / "data" / "text_replay.json").read_text())  # the base LLM's own answers, replayed
    assert report["instruct"]["steps"] == 4 and report["align"] is None  # single-stage: no align run
    assert report["instruct"]["word_warmup"]["objective"] == "caption"
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == sum(s["n"] for s in report["eval"].values())
    check_scores(report, predictions, out / "data")
    assert (out / "loss_curve.png").stat().st_size > 1000 and (out / "heldout_grid.png").stat().st_size > 1000
    # the trained model is a normal model directory: generate reads it directly
    image = out / "data" / predictions[0]["image"]
    question = ["--prompt", "What shape is in the image?", "--max-new-tokens", "4"]
    assert main(["generate", "--model", str(out / "model"), "--image", str(image), *question]) == 0


def check_scores(report: dict, predictions: list[dict], data: Path) -> None:
    """Every answer is scored by the rule the docs state, and each split's figures follow from those scores:
    exact match against every accepted form, descriptions by their facts; Wilson intervals of the counts."""
    questions = {}
    for split in report["eval"]:
        for line in (data / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            questions[split, row["question_id"]] = row
    for p in predictions:
        row = questions[p["split"], p["question_id"]]
        if p["category"] == "describe":
            expected = float(phrasing.describes(p["prediction"], row["facts"]))
        else:
            expected = exact_match(p["prediction"], row.get("answers") or [row["answer"]])
        assert p["score"] == expected, p
    for split, figures in report["eval"].items():
        scores = [p["score"] for p in predictions if p["split"] == split]
        assert figures["n"] == len(scores) and abs(figures["accuracy"] - sum(scores) / len(scores)) < 1e-9
        assert figures["ci95"] == list(wilson_interval(sum(scores), len(scores)))
