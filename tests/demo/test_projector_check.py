"""benchmarks/projector_check.py on a handful of real images: it runs, reads every validation image, and says no to
settings the demo does not have. Needs the Fashion-MNIST Debian package, which scripts/setup.sh installs."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "projector_check.py"


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_the_check_reads_every_validation_image(tmp_path: Path) -> None:
    done = run(tmp_path, "--set", "n_train=8", "--set", "n_fashion_train=16", "--set", "word_warmup_steps=3",
               "--set", "projector_options.layout_rank=4", "--val-images", "12")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["val_images"] == 12
    assert 0.0 <= result["fashion_val_accuracy"] <= 100.0
    assert result["warm_start"]["images"] == 8 + 16


def test_an_unknown_setting_is_a_one_line_error(tmp_path: Path) -> None:
    done = run(tmp_path, "--set", "no_such_setting=1")
    assert done.returncode == 2
    assert "no_such_setting" in done.stderr and "Traceback" not in done.stderr
