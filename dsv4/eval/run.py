"""`dsv4 eval`: held-out bits-per-byte against a bigram baseline, sample completions and HumanEval for a checkpoint.

The held-out split is the one the checkpoint was trained with (its `train_config.json` names the corpus and
val_frac), so bpb is measured on files the model never saw.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

COMPLETION_PROMPTS = (
    "def fibonacci(n):",
    'def is_prime(n):\n    """Return True if n is a prime number."""',
    "def reverse_words(sentence):",
)
CHAT_PROMPTS = (
    "Write a Python function `fibonacci(n)` that: Return the n-th Fibonacci number.",
)


@dataclass(frozen=True)
class TrainedOn:
    """The data a checkpoint was trained on, from the run's train_config.json (read as JSON: evaluation never imports
    the trainer): the corpus, the held-out share and the pretraining window."""
    data: str | None
    val_frac: float
    seq_len: int

    @classmethod
    def read(cls, ckpt: str | os.PathLike) -> TrainedOn | None:
        path = Path(ckpt) / "train_config.json"
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        return cls(raw.get("data"), float(raw.get("val_frac", 0.03)), int(raw.get("pretrain", {}).get("seq_len", 512)))


def load(ckpt: str | os.PathLike, device: torch.device | None = None, dtype: torch.dtype | None = None):
    """(model in eval mode, tokenizer, what it was trained on or None) of a checkpoint directory."""
    from dsv4.weights.checkpoint import load_checkpoint

    model, tok = load_checkpoint(ckpt, device, dtype)
    return model, tok, TrainedOn.read(ckpt)


def _token_stream(docs, tok, cache: Path) -> torch.Tensor:
    from dsv4.data.corpus import load_tokens, tokenize_corpus

    tokenize_corpus(docs, tok, cache, progress=False)  # reuses the trainer's file when it matches
    return torch.from_numpy(load_tokens(cache).astype("int64"))


def heldout_bpb(model, tok, data: str | None, val_frac: float, seq_len: int, max_tokens: int | None = None,
                cache_dir: Path | None = None) -> dict:
    """bpb of the model and of a Kneser-Ney bigram (fit on the train split) on the same held-out tokens."""
    from dsv4.data.corpus import load_corpus
    from dsv4.eval.bpb import bigram_bpb, bits_per_byte, token_byte_lengths

    train_docs, val_docs = load_corpus(data, val_frac)
    with tempfile.TemporaryDirectory() as tmp:
        where = cache_dir if cache_dir is not None else Path(tmp)
        train = _token_stream(train_docs, tok, where / "train.bin")
        val = _token_stream(val_docs, tok, where / "val.bin")
    if max_tokens:
        val = val[:max_tokens + 1]
    nbytes = token_byte_lengths(tok.tok)
    device = next(model.parameters()).device
    ours = bits_per_byte(lambda ids: model(ids.to(device)), val, nbytes, seq_len)
    bigram = bigram_bpb(train, val, nbytes, tok.vocab_size)
    return {"bpb": ours.bpb, "bigram_bpb": bigram.bpb, "val_tokens": ours.tokens, "val_bytes": ours.bytes,
            "val_files": len(val_docs), "nats_per_token": ours.nats_per_token}


def sample_completions(model, tok, max_new_tokens: int = 96) -> list[dict]:
    """Greedy continuations of a few code prompts (raw) and of chat requests (rendered in the chat template)."""
    from dsv4.data.corpus import chat_messages
    from dsv4.eval.complete import complete

    raw = complete(model, tok, COMPLETION_PROMPTS, max_new_tokens, stops=("\ndef ", "\nclass ", "\nif __name__"))
    chats = [tok.encode_chat(chat_messages(p, "")[:1], add_generation_prompt=True)[0] for p in CHAT_PROMPTS]
    answers = complete(model, tok, chats, max_new_tokens)
    return ([{"prompt": p, "completion": c, "mode": "raw"} for p, c in zip(COMPLETION_PROMPTS, raw)]
            + [{"prompt": p, "completion": c, "mode": "chat"} for p, c in zip(CHAT_PROMPTS, answers)])


def sandbox_python() -> str:
    """An interpreter the sandbox can run as `nobody` when we are root (a venv under root's home may not be)."""
    from dsv4.eval.sandbox import can_run_as_nobody

    if os.geteuid() != 0:
        return sys.executable
    for python in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(python) and can_run_as_nobody(python):
            return python
    return sys.executable


def humaneval(model, tok, max_new_tokens: int = 128, limit: int | None = None, batch_size: int = 16,
              progress: bool = True) -> dict:
    """Greedy pass@1 on HumanEval (or its first `limit` problems), candidates run in the sandbox."""
    from dsv4.eval.complete import complete
    from dsv4.eval.humaneval import STOP_SEQUENCES, evaluate, load_problems
    from dsv4.eval.sandbox import Limits

    # the prompt is right-stripped, as evaluation harnesses commonly do: it ends in a bare newline, a token boundary
    # byte-level BPE almost never produced in training (it merges the newline with the next line's indentation)
    problems = {tid: {**p, "prompt": p["prompt"].rstrip()} for tid, p in load_problems().items()}
    if limit:
        problems = dict(list(problems.items())[:limit])
    ids = list(problems)
    bar = tqdm(total=len(ids), desc="humaneval", unit="problem", disable=not progress)
    t0 = time.perf_counter()
    completions = complete(model, tok, [problems[i]["prompt"] for i in ids], max_new_tokens,
                           stops=STOP_SEQUENCES, batch_size=batch_size, progress=bar.update)
    bar.close()
    gen_s = time.perf_counter() - t0
    report = evaluate({i: [c] for i, c in zip(ids, completions)}, k=(1,), problems=problems,
                      limits=Limits(python=sandbox_python()))
    return {"pass@1": report.pass_at[1], "passed": report.num_passed, "problems": len(ids),
            "generation_seconds": gen_s,
            "passed_tasks": [i for i, rs in report.results.items() if rs[0].passed]}
