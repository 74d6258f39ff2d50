"""Atomic writes: a reader sees the old file or the new one, never half of one."""

import os

import pytest

from minillava.fileio import write_atomic


def test_write_atomic_replaces_whole_files_and_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    write_atomic(target, "old\n")
    write_atomic(target, "new\n")
    assert target.read_text() == "new\n"

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, "half")
    assert target.read_text() == "new\n"  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # and no temp file is left behind
