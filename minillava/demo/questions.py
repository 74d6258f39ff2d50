"""The demo's question sets on disk: training samples in LLaVA's format, one question each (as evaluation asks
them), and evaluation rows in `minillava eval`'s question-file format."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from minillava.fileio import write_atomic


@dataclass(frozen=True)
class Question:
    qid: str
    image: str  # relative to the data directory
    category: str  # the per-type rows of the report
    question: str
    answer: str


def write_training(path: Path, questions: list[Question]) -> Path:
    samples = [
        {"id": q.qid, "image": q.image, "conversations": [
            {"from": "human", "value": f"<image>\n{q.question}"}, {"from": "gpt", "value": q.answer}]}
        for q in questions
    ]  # fmt: skip
    write_atomic(path, json.dumps(samples, indent=1))
    return path


def write_evaluation(path: Path, questions: list[Question]) -> Path:
    rows = ({"question_id": q.qid, "image": q.image, "question": q.question, "answer": q.answer,
             "category": q.category} for q in questions)  # fmt: skip
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path
