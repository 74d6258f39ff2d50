"""Atomic, resumable checkpoints: `OUT/checkpoints/step-00000012/`.

A checkpoint holds the trainable parameters (safetensors), the optimizer and scheduler states, the
sampler position, the RNG states and the config. It is written into a hidden temp directory and renamed
into place at the end, so a run killed mid-write leaves only a `.tmp-*` directory, which is never picked
up (and is removed at the next start). Only the last `keep_last` checkpoints are kept.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PATTERN = re.compile(r"^step-(\d{8})$")
WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
CONFIG = "train_config.json"


def checkpoint_root(out: Path) -> Path:
    return out / "checkpoints"


def list_checkpoints(out: Path) -> list[Path]:
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if PATTERN.match(p.name) and (p / STATE).is_file() and (p / WEIGHTS).is_file()]
    return sorted(found, key=step_of)


def step_of(path: Path) -> int:
    return int(PATTERN.match(path.name).group(1))


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def clean_partial(out: Path) -> None:
    root = checkpoint_root(out)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any], config: dict[str, Any],
    keep_last: int, keep: Path | None = None,
) -> Path:  # fmt: skip
    """Write atomically, then prune to the newest `keep_last` checkpoints, never deleting `keep` (the last one
    known good, which a collapsing run would otherwise rotate away)."""
    root = checkpoint_root(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:08d}-", dir=root))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / WEIGHTS)
        torch.save(state, tmp / STATE)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError)):  # a full disk: torch.save says RuntimeError, safetensors OSError
            kept = latest_checkpoint(out)
            raise OSError(f"{final}: could not write the checkpoint ({_reason(e)}); nothing half-written is left, "
                          f"the newest complete checkpoint is {kept or 'none'}") from e  # fmt: skip
        raise
    prune(out, keep_last, keep)
    return final


def prune(out: Path, keep_last: int, keep: Path | None = None) -> None:
    """Delete all but the newest `keep_last` checkpoints, and never `keep`."""
    for old in list_checkpoints(out)[:-keep_last]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    if not (path / STATE).is_file() or not (path / WEIGHTS).is_file():
        raise OSError(f"{path}: not a complete checkpoint (needs {WEIGHTS} and {STATE})")
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    config = json.loads((path / CONFIG).read_text()) if (path / CONFIG).is_file() else {}
    weights = load_file(path / WEIGHTS)
    if not weights_finite(weights):
        raise ValueError(f"{path}: its weights are not all finite")
    return weights, state, config


def weights_finite(weights: dict[str, torch.Tensor]) -> bool:
    """Whether every trainable tensor is finite: a checkpoint of exploded weights is no point to go back to."""
    return all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point())


Loaded = tuple[Path, dict[str, torch.Tensor], dict[str, Any]]


def _reason(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())  # one line: some loaders put newlines in messages


# What decides which samples each step sees: a resume that changes one of them is not the same run continued
# (the saved data position would point into a different order), so it is refused rather than silently reshuffled.
SAME_RUN = ("data", "image_root", "batch_size", "grad_accum", "seed", "stage", "max_length")


def check_same_run(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume `path` (saved with config `saved`) under a config that would draw different batches."""
    changed = [k for k in SAME_RUN if k in saved and k in current and saved[k] != current[k]]
    if changed:
        diffs = ", ".join(f"{k} {saved[k]!r} -> {current[k]!r}" for k in changed)
        raise ValueError(f"{path}: cannot resume with a changed {diffs}: the saved data position would not "
                         "continue the same run; restore the setting, or train into a new --out")  # fmt: skip


def load_resume(
    out: Path, resume: str | None, warn: Callable[[str], Any], config: dict[str, Any] | None = None
) -> Loaded | None:
    """The checkpoint to resume from, loaded: (its path, weights, state); None when there is nothing to resume.

    `latest` tries the newest complete checkpoint first and falls back to older ones when one will not load
    (a truncated file after a full disk, say), warning each time; an explicit directory gets no fallback,
    since the user asked for that one. With `config` (this run's), a checkpoint saved under settings that draw
    other batches is refused (`check_same_run`)."""
    path = resolve_resume(out, resume)
    if path is None:
        return None
    explicit = resume not in LATEST
    candidates = [path] if explicit else list(reversed(list_checkpoints(out)))
    tried = []
    for cand in candidates:
        try:
            weights, state, saved = load_checkpoint(cand)
        except Exception as e:  # safetensors, pickle and JSON each raise their own kind
            if explicit:
                raise OSError(f"{cand}: cannot resume from this checkpoint: {_reason(e)}") from e
            warn(f"--resume: skipping {cand}: {_reason(e)}")
            tried.append(f"{cand.name}: {_reason(e)}")
            continue
        if config is not None:
            check_same_run(cand, saved, config)
        return cand, weights, state
    raise OSError(f"{out}: no checkpoint could be loaded to resume from ({'; '.join(tried)})")


LATEST = ("latest", "auto", "true", "True")


def resolve_resume(out: Path, resume: str | None) -> Path | None:
    """`latest`: the newest complete checkpoint under OUT (None if there is none); else a directory."""
    if resume is None:
        return None
    if resume in LATEST:
        return latest_checkpoint(out)
    path = Path(resume).expanduser()
    if PATTERN.match(path.name) is None and latest_checkpoint(path) is not None:
        return latest_checkpoint(path)  # a run directory: its newest checkpoint
    if not path.is_dir():
        raise OSError(f"{path}: no such checkpoint directory")
    return path
