"""dsv4.atomic: a write that fails half-way leaves the old file (or directory) as it was and no temporary behind."""

import os

import pytest

from dsv4.atomic import atomic_dir, atomic_path, atomic_text, atomic_write


def entries(d):
    return sorted(os.listdir(d))


def test_atomic_write_replaces_and_a_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "report.json"
    atomic_text(path, "old")
    assert path.read_text() == "old"

    def half(f):
        f.write(b"new, but only half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half)
    assert path.read_text() == "old" and entries(tmp_path) == ["report.json"]
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_text() == "new" and entries(tmp_path) == ["report.json"]


def test_atomic_path_keeps_the_suffix_for_libraries_that_read_it(tmp_path):
    path = tmp_path / "loss.png"
    with atomic_path(path) as tmp:
        assert tmp.endswith(".png") and os.path.dirname(tmp) == str(tmp_path)
        assert not path.exists()  # nothing visible until the block ends
        with open(tmp, "wb") as f:
            f.write(b"\x89PNG")
    assert path.read_bytes() == b"\x89PNG" and entries(tmp_path) == ["loss.png"]
    with pytest.raises(KeyError), atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyError
    assert path.read_bytes() == b"\x89PNG" and entries(tmp_path) == ["loss.png"]


def test_atomic_dir_replaces_a_whole_directory_or_nothing(tmp_path):
    final = tmp_path / "final"
    with atomic_dir(final) as tmp:
        open(os.path.join(tmp, "a.txt"), "w").write("1")
    assert entries(final) == ["a.txt"]
    with pytest.raises(ValueError), atomic_dir(final) as tmp:
        open(os.path.join(tmp, "b.txt"), "w").write("2")
        raise ValueError("killed half-way")
    assert entries(final) == ["a.txt"] and entries(tmp_path) == ["final"]  # old one intact, temporary gone
    with atomic_dir(final) as tmp:
        open(os.path.join(tmp, "b.txt"), "w").write("2")
    assert entries(final) == ["b.txt"] and entries(tmp_path) == ["final"]  # replaced whole, no stale file
