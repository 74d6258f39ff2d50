"""Run records: a JSONL metrics file, an optional TensorBoard log, and a loss/lr curve PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsWriter:
    def __init__(self, path: Path, resume_step: int | None = None, tensorboard: bool = False) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():  # drop records past the checkpoint we resume from: they will be redone
            kept = [line for line in path.read_text().splitlines() if line and _step(line) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
            self.tb = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


def plot_curves(records: list[dict[str, Any]], path: Path) -> Path | None:
    steps = [r for r in records if r.get("event") == "step" and r.get("loss") is not None]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot([r["step"] for r in steps], [r["loss"] for r in steps])
    a.set_xlabel("step")
    a.set_ylabel("loss")
    a.set_yscale("log" if min(r["loss"] for r in steps) > 0 else "linear")
    a.grid(alpha=0.3)
    b.plot([r["step"] for r in steps], [r["lr"] for r in steps], color="tab:orange")
    b.set_xlabel("step")
    b.set_ylabel("learning rate")
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
