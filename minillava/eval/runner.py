"""Run a model over a question file and score it: read + check samples, batched greedy generation, metrics.

Question files are JSONL, one sample a line:

    {"question_id": 1, "image": "val/0001.jpg", "question": "What colour is the cube?", "answers": [...]}

Ground truth by metric: `answers` (list; VQAv2's list of dicts with "answer" also works) or `answer`
(string) for vqa / exact / caption; `answer` "yes"/"no" for pope; `choices` (list, or dict keyed by
letter) plus `answer` (letter, 0-based index or option text) for choice. Optional: `category` (or
`question_type`), which adds per-category metrics; `hint` (choice). `image` is a path relative to the
image root, a list of them, or absent / null for a text-only question.

Every problem with a sample is an error that names the file, the line and question id, and the reason;
all samples are checked (and every image found) before the model runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from minillava.eval import metrics as M
from minillava.fileio import write_atomic

METRICS = ("vqa", "exact", "choice", "pope", "caption")
SHORT_ANSWER = "Answer the question using a single word or phrase."  # LLaVA's VQAv2 / GQA / POPE suffix
DEFAULT_MAX_NEW_TOKENS = {"vqa": 32, "exact": 32, "choice": 32, "pope": 32, "caption": 64}


@dataclass
class Sample:
    """One checked question: what the model sees, and the ground truth in the metric's own form."""

    question_id: str | int
    question: str
    images: list[Any]  # paths (resolved) or in-memory images, in order
    reference: Any  # list[str] (vqa, exact, caption), "yes"/"no" (pope), letter (choice)
    where: str  # "file:line (question_id X)" for messages
    category: str | None = None
    choices: list[str] = field(default_factory=list)
    hint: str | None = None
    record: dict = field(default_factory=dict)  # the original fields, echoed into predictions


# ---- reading and checking ------------------------------------------------------------------------


def load_samples(path: str | Path, metric: str, image_root: str | Path | None = None) -> list[Sample]:
    """Read and check a JSONL question file; image paths resolve against `image_root` (default: the file's dir)."""
    _check_metric(metric)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    root = Path(image_root) if image_root is not None else path.parent
    if not root.is_dir():
        raise OSError(f"--image-root {root}: not a directory")
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        rows.append((f"{path}:{lineno}", row))
    if not rows:
        raise ValueError(f"{path}: no samples")
    return check_samples(rows, metric, root)


def check_samples(rows: Iterable[tuple[str, Any]], metric: str, image_root: Path | None) -> list[Sample]:
    """(location, dict) pairs -> Samples, or a ValueError naming the location, question id and reason."""
    samples: list[Sample] = []
    seen: dict[str, str] = {}
    for loc, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{loc}: expected a JSON object, got {type(row).__name__}")
        qid = row.get("question_id")
        where = f"{loc} (question_id {qid})" if qid is not None else loc
        if qid is None or isinstance(qid, bool) or not isinstance(qid, (str, int)) or qid == "":
            raise ValueError(f"{where}: missing or invalid 'question_id' (need a string or integer)")
        if str(qid) in seen:
            raise ValueError(f"{where}: duplicate question_id (first at {seen[str(qid)]})")
        seen[str(qid)] = loc
        samples.append(_check_one(row, qid, where, metric, image_root))
    return samples


def _check_one(row: dict, qid: str | int, where: str, metric: str, root: Path | None) -> Sample:
    question = row.get("question", M.CAPTION_PROMPT if metric == "caption" else None)
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: missing or empty 'question'")
    images = _check_images(row.get("image"), where, root)
    category = row.get("category", row.get("question_type"))
    sample = Sample(qid, question, images, None, where, None if category is None else str(category), record=row)
    if metric == "choice":
        sample.choices, sample.reference = _check_choices(row, where)
        hint = row.get("hint")
        sample.hint = hint if isinstance(hint, str) and hint.strip() else None
    elif metric == "pope":
        answer = row.get("answer")
        if not isinstance(answer, str) or answer.strip().lower() not in ("yes", "no"):
            raise ValueError(f'{where}: pope needs \'answer\' "yes" or "no", got {answer!r}')
        sample.reference = answer.strip().lower()
    else:
        sample.reference = _check_answers(row, where)
    return sample


