"""The eval runner and `minillava eval` on a tiny model: question files, batching, outputs, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from minillava.eval import evaluate, load_samples
from minillava.eval.cli import main as eval_main
from minillava.eval.metrics import vqa_accuracy
from minillava.eval.runner import SHORT_ANSWER, build_prompt

TOKENS = "4"  # answers are capped short: the tiny model rambles, and 2 shared cores are slow


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def vqa_rows(answers: dict[int, list[str]] | None = None) -> list[dict]:
    questions = ["What colour is it?", "Is there a square?", "How many shapes?", "Where is the square?"]
    return [
        {
            "question_id": i,
            "image": f"{colour}.png",
            "question": q,
            "answers": (answers or {}).get(i, ["red"] * 4 + ["blue"] * 6),
            "category": "colour" if i % 2 == 0 else "layout",
        }
        for i, (colour, q) in enumerate(zip(["red", "blue", "green", "yellow"], questions, strict=True))
    ]


# ---- end to end through the command ---------------------------------------------------------------


def test_eval_command_end_to_end(eval_model, eval_model_dir, image_dir, tmp_path, capsys):
    model, processor = eval_model
    # What does the model answer (batch size 1)? Build references around that, so scores are known exactly.
    probe = load_samples(write_jsonl(tmp_path / "probe.jsonl", vqa_rows()), "vqa", image_dir)
    _, first = evaluate(model, processor, probe, "vqa", batch_size=1, max_new_tokens=int(TOKENS))
    said = [p["prediction"] for p in first]
    answers = {
        0: [said[0]] * 3 + ["zzz"] * 7,  # 3 humans agree with the model: 0.9
        1: [said[1]] + ["zzz"] * 9,  # 1 human: 0.3
        2: ["zzz"] * 10,  # nobody: 0
        3: [said[3]] * 10,  # everybody: 1
    }
    data = write_jsonl(tmp_path / "questions.jsonl", vqa_rows(answers))
    out = tmp_path / "out"
    # float32 like the in-memory model above: "auto" is bfloat16 on a CPU with bf16 units, another model's answers
    args = ["eval", "--model", str(eval_model_dir), "--data", str(data), "--image-root", str(image_dir), "--dtype",
            "float32"]  # fmt: skip
    code = eval_main([*args, "--metric", "vqa", "--batch-size", "3", "--out", str(out), "--max-new-tokens", TOKENS])
    assert code == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)

    metrics = json.loads((out / "metrics.json").read_text())
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert printed == metrics
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "predictions.jsonl"]  # no temp files left
    assert [p["question_id"] for p in preds] == [0, 1, 2, 3]  # input order, although batches were sorted
    assert [p["prediction"] for p in preds] == said  # batch size 3 (left-padded) == batch size 1
    for p, row in zip(preds, vqa_rows(answers), strict=True):
        assert p["image"] == row["image"] and p["answers"] == row["answers"] and p["category"] == row["category"]
        assert p["score"] == pytest.approx(vqa_accuracy(p["prediction"], row["answers"]))
    expected = [0.9, 0.3, 0.0, 1.0] if len(set(said)) == 4 else [p["score"] for p in preds]
    assert [p["score"] for p in preds] == pytest.approx(expected)
    assert metrics["metric"] == "vqa" and metrics["num_samples"] == 4
    assert metrics["accuracy"] == pytest.approx(sum(expected) / 4)
    assert metrics["by_category"]["colour"]["accuracy"] == pytest.approx((expected[0] + expected[2]) / 2)
    assert metrics["by_category"]["layout"]["num_samples"] == 2
    assert metrics["batch_size"] == 3 and metrics["max_new_tokens"] == 4


def test_eval_through_the_main_cli(eval_model_dir, image_dir, tmp_path, capsys):
    from minillava.cli import main

    data = write_jsonl(tmp_path / "q.jsonl", vqa_rows()[:2])
    out = tmp_path / "out"
    base = ["eval", "--model", str(eval_model_dir), "--data", str(data), "--image-root", str(image_dir)]
    assert main([*base, "--metric", "exact", "--out", str(out), "--max-new-tokens", "2", "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["num_samples"] == 2
    capsys.readouterr()
    missing = write_jsonl(tmp_path / "bad.jsonl", [{**vqa_rows()[0], "image": "nope.png"}])
    assert main(["eval", "--model", str(eval_model_dir), "--data", str(missing), "--metric", "vqa"]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl:1 (question_id 0)" in err and "nope.png not found" in err


@pytest.mark.parametrize(
    ("metric", "row", "keys"),
    [
        ("choice", {"choices": ["red", "blue", "green"], "answer": "B", "hint": "Look."}, {"accuracy", "unparsed"}),
        ("pope", {"answer": "Yes"}, {"accuracy", "precision", "recall", "f1", "yes_ratio"}),
        ("caption", {"answers": ["a red square", "a square"]}, {"bleu_1", "bleu_4", "cider_d"}),
        ("exact", {"answer": "red"}, {"accuracy"}),
    ],
)
def test_each_metric_runs(eval_model, image_dir, metric, row, keys):
    model, processor = eval_model
    samples = [
        {"question_id": f"q{i}", "image": str(image_dir / f"{c}.png"), "question": "What is shown?", **row}
        for i, c in enumerate(["red", "blue", "green"])
    ]
    metrics, preds = evaluate(model, processor, samples, metric, batch_size=2, max_new_tokens=3)
    assert keys <= set(metrics) and metrics["num_samples"] == 3
    assert [p["question_id"] for p in preds] == ["q0", "q1", "q2"]
    if metric in ("choice", "pope"):
        assert all("parsed" in p for p in preds)
    if metric == "choice":
        assert preds[0]["answer"] == "B" and preds[0]["choices"] == ["red", "blue", "green"]
    if metric == "pope":
        assert preds[0]["answer"] == "yes"


def test_evaluate_takes_in_memory_images_and_restores_train_mode(eval_model):
    model, processor = eval_model
    samples = [
        {"question_id": 1, "image": Image.new("RGB", (40, 32), (200, 10, 10)), "question": "Colour?", "answer": "red"},
        {"question_id": 2, "question": "Text only: what is two plus two?", "answer": "4"},
    ]
    model.train()
    model.vision.eval()  # as training does with a frozen tower
    try:
        metrics, preds = evaluate(model, processor, samples, "exact", batch_size=2, max_new_tokens=2)
        assert model.training and model.llm.training and not model.vision.training  # each mode restored
    finally:
        model.eval()
    assert metrics["num_samples"] == 2 and "image" not in preds[0]  # an in-memory image is not echoed


# ---- prompts --------------------------------------------------------------------------------------


def test_prompts_follow_llava(image_dir, tmp_path):
    rows = vqa_rows()
    rows[1]["question"] = f"Is there a square?\n{SHORT_ANSWER}"  # LLaVA's own files already carry it
    samples = load_samples(write_jsonl(tmp_path / "q.jsonl", rows), "vqa", image_dir)
    assert build_prompt(samples[0], "vqa") == f"What colour is it?\n{SHORT_ANSWER}"
    assert build_prompt(samples[1], "vqa") == f"Is there a square?\n{SHORT_ANSWER}"  # not doubled
    assert build_prompt(samples[0], "vqa", suffix="") == "What colour is it?"
    assert build_prompt(samples[0], "caption") == "What colour is it?"
    cap = load_samples(write_jsonl(tmp_path / "c.jsonl", [{"question_id": 1, "image": "red.png", "answer": "x"}]),
                       "caption", image_dir)  # fmt: skip
    assert build_prompt(cap[0], "caption") == "Provide a one-sentence caption for the provided image."


# ---- bad input ------------------------------------------------------------------------------------

GOOD = {"question_id": 7, "image": "red.png", "question": "What colour?", "answer": "red"}


@pytest.mark.parametrize(
    ("metric", "lines", "message"),
    [
        ("vqa", [GOOD, "{not json"], "q.jsonl:2: not valid JSON"),
        ("vqa", [GOOD, "[1, 2]"], "q.jsonl:2: expected a JSON object"),
        ("vqa", [{**GOOD, "image": "missing.png"}], "q.jsonl:1 (question_id 7): image "),
        ("vqa", [{**GOOD, "question_id": None}], "q.jsonl:1: missing or invalid 'question_id'"),
        ("vqa", [GOOD, GOOD], "q.jsonl:2 (question_id 7): duplicate question_id (first at "),
        ("vqa", [{**GOOD, "question": ""}], "(question_id 7): missing or empty 'question'"),
        ("vqa", [{k: v for k, v in GOOD.items() if k != "answer"}], "(question_id 7): needs 'answer' or 'answers'"),
        ("vqa", [{**GOOD, "answers": []}], "'answers' must be a non-empty list"),
        ("vqa", [{**GOOD, "image": 3}], "'image' must be a path"),
        ("pope", [{**GOOD, "answer": "maybe"}], 'pope needs \'answer\' "yes" or "no"'),
        ("choice", [{**GOOD, "choices": ["x"]}], "'choices' must be a list of 2 to 26 options"),
        ("choice", [{**GOOD, "choices": ["x", "y"], "answer": "C"}], "'answer' must be an option letter (A-B)"),
        ("choice", [{**GOOD, "choices": {"A": "x", "C": "y"}, "answer": "A"}], "keys must be the letters"),
        ("vqa", [], "q.jsonl: no samples"),
        ("nonsense", [GOOD], "unknown metric 'nonsense'"),
    ],
)
def test_bad_question_files_are_named_errors(image_dir, tmp_path, metric, lines, message):
    path = write_jsonl(tmp_path / "q.jsonl", lines)
    with pytest.raises(ValueError) as info:
        load_samples(path, metric, image_dir)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_choice_answers_accept_letters_indices_and_text(image_dir, tmp_path):
    rows = [
        {**GOOD, "question_id": 1, "choices": ["x", "y", "z"], "answer": "c"},
        {**GOOD, "question_id": 2, "choices": ["x", "y", "z"], "answer": 1},
        {**GOOD, "question_id": 3, "choices": ["x", "y", "z"], "answer": "x"},
        {**GOOD, "question_id": 4, "choices": {"B": "y", "A": "x"}, "answer": "B"},
    ]
    samples = load_samples(write_jsonl(tmp_path / "q.jsonl", rows), "choice", image_dir)
    assert [s.reference for s in samples] == ["C", "B", "A", "B"]
    assert samples[3].choices == ["x", "y"]


def test_vqav2_style_answer_dicts_and_default_image_root(image_dir):
    row = {**GOOD, "answers": [{"answer": "red", "answer_id": 1}, {"answer": 2}]}
    path = write_jsonl(image_dir.parent / "beside-images.jsonl", [{**row, "image": "images/red.png"}])
    (sample,) = load_samples(path, "vqa")  # image paths relative to the file's directory by default
    assert sample.reference == ["red", "2"] and sample.images == [image_dir / "red.png"]


def test_unreadable_image_names_the_sample(eval_model, tmp_path):
    model, processor = eval_model
    (tmp_path / "broken.png").write_bytes(b"not a png")
    samples = load_samples(write_jsonl(tmp_path / "q.jsonl", [{**GOOD, "image": "broken.png"}]), "vqa", tmp_path)
    with pytest.raises(ValueError, match=r"q.jsonl:1 \(question_id 7\): .*broken.png: not a readable image"):
        evaluate(model, processor, samples, "vqa", max_new_tokens=1)


def test_bad_arguments(eval_model, eval_model_dir, image_dir, tmp_path, capsys):
    model, processor = eval_model
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        evaluate(model, processor, [GOOD], "vqa", batch_size=0, image_root=image_dir)
    with pytest.raises(ValueError, match="no samples"):
        evaluate(model, processor, [], "vqa")
    data = write_jsonl(tmp_path / "q.jsonl", [GOOD])
    args = ["eval", "--data", str(data), "--metric", "vqa", "--image-root", str(image_dir)]
    assert eval_main([*args, "--model", str(tmp_path / "no-model")]) == 1
    assert "not a directory" in capsys.readouterr().err
    assert eval_main([*args, "--model", str(eval_model_dir), "--image-root", str(tmp_path / "nowhere")]) == 1
    assert "--image-root" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main([*args, "--model", str(eval_model_dir), "--batch-size", "0"])
