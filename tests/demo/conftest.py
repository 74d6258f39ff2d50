"""Fixtures of the demo's tests: the benchmark scripts that read a demo model, imported as modules."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def import_benchmark():
    """import_benchmark("outside_probe") -> benchmarks/outside_probe.py as a module; its own imports (`common`)
    resolve beside it while the test module runs."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(BENCHMARKS))