def _check_images(value: Any, where: str, root: Path | None) -> list[Any]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, (str, Path)):
            if not str(item).strip():
                raise ValueError(f"{where}: empty image path")
            p = Path(item) if root is None or Path(item).is_absolute() else root / item
            if not p.is_file():
                raise ValueError(f"{where}: image {p} not found")
            out.append(p)
        elif isinstance(item, (Image.Image, bytes)):  # in-memory images (Python callers)
            out.append(item)
        else:
            raise ValueError(f"{where}: 'image' must be a path or a list of paths, got {type(item).__name__}")
    return out


def _check_answers(row: dict, where: str) -> list[str]:
    if "answers" in row:
        raw = row["answers"]
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{where}: 'answers' must be a non-empty list")
        out = []
        for a in raw:
            a = a.get("answer") if isinstance(a, dict) else a  # VQAv2 annotation style
            if isinstance(a, bool) or not isinstance(a, (str, int, float)):
                raise ValueError(f"{where}: each answer must be a string, got {a!r}")
            out.append(str(a))
        return out
    if "answer" in row:
        a = row["answer"]
        if isinstance(a, bool) or not isinstance(a, (str, int, float)) or not str(a).strip():
            raise ValueError(f"{where}: 'answer' must be a non-empty string, got {a!r}")
        return [str(a)]
    raise ValueError(f"{where}: needs 'answer' or 'answers'")


def _check_choices(row: dict, where: str) -> tuple[list[str], str]:
    raw = row.get("choices")
    if isinstance(raw, dict):  # {"A": "...", "B": "..."} in letter order, no gaps
        keys = sorted(str(k).strip().upper() for k in raw)
        if keys != list(M.LETTERS[: len(keys)]):
            raise ValueError(f"{where}: 'choices' keys must be the letters A, B, C, ... in order, got {keys}")
        raw = [raw[k] for k in sorted(raw, key=lambda k: str(k).strip().upper())]
    if not isinstance(raw, list) or len(raw) < 2 or len(raw) > len(M.LETTERS):
        raise ValueError(f"{where}: 'choices' must be a list of 2 to 26 options")
    if any(isinstance(c, (dict, list)) or c is None or not str(c).strip() for c in raw):
        raise ValueError(f"{where}: every choice must be a non-empty string")
    choices = [str(c) for c in raw]
    answer = row.get("answer")
    letters = M.LETTERS[: len(choices)]
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return choices, letters[answer]
    if isinstance(answer, str):
        a = answer.strip()
        if len(a) == 1 and a.upper() in letters:
            return choices, a.upper()
        if a in choices:
            return choices, letters[choices.index(a)]
    raise ValueError(
        f"{where}: 'answer' must be an option letter ({letters[0]}-{letters[-1]}), a 0-based index or one of "
        f"the choices, got {answer!r}"
    )


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")


# ---- prompts -------------------------------------------------------------------------------------


def build_prompt(sample: Sample, metric: str, suffix: str | None = None) -> str:
    """The user turn, following LLaVA's evaluation prompts. `suffix=None` is the metric's default; "" none."""
    if metric == "choice":
        if suffix is None:
            return M.choice_prompt(sample.question, sample.choices, sample.hint)
        body = "\n".join(
            ([sample.hint] if sample.hint else [])
            + [sample.question]
            + [f"{M.LETTERS[i]}. {c}" for i, c in enumerate(sample.choices)]
        )
        return f"{body}\n{suffix}" if suffix else body
    if suffix is None:
        suffix = "" if metric == "caption" else SHORT_ANSWER
    question = sample.question.rstrip()
    if not suffix or question.endswith(suffix):  # LLaVA's own question files already carry it
        return question
    return f"{question}\n{suffix}"


