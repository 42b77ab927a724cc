"""Repository-scale prompts: a source tree packed into one prompt, up to a token budget.

    packed = pack_tree("path/to/repo", tokenizer, budget=1_000_000)
    packed.text        every text file under the root in path order, each under a header line `===== rel/path =====`
    packed.ids         its tokens (each file encoded on its own, so the count is exact), to prefix a prompt with
    packed.files       the files included;  packed.left_out: (path, why) for the rest

Walk order is stable: directories and files sorted by name, so the same tree always packs the same way (and a prompt
cache could reuse the prefix). Skipped: version-control and tool directories (.git, .hg, .svn, __pycache__,
node_modules, virtual environments, caches), symbolic links, binary files (a NUL byte in the first 8 KiB, or not UTF-8),
files over `max_file_bytes`. Files are taken first-fit in that order: one that does not fit the remaining budget is
reported as "did not fit" and the walk goes on (a later, smaller file may still fit).
"""

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

SKIP_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", "venv", ".tox", ".mypy_cache",
                       ".pytest_cache", ".ruff_cache", ".idea", ".vscode"})


@dataclass
class Packed:
    text: str = ""
    ids: list[int] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)

    @property
    def tokens(self) -> int:
        return len(self.ids)

    def summary(self) -> str:
        """One line for the user: what went in, and what did not."""
        line = f"context: {len(self.files)} files, {self.tokens} tokens"
        if self.left_out:
            reasons: dict[str, int] = {}
            for _, why in self.left_out:
                reasons[why] = reasons.get(why, 0) + 1
            line += "; left out " + ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
        return line


def walk(root: Path) -> Iterator[Path]:
    """Files under `root` in path order (entries sorted by name at every level, a directory where its name sorts),
    skipping SKIP_DIRS and symbolic links."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.is_symlink():
            continue
        if entry.is_dir():
            if entry.name not in SKIP_DIRS:
                yield from walk(Path(entry.path))
        elif entry.is_file():
            yield Path(entry.path)


def read_text(path: Path, max_bytes: int) -> tuple[str | None, str]:
    """(text, "") for a text file, else (None, why it is left out)."""
    try:
        if path.stat().st_size > max_bytes:
            return None, "too large"
        data = path.read_bytes()
    except OSError:
        return None, "unreadable"
    if b"\0" in data[:8192]:
        return None, "binary"
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError:
        return None, "binary"


def header(rel: str) -> str:
    return f"===== {rel} =====\n"


def pack_tree(root: str | os.PathLike, tokenizer, budget: int, max_file_bytes: int = 4 << 20,
              progress: Callable[[int], None] | None = None) -> Packed:
    """Pack the text files under `root` into at most `budget` tokens (see the module docstring). `progress(n)` is
    called with each file examined."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--context-dir {root}: not a directory")
    packed, parts = Packed(), []
    for path in walk(root):
        rel = path.relative_to(root).as_posix()
        text, why = read_text(path, max_file_bytes)
        if progress is not None:
            progress(1)
        if text is None:
            packed.left_out.append((rel, why))
            continue
        block = header(rel) + text + ("" if text.endswith("\n") else "\n")
        ids = tokenizer.encode(block)
        if packed.tokens + len(ids) > budget:
            packed.left_out.append((rel, "did not fit"))
            continue
        parts.append(block)
        packed.files.append(rel)
        packed.ids += ids
    packed.text = "".join(parts)
    return packed
