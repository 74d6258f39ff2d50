"""The demo's question sets on disk: training samples in LLaVA's format, one question each (as evaluation asks
them), and evaluation rows in `minillava eval`'s question-file format, with every answer form it accepts and the
facts of the scene (which score a free-form description)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from minillava.demo.phrasing import accepted_answers
from minillava.fileio import write_atomic

# the demo writes ~12k PNGs: zlib level 1 encodes them ~3x faster than Pillow's default 6 for ~20 % more bytes,
# the same pixels (PNG is lossless)
PNG_LEVEL = 1


@dataclass(frozen=True)
class Question:
    qid: str
    image: str  # relative to the data directory
    category: str  # the question type: the per-type rows of the report
    question: str
    answer: str  # the canonical answer, the one training teaches
    facts: dict[str, str] = field(default_factory=dict)  # what the image shows (colour, shape, size / count)
    scene: str = ""  # the kind of scene asked about (synthetic.SCENE_DRAWERS): the report's per-scene rows


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
             "answers": accepted_answers(q.answer, q.category), "category": q.category, "facts": q.facts,
             "scene": q.scene}
            for q in questions)  # fmt: skip
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path