# ---- scoring -------------------------------------------------------------------------------------


def score(metric: str, samples: Sequence[Sample], texts: Sequence[str]) -> tuple[dict[str, Any], list[dict]]:
    """Aggregate metrics and one record per sample (prediction, parsed answer, score)."""
    _check_metric(metric)
    if len(samples) != len(texts):
        raise ValueError(f"{len(samples)} samples but {len(texts)} predictions")
    records = [_record(s, t) for s, t in zip(samples, texts, strict=True)]
    if metric in ("vqa", "exact"):
        fn = M.vqa_accuracy if metric == "vqa" else M.exact_match
        for r, s in zip(records, samples, strict=True):
            r["normalized"] = M.normalize_answer(r["prediction"])
            r["score"] = fn(r["prediction"], s.reference)
    elif metric == "choice":
        for r, s in zip(records, samples, strict=True):
            r["parsed"] = M.extract_choice(r["prediction"], s.choices)
            r["score"] = float(r["parsed"] == s.reference)
    elif metric == "pope":
        for r, s in zip(records, samples, strict=True):
            r["parsed"] = M.pope_answer(r["prediction"])
            r["score"] = float(r["parsed"] == s.reference)
    else:
        per_sample = M.caption_scores(texts, [s.reference for s in samples])["per_sample"]
        for r, cider in zip(records, per_sample, strict=True):
            r["score"] = cider  # CIDEr-D against this corpus's document frequencies
    result = _aggregate(metric, samples, records)
    categories = sorted({s.category for s in samples if s.category is not None})
    if categories:
        by_category = {}
        for c in categories:
            rows = [i for i, s in enumerate(samples) if s.category == c]
            by_category[c] = _aggregate(metric, [samples[i] for i in rows], [records[i] for i in rows])
        result["by_category"] = by_category
    return result, records


