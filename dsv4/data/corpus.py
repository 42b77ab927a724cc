"""Training data: a corpus of documents -> one memory-mapped token file -> packed fixed-length windows; and
docstring -> function pairs for supervised fine-tuning in the chat template.

The default corpus is the standard library source of the running interpreter (`../shared/DATA.md`), split into
train/val by file, by a hash of the relative path, so the split never depends on listing order or machine. Batch order
is a pure function of (seed, step): a run resumed at step k sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dsv4.atomic import atomic_write
from dsv4.tokenizers.text import Tokenizer

Doc = Path | str  # a file to read, or the text itself


# ---- corpus ----
def stdlib_files(include_tests: bool = False) -> tuple[Path, list[Path]]:
    """(root, sorted *.py files) of the running interpreter's standard library, without site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root).parts
        if "site-packages" in parts or "dist-packages" in parts:
            continue
        if not include_tests and any(s in ("test", "tests", "idle_test") for s in parts[:-1]):
            continue
        files.append(p)
    return root, files


def _is_text(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8192)
    return b"\0" not in head


def folder_files(root: str | os.PathLike) -> tuple[Path, list[Path]]:
    """(root, sorted text files under it); binaries (a NUL byte in the first 8 KiB) and hidden paths are skipped."""
    root = Path(root)
    files = [p for p in sorted(root.rglob("*"))
             if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts) and _is_text(p)]
    return root, files


def split_by_key(keys: Sequence[str], val_frac: float = 0.01) -> tuple[list[int], list[int]]:
    """Indices of (train, val): a key goes to val when its hash falls below val_frac. Stable across machines."""
    train, val = [], []
    for i, k in enumerate(keys):
        h = int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "big") / 2**64
        (val if h < val_frac else train).append(i)
    return train, val


def load_corpus(data: str | os.PathLike | None = None, val_frac: float = 0.01) -> tuple[list[Doc], list[Doc]]:
    """(train, val) documents for `--data PATH`: None = stdlib, a folder of text files, or a .jsonl with `text`.
    Folders split by relative path, jsonl by line number."""
    if data is not None and str(data).endswith(".jsonl"):
        with open(data, encoding="utf-8") as f:
            docs: list[Doc] = [json.loads(line)["text"] for line in f if line.strip()]
        keys = [str(i) for i in range(len(docs))]
    else:
        root, files = stdlib_files() if data is None else folder_files(data)
        docs, keys = list(files), [p.relative_to(root).as_posix() for p in files]
    train, val = split_by_key(keys, val_frac)
    return [docs[i] for i in train], [docs[i] for i in val]


def read_doc(doc: Doc) -> str:
    # surrogateescape keeps undecodable bytes; the byte-level tokenizer encodes them losslessly
    return doc.read_text(encoding="utf-8", errors="surrogateescape") if isinstance(doc, Path) else doc


def _docs_hash(docs: Sequence[Doc]) -> str:
    h = hashlib.sha256()
    for d in docs:
        if isinstance(d, Path):
            st = d.stat()
            h.update(f"F{d.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        else:
            h.update(b"T" + hashlib.sha256(d.encode("utf-8", "surrogateescape")).digest())
    return h.hexdigest()[:16]


# ---- token file ----
def tokenize_corpus(docs: Sequence[Doc], tokenizer: Tokenizer, out_path: str | os.PathLike,
                    progress: bool = True) -> dict:
    """Write every document's tokens followed by eos to `out_path` (raw uint16/uint32) and a JSON sidecar
    `out_path.json`; returns the sidecar. Reuses an existing file whose sidecar matches the tokenizer and inputs.
    The sidecar is written last, so a crash in between leaves a file that is rebuilt, never trusted."""
    out_path, meta_path = Path(out_path), Path(f"{out_path}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    want = {"vocab_hash": tokenizer.hash(), "docs_hash": _docs_hash(docs), "n_docs": len(docs),
            "dtype": np.dtype(dtype).name}
    if meta_path.exists() and out_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            if all(meta.get(k) == v for k, v in want.items()) and \
                    out_path.stat().st_size == meta["n_tokens"] * np.dtype(dtype).itemsize:
                return meta
        except (ValueError, KeyError):
            pass  # unreadable sidecar: rebuild
    n_tokens = 0

    def write_tokens(f):
        nonlocal n_tokens
        for doc in tqdm(docs, desc=f"tokenize {out_path.name}", unit="doc", disable=not progress):
            ids = np.asarray(tokenizer.encode(read_doc(doc)) + [tokenizer.eos_id], dtype=dtype)
            ids.tofile(f)
            n_tokens += len(ids)

    atomic_write(out_path, write_tokens)
    meta = {**want, "n_tokens": n_tokens}
    atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return meta


def load_tokens(path: str | os.PathLike) -> np.memmap:
    meta = json.loads(Path(f"{path}.json").read_text())
    return np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))


