"""examples/quickstart.ipynb: committed without outputs, and runs top to bottom on the real built-ins."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

from minillava.eval.metrics import exact_match

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "examples" / "quickstart.ipynb"


def test_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """Run the notebook as a user would from examples/ (beside images/), in a scratch copy of that layout."""
    from nbclient import NotebookClient

    work = tmp_path_factory.mktemp("notebook")
    shutil.copytree(REPO / "examples" / "images", work / "images")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel is a fresh process: point it at this checkout's minillava, whatever is pip-installed.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    client = NotebookClient(nb, kernel_name="python3", timeout=1800, resources={"metadata": {"path": str(work)}})
    client.execute(env=os.environ | {"PYTHONPATH": path})
    printed = "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "stream" and out.name == "stdout"
    )
    yield work, printed
    shutil.rmtree(work)  # three model directories of about 600 MB each


def test_image_tokens_and_splice(executed):
    _, printed = executed
    # 112 px / 14 px patches = 8 x 8 = 64 DINOv2-S features of 384; avgpool 2 x 2 -> 16 tokens of SmolLM2's 576
    assert re.search(r"pixel_values +\(1, 3, 112, 112\)", printed)
    assert re.search(r"patch features +\(1, 64, 384\)", printed)
    assert re.search(r"image tokens +\(1, 16, 576\)", printed)
    assert "<image> ids 16" in printed and "[<image> x 16]" in printed
    assert "image slots hold the image tokens: True" in printed
    assert "other positions hold text embeddings: True" in printed
    assert "supervised: 'A cat.<|im_end|>" in printed


def test_text_generation_survives_the_new_token(executed):
    _, printed = executed
    assert re.search(r"text only :.*Paris", printed)


def step_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["event"] == "step"]


def test_training_stages(executed):
    work, printed = executed
    align = step_losses(work / "quickstart-run" / "align")
    assert len(align) == 10 and sum(align[-3:]) < sum(align[:3]), align  # the projector learns
    instruct = step_losses(work / "quickstart-run" / "instruct")
    assert len(instruct) == 10 and instruct[-1] < instruct[0], instruct  # the answer format, at least
    counts = re.search(r"trainable ([\d,]+) of ([\d,]+) parameters", printed).group(1, 2)
    trainable, total = (int(c.replace(",", "")) for c in counts)
    assert 0 < trainable < total / 10  # LoRA + projector, not the whole LLM


def test_evaluation(executed):
    """Every question of each split is scored, and the answers printed are the last split's, beside their truth
    (ten steps teach the answer format, not the pictures, and precision follows the CPU: the accuracy printed is
    checked against the answers given, re-scored here, not against a floor)."""
    work, printed = executed
    found = re.findall(r"(test|combo): exact match ([\d.]+) on (\d+) questions", printed)
    assert [split for split, _, _ in found] == ["test", "combo"]
    data = work / "quickstart-run" / "data"
    for split, acc, n in found:
        questions = [json.loads(line) for line in (data / f"{split}.jsonl").read_text().splitlines()]
        answers = [json.loads(line) for line in (work / "quickstart-run" / f"answers-{split}.jsonl").open()]
        assert int(n) == len(questions) == len(answers), split
        # the printed accuracy is the exact-match score of the answers the model gave, every question once
        assert sorted(a["question_id"] for a in answers) == sorted(q["question_id"] for q in questions)
        truth = {q["question_id"]: q["answers"] for q in questions}
        rescored = sum(exact_match(a["prediction"], truth[a["question_id"]]) for a in answers) / len(answers)
        assert float(acc) == pytest.approx(rescored, abs=0.005), split
    lines = re.findall(r"^  ('.*'|\".*\") -> .* \(truth ('.*'|\".*\")\)$", printed, flags=re.M)
    shown = [(ast.literal_eval(q), ast.literal_eval(t)) for q, t in lines]  # printed with !r
    combo = [json.loads(line) for line in (data / "combo.jsonl").read_text().splitlines()]
    assert len(shown) == 4 and all(any(r["question"] == q and t in r["answers"] for r in combo) for q, t in shown)
