"""Data: split by file, token file reuse/rebuild, deterministic resumable batches, docstring pairs, SFT masks."""

import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from dsv4.data.corpus import (
    PackedDataset,
    SFTDataset,
    docstring_pairs,
    load_corpus,
    load_tokens,
    split_by_key,
    stdlib_files,
    tokenize_corpus,
)
from dsv4.tokenizers.text import EOS, Tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
FEW = [STDLIB / f for f in ("textwrap.py", "bisect.py", "colorsys.py", "keyword.py")]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train((p.read_text() for p in FEW), vocab_size=512, n_vis=4)


def test_stdlib_split_is_by_file_and_stable():
    root, files = stdlib_files()
    assert len(files) > 100 and all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    train, val = load_corpus(None, val_frac=0.05)
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(files)
    assert 0 < len(val) < 0.15 * len(files)
    # membership depends on the relative path only: same answer for a shuffled, shorter listing
    keys = [p.relative_to(root).as_posix() for p in files]
    _, v1 = split_by_key(keys, 0.05)
    sub = keys[::-1][::2]
    _, v2 = split_by_key(sub, 0.05)
    assert {sub[i] for i in v2} == {keys[i] for i in v1} & set(sub)


def test_folder_and_jsonl_sources(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("hello\n")
    (tmp_path / "img.bin").write_bytes(b"\x89PNG\0\0\x01")
    train, val = load_corpus(tmp_path, val_frac=0.0)
    assert sorted(p.name for p in train) == ["a.py", "b.txt"] and val == []
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(200)) + "\n")
    train, val = load_corpus(j, val_frac=0.1)
    assert sorted(train + val) == sorted(f"doc {i}" for i in range(200)) and 5 < len(val) < 40


def test_token_file_content_reuse_and_rebuild(tok, tmp_path):
    docs = ["def f(x):\n    return x\n", "héllo"]
    out = tmp_path / "tok.bin"
    meta = tokenize_corpus(docs, tok, out, progress=False)
    tokens = load_tokens(out)
    assert tokens.dtype == np.uint16 and meta["n_tokens"] == len(tokens)
    expect = tok.encode(docs[0]) + [tok.eos_id] + tok.encode(docs[1]) + [tok.eos_id]
    assert tokens.tolist() == expect
    mtime = os.stat(out).st_mtime_ns
    assert tokenize_corpus(docs, tok, out, progress=False) == meta and os.stat(out).st_mtime_ns == mtime  # reused
    meta2 = tokenize_corpus(docs + ["more"], tok, out, progress=False)  # inputs changed: rebuilt
    assert meta2["n_tokens"] > meta["n_tokens"] and len(load_tokens(out)) == meta2["n_tokens"]
    other = Tokenizer.train(["completely different text"] * 3, vocab_size=300, n_vis=4)
    assert tokenize_corpus(docs + ["more"], other, out, progress=False)["vocab_hash"] == other.hash() != tok.hash()
    f = tmp_path / "m.py"
    f.write_text("a = 1\n")
    m1 = tokenize_corpus([f], tok, out, progress=False)
    f.write_text("a = 22222\n")
    os.utime(f, ns=(1, 1))
    assert tokenize_corpus([f], tok, out, progress=False)["n_tokens"] != m1["n_tokens"]  # file edited: rebuilt
    assert not list(tmp_path.glob("*.tmp"))


def test_packed_batches_deterministic_and_resume_exactly(tok, tmp_path):
    out = tmp_path / "tok.bin"
    tokenize_corpus(FEW, tok, out, progress=False)
    ds = PackedDataset(out, seq_len=16)
    tokens = load_tokens(out)
    x, y = ds[3]
    assert x.shape == (16,) and torch.equal(y[:-1], x[1:])
    assert x.tolist() == tokens[48:64].tolist()
    B = 4
    n_steps = 2 * len(ds) // B + 3  # run past an epoch boundary
    run = [b for _, b in zip(range(n_steps), ds.batches(B, seed=7))]
    again = [b for _, b in zip(range(n_steps), ds.batches(B, seed=7))]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(run, again))
    k = n_steps - 5
    resumed = [b for _, b in zip(range(5), ds.batches(B, seed=7, start_step=k))]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(run[k:], resumed))
    other = next(ds.batches(B, seed=8))
    assert not torch.equal(other[0], run[0][0])
    # one epoch visits every window exactly once, in a shuffled order
    epoch = [x[0] for _, (x, _) in zip(range(len(ds)), ds.batches(1, seed=7))]
    windows = [ds[i][0] for i in range(len(ds))]
    assert sorted(map(tuple, map(torch.Tensor.tolist, epoch))) == sorted(map(tuple, map(torch.Tensor.tolist, windows)))
    assert not all(torch.equal(a, b) for a, b in zip(epoch, windows))


SYNTH = '''\
import os


def add(a, b=1, *args, key=None):
    """Return a plus b, then some."""
    return a + b


def nodoc(x):
    return x


def only_doc():
    """Nothing but a docstring here."""


def _private(x):
    """A private helper function."""
    return x


class Box:
    def size(self, scale):
        """Multiply the size of the box.

        Scale must be positive.
        """
        # keep comments
        return self.n * scale

    class Inner:
        def deep(self):
            """Nested classes are not visited."""
            return 1
'''


def test_docstring_pairs_on_synthetic_module(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(SYNTH)
    pairs = docstring_pairs([f, "def broken(:\n"])
    assert pairs == [
        ("Write a Python function `add(a, b=1, *args, key=None)` that: Return a plus b, then some.",
         "def add(a, b=1, *args, key=None):\n    return a + b\n"),
        ("Write a Python function `size(self, scale)` that: Multiply the size of the box.\n\nScale must be positive.",
         "def size(self, scale):\n    # keep comments\n    return self.n * scale\n"),
    ]


def test_docstring_pairs_from_stdlib_and_sft_dataset(tok):
    pairs = docstring_pairs(FEW)
    assert len(pairs) >= 5 and all('"""' not in code.split("\n", 1)[1][:8] for _, code in pairs)
    full, full_mask = tok.encode_chat([{"role": "user", "content": pairs[0][0]},
                                       {"role": "assistant", "content": pairs[0][1]}])
    T = full_mask.index(1) + 8  # the window cuts the first answer after a few tokens: truncated, not dropped
    assert len(full) > T + 1
    ds = SFTDataset(pairs, tok, seq_len=T)
    ids, targets, mask = ds[0]
    assert ids.shape == targets.shape == mask.shape == (T,)
    assert ids.tolist() == full[:T] and mask.tolist() == full_mask[1:T + 1]
    short = SFTDataset([("Write `f()`", "pass")], tok, seq_len=T)
    ids, targets, mask = short[0]
    answer = tok.decode(targets[mask.bool()].tolist())
    last = int(mask.nonzero().max())
    assert answer == f"pass{EOS}" and targets[last] == tok.eos_id and (targets[last + 1:] == tok.pad_id).all()
    b1 = next(ds.batches(3, seed=1, start_step=4))
    b2 = [b for _, b in zip(range(5), ds.batches(3, seed=1))][4]
    assert all(torch.equal(a, b) for a, b in zip(b1, b2)) and b1[0].shape == (3, T)