def _sample_index(g: int, n: int, seed: int, cache: dict) -> int:
    """The g-th sample of an endless stream that visits all n items once per epoch in a seeded random order."""
    epoch, i = divmod(g, n)
    if epoch not in cache:
        cache.clear()
        cache[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
    return int(cache[epoch][i])


# ---- pretraining ----
class PackedDataset:
    """Non-overlapping windows of seq_len+1 tokens over the token file (documents run across window edges, separated
    by eos); window i gives inputs tokens[i*T : i*T+T] and targets shifted by one."""

    def __init__(self, token_file: str | os.PathLike, seq_len: int):
        self.tokens, self.seq_len = load_tokens(token_file), seq_len
        self.n_windows = (len(self.tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise ValueError(f"{token_file}: {len(self.tokens)} tokens are fewer than one window of {seq_len + 1}")

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(self.tokens[i * self.seq_len:(i + 1) * self.seq_len + 1].astype(np.int64))
        return w[:-1], w[1:]

    def batches(self, batch_size: int, seed: int = 0, start_step: int = 0
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless (inputs, targets) [B, T] batches; batch k depends only on (seed, k)."""
        cache: dict = {}
        step = start_step
        while True:
            xs, ys = zip(*(self[_sample_index(step * batch_size + j, self.n_windows, seed, cache)]
                           for j in range(batch_size)))
            yield torch.stack(xs), torch.stack(ys)
            step += 1


# ---- fine-tuning ----
def _function_pair(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str],
                   max_doc: int, max_code: int) -> tuple[str, str] | None:
    doc = ast.get_docstring(node)
    if not doc or not 10 <= len(doc) <= max_doc or node.name.startswith("_") or len(node.body) < 2:
        return None
    d = node.body[0]
    if d.lineno == node.lineno or d.end_lineno is None:
        return None  # docstring on the def line: nothing clean to cut out
    body = lines[node.lineno - 1:d.lineno - 1] + lines[d.end_lineno:node.end_lineno]
    code = textwrap.dedent("".join(body)).rstrip() + "\n"
    if len(code) > max_code:
        return None
    signature = f"{node.name}({ast.unparse(node.args)})"
    return f"Write a Python function `{signature}` that: {doc}", code


def docstring_pairs(docs: Sequence[Doc], max_doc: int = 1000, max_code: int = 2000) -> list[tuple[str, str]]:
    """(instruction, code) pairs from top-level functions and methods of top-level classes that have a docstring;
    the code is the function without its docstring. Files that do not parse are skipped."""
    pairs = []
    for doc in docs:
        src = read_doc(doc)
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            continue
        lines = src.splitlines(keepends=True)
        nodes = list(tree.body)
        nodes += [n for c in tree.body if isinstance(c, ast.ClassDef) for n in c.body]
        for n in nodes:
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef):
                pair = _function_pair(n, lines, max_doc, max_code)
                if pair is not None:
                    pairs.append(pair)
    return pairs


def chat_messages(instruction: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}]


class SFTDataset:
    """Chat examples padded/truncated to seq_len+1 tokens -> (ids, targets, mask) [T]; the mask marks the targets
    that are assistant answer tokens (incl. their end-of-sentence), pads are masked out."""

    def __init__(self, pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer, seq_len: int,
                 drop_long: bool = False):
        """drop_long: skip examples longer than seq_len + 1 tokens instead of truncating them (the trainer does, so
        every answer it learns ends in end-of-sentence). Examples with no answer token inside the window are skipped."""
        self.seq_len, self.examples = seq_len, []
        for instruction, answer in pairs:
            ids, mask = tokenizer.encode_chat(chat_messages(instruction, answer))
            if (drop_long and len(ids) > seq_len + 1) or not any(mask[1:seq_len + 1]):
                continue
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
            pad = seq_len + 1 - len(ids)
            self.examples.append((torch.tensor(ids + [tokenizer.pad_id] * pad), torch.tensor(mask + [0] * pad)))
        if not self.examples:
            raise ValueError(f"no fine-tuning example fits in seq_len {seq_len} (of {len(pairs)} pairs); "
                             "raise the sequence length")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask = self.examples[i]
        return ids[:-1], ids[1:], mask[1:]

    def batches(self, batch_size: int, seed: int = 0, start_step: int = 0
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Endless (ids, targets, mask) [B, T] batches; batch k depends only on (seed, k)."""
        cache: dict = {}
        step = start_step
        while True:
            items = [self[_sample_index(step * batch_size + j, len(self), seed, cache)] for j in range(batch_size)]
            yield tuple(torch.stack(t) for t in zip(*items))
            step += 1