def _aggregate(metric: str, samples: Sequence[Sample], records: Sequence[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {"num_samples": len(records)}
    if metric == "pope":
        out.update(M.pope_scores([r["parsed"] for r in records], [s.reference for s in samples]))
    elif metric == "caption":
        scores = M.caption_scores([r["prediction"] for r in records], [s.reference for s in samples])
        out.update({k: v for k, v in scores.items() if k != "per_sample"})
    else:
        out["accuracy"] = sum(r["score"] for r in records) / len(records)
        if metric == "choice":
            out["unparsed"] = sum(r["parsed"] is None for r in records)
    return out


def _record(sample: Sample, text: str) -> dict:
    r: dict[str, Any] = {"question_id": sample.question_id}
    image = sample.record.get("image")
    if image is not None and _jsonable(image):
        r["image"] = image
    r["question"] = sample.question
    if sample.category is not None:
        r["category"] = sample.category
    if sample.choices:
        r["choices"] = sample.choices
    r["prediction"] = text
    if isinstance(sample.reference, list) and len(sample.reference) > 1:
        r["answers"] = sample.reference
    else:
        r["answer"] = sample.reference[0] if isinstance(sample.reference, list) else sample.reference
    return r


def _jsonable(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


# ---- generation ----------------------------------------------------------------------------------


def evaluate(
    model: Any,
    processor: Any,
    samples: Sequence[Sample | dict],
    metric: str,
    batch_size: int = 8,
    *,
    image_root: str | Path | None = None,
    max_new_tokens: int | None = None,
    prompt_suffix: str | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], list[dict]]:
    """Generate greedy answers for `samples` in batches and score them with `metric`.

    `samples` are `Sample`s (from `load_samples`) or dicts in the question-file format; a dict's `image`
    may be a path (relative to `image_root` if given) or an in-memory PIL image. Returns
    (metrics, predictions): metrics holds the aggregate scores (and `by_category` when samples have a
    category); predictions is one record per sample, in input order, with the prediction and its score.
    The model is put in eval mode for the run; every submodule's mode is restored afterwards.
    """
    from minillava.generate import GenerationConfig, Generator

    _check_metric(metric)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not samples:
        raise ValueError("no samples to evaluate")
    if not all(isinstance(s, Sample) for s in samples):
        root = Path(image_root) if image_root is not None else None
        rows = [(f"sample {i}", s) for i, s in enumerate(samples) if not isinstance(s, Sample)]
        checked = iter(check_samples(rows, metric, root))
        samples = [s if isinstance(s, Sample) else next(checked) for s in samples]
    prompts = [build_prompt(s, metric, prompt_suffix) for s in samples]
    cfg = GenerationConfig(max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS[metric], temperature=0.0)
    generator = Generator(model, processor)
    # Similar lengths together: less padding. Greedy rows do not depend on their batch, so order is free.
    order = sorted(range(len(samples)), key=lambda i: (len(samples[i].images), len(prompts[i])))
    texts: list[str] = [""] * len(samples)
    modes = [(m, m.training) for m in model.modules()]  # restored exactly: a frozen tower may be in eval mode
    model.eval()
    bar = _progress(len(samples), metric) if progress else None
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            encoded = [_encode(processor, prompts[i], samples[i]) for i in idx]
            for i, text in zip(idx, generator.generate_batch(encoded, cfg), strict=True):
                texts[i] = text.strip()
            if bar is not None:
                bar.update(len(idx))
    finally:
        for module, mode in modes:
            module.training = mode
        if bar is not None:
            bar.close()
    return score(metric, samples, texts)


def _encode(processor: Any, prompt: str, sample: Sample):
    try:
        return processor.prompt(prompt, sample.images)
    except (ValueError, OSError) as e:
        raise ValueError(f"{sample.where}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}") from None


def _progress(total: int, metric: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"eval {metric}", unit="q", dynamic_ncols=True)


# ---- output --------------------------------------------------------------------------------------


def write_results(out: str | Path, metrics: dict[str, Any], predictions: Sequence[dict]) -> tuple[Path, Path]:
    """predictions.jsonl, then metrics.json (its presence marks a finished run), each written atomically."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OSError(f"--out {out}: exists and is not a directory")
    preds_path, metrics_path = out / "predictions.jsonl", out / "metrics.json"
    write_atomic(preds_path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    write_atomic(metrics_path, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    return metrics_path, preds_path


def run(
    model_dir: str | Path,
    data: str | Path,
    metric: str,
    out: str | Path,
    image_root: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    prompt_suffix: str | None = None,
    limit: int | None = None,
    dtype: str = "float32",
    device: str | None = None,
    template: str | None = None,
    progress: bool = False,
    quantize: str | None = None,
) -> dict[str, Any]:
    """The `minillava eval` command as a function: check the data, load the model, evaluate, write results.

    `quantize`: "int8" for int8 LLM weights (a directory saved by `minillava quantize` is int8 regardless)."""
    from minillava.interop.exported import load_for_inference
    from minillava.quantize import parse_scheme

    parse_scheme(quantize)  # a bad name fails before the data and the model load

    samples = load_samples(data, metric, image_root)  # before the (slow) model load: fail fast on bad data
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be at least 1, got {limit}")
        samples = samples[:limit]
    if not Path(model_dir).is_dir():
        raise OSError(f"--model {model_dir}: not a directory")
    model, processor = load_for_inference(str(model_dir), dtype, device, quantize=quantize)  # ONNX exports too
    if template:
        processor = processor.with_template(template)
    start = time.perf_counter()
    result, predictions = evaluate(
        model,
        processor,
        samples,
        metric,
        batch_size,
        max_new_tokens=max_new_tokens,
        prompt_suffix=prompt_suffix,
        progress=progress,
    )
    metrics = {
        "metric": metric,
        **result,
        "model": str(model_dir),
        "data": str(data),
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens or DEFAULT_MAX_NEW_TOKENS[metric],
        "elapsed_s": round(time.perf_counter() - start, 3),
    }
    write_results(out, metrics, predictions)
    return metrics
