"""`minillava demo --quick` end to end on the real built-ins: every artefact it promises is there and usable."""

import json

from minillava.cli import main


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "sample conversations" in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report["eval"]) >= {"test", "phrasing", "combo", "shift"}
    for split in report["eval"].values():
        low, high = split["ci95"]
        assert 0.0 <= low <= split["accuracy"] <= high <= 1.0 and split["n"] > 0 and split["by_type"]
    text = report["text_retention"]
    assert text["n"] >= 30 and 0.0 <= text["after"] <= 1.0 and text["before"] > 0.8  # the base LLM knows them
    assert json.loads((out / "data" / "text_replay.json").read_text())  # the base LLM's own answers, replayed
    assert report["instruct"]["steps"] == 4 and report["align"] is None  # single-stage: no align run
    assert report["instruct"]["word_warmup"]["objective"] == "caption"
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == sum(s["n"] for s in report["eval"].values())
    assert (out / "loss_curve.png").stat().st_size > 1000 and (out / "heldout_grid.png").stat().st_size > 1000
    # the trained model is a normal model directory: generate reads it directly
    image = out / "data" / predictions[0]["image"]
    question = ["--prompt", "What shape is in the image?", "--max-new-tokens", "4"]
    assert main(["generate", "--model", str(out / "model"), "--image", str(image), *question]) == 0
