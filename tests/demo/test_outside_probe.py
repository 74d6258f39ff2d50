"""benchmarks/outside_probe.py: its scoring accepts an answer's usual forms and nothing else, its pictures are the
same for a seed whatever --n, and a model directory that does not load is a one-line error."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "outside_probe.py"


@pytest.fixture(scope="module")
def probe(import_benchmark):
    return import_benchmark("outside_probe")


@pytest.mark.parametrize(
    ("kind", "expected", "response", "correct", "strict"),
    [
        ("count", "3", "Three.", True, True),
        ("count", "3", "3 circles", True, True),
        ("count", "3", "two", False, False),
        ("position", "center", "In the middle", True, True),
        ("colour", "red", "red or blue", True, False),  # names a second option: right, not strictly
        ("colour", "red", "reddish", False, False),  # a whole word, not a substring
        ("yesno", "yes", "The image does contain a yellow circle.", False, False),
    ],
)
def test_score(probe, kind, expected, response, correct, strict):
    assert probe.score(kind, expected, response) == (correct, strict)


def test_items_do_not_depend_on_n(probe):
    first = [probe.make_item(0, i) for i in range(6)]
    again = [probe.make_item(0, i) for i in range(12)][:6]
    assert [(a.question, a.expected, a.width, a.height) for a in first] == [
        (b.question, b.expected, b.width, b.height) for b in again
    ]
    assert {a.type for a in first} == set(probe.TYPES)


def test_a_model_directory_that_does_not_load_is_a_one_line_error(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tmp_path / "none"), "--n", "6"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert str(tmp_path / "none") in done.stderr and len(done.stderr.strip().splitlines()) == 1
