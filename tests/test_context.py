"""Repository context (dsv4.data.context.pack_tree, and the terminal's pack_context around it): the walk order, what
is skipped and why, the token budget taken first-fit, and what the user is told about files that did not fit."""

import os

import pytest

from dsv4.data.context import header, pack_tree
from dsv4.engine.terminal import MISSED_SHOWN, pack_context


class ByteTokenizer:
    """One token per UTF-8 byte: budgets in these tests are byte counts."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


def block(rel: str, text: str) -> str:
    return header(rel) + text + ("" if text.endswith("\n") else "\n")


def write(root, rel: str, data: str | bytes):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "repo"
    files = {"b.py": "print('b')\n", "a/z.py": "z = 1", "a/m/k.txt": "k\n", "A.md": "# A\n", "c.txt": "c\n"}
    for rel, text in files.items():
        write(root, rel, text)
    for skipped in (".git/config", "__pycache__/b.cpython-311.pyc", "node_modules/x/index.js", ".venv/lib/site.py",
                    "a/.pytest_cache/v/cache", "a/.mypy_cache/x.json"):
        write(root, skipped, "never read\n")
    write(root, "img.png", b"\x89PNG\r\n\x1a\n\0\0\0")  # a NUL byte: binary
    write(root, "latin1.txt", "caf\xe9\n".encode("latin-1"))  # not UTF-8: binary
    return root, files


def test_files_come_in_path_order_and_skip_tool_dirs_and_binaries(tree):
    root, files = tree
    packed = pack_tree(root, ByteTokenizer(), budget=10_000)
    # names sorted at every level (a directory where its name sorts; upper case first), tool directories never
    # entered, binaries reported
    assert packed.files == ["A.md", "a/m/k.txt", "a/z.py", "b.py", "c.txt"]
    assert packed.left_out == [("img.png", "binary"), ("latin1.txt", "binary")]
    assert packed.text == "".join(block(rel, files[rel]) for rel in packed.files)
    assert packed.ids == ByteTokenizer().encode(packed.text) and packed.tokens == len(packed.ids)
    assert "===== a/z.py =====\nz = 1\n" in packed.text  # a newline ends every file
    assert packed.summary() == f"context: 5 files, {packed.tokens} tokens; left out 2 binary"
    assert pack_tree(root, ByteTokenizer(), budget=10_000) == packed  # the same tree packs the same way


def test_symlinks_and_large_files_are_skipped(tree):
    root, _ = tree
    write(root, "big.txt", "x" * 200)
    os.symlink(root / "b.py", root / "link.py")
    os.symlink(root / "a", root / "linked_dir")
    packed = pack_tree(root, ByteTokenizer(), budget=10_000, max_file_bytes=100)
    assert "link.py" not in packed.files and not any(f.startswith("linked_dir") for f in packed.files)
    assert ("big.txt", "too large") in packed.left_out
    assert "link.py" not in dict(packed.left_out)


def test_budget_is_taken_first_fit_and_the_rest_reported(tmp_path):
    root = tmp_path / "repo"
    sizes = {"a.txt": 40, "b.txt": 300, "c.txt": 30, "d.txt": 500}
    for rel, n in sizes.items():
        write(root, rel, "x" * (n - 1) + "\n")
    cost = {rel: len(block(rel, "x" * (n - 1) + "\n").encode()) for rel, n in sizes.items()}
    budget = cost["a.txt"] + cost["c.txt"] + 10  # b does not fit after a; c, later and smaller, still does
    seen = []
    packed = pack_tree(root, ByteTokenizer(), budget, progress=seen.append)
    assert packed.files == ["a.txt", "c.txt"] and packed.tokens == cost["a.txt"] + cost["c.txt"] <= budget
    assert packed.left_out == [("b.txt", "did not fit"), ("d.txt", "did not fit")]
    assert packed.summary().endswith("left out 2 did not fit")
    assert seen == [1] * 4  # one call per file examined
    exact = pack_tree(root, ByteTokenizer(), cost["a.txt"])  # a budget a file fills exactly takes it
    assert exact.files == ["a.txt"] and exact.tokens == cost["a.txt"]
    assert pack_tree(root, ByteTokenizer(), 0).files == []


def test_not_a_directory_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        pack_tree(tmp_path / "missing", ByteTokenizer(), 100)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        pack_tree(tmp_path / "f.txt", ByteTokenizer(), 100)


def test_pack_context_lists_what_did_not_fit(tmp_path, capsys):
    root = tmp_path / "repo"
    write(root, "a.txt", "small\n")
    for i in range(MISSED_SHOWN + 3):
        write(root, f"big{i:02d}.txt", "y" * 100 + "\n")
    packed = pack_context(root, ByteTokenizer(), budget=len(block("a.txt", "small\n")))
    assert packed.files == ["a.txt"]
    err = capsys.readouterr().err
    assert f"[context: 1 files, {packed.tokens} tokens; left out {MISSED_SHOWN + 3} did not fit (budget" in err
    listed = [line for line in err.splitlines() if line.startswith("  did not fit: ")]
    assert listed == [f"  did not fit: big{i:02d}.txt" for i in range(MISSED_SHOWN)]
    assert "  ... and 3 more" in err


def test_pack_context_needs_room(tmp_path):
    with pytest.raises(ValueError, match="no room left in the context"):
        pack_context(tmp_path, ByteTokenizer(), budget=0)
