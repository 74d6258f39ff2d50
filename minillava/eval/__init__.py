"""Evaluation: metrics (VQAv2 accuracy, exact match, multiple choice, POPE, BLEU/CIDEr-D), a batched runner
over JSONL question files (`minillava eval`), and an lmms-eval model adapter (`minillava.eval.lmms_adapter`)."""

from minillava.eval.runner import METRICS, Sample, evaluate, load_samples

__all__ = ["METRICS", "Sample", "evaluate", "load_samples"]
