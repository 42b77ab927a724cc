"""`dsv4 eval`: held-out bits-per-byte against a bigram baseline, sample completions, HumanEval and needle-in-a-haystack
retrieval for a checkpoint (`evaluate` runs what is asked and prints each part as it finishes).

The held-out split is the one the checkpoint was trained with (its `train_config.json` names the corpus and
val_frac), so bpb is measured on files the model never saw.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dsv4.atomic import atomic_text
from dsv4.eval.niah import LENGTHS as NIAH_LENGTHS

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
                cache_dir: Path | None = None, stride: int | None = None) -> dict:
    """bpb of the model and of interpolated Kneser-Ney n-grams of order 2, 3 and 4 (fit on the train split) on the
    same held-out tokens: where the model stands between counting pairs and counting phrases. The model reads
    windows of seq_len tokens every `stride` (default seq_len // 2: each token after the first window has at least
    half a window of context; seq_len = back to back windows, see dsv4.eval.bpb.windows)."""
    from dsv4.data.corpus import load_corpus
    from dsv4.eval.bpb import bigram_bpb, bits_per_byte, ngram_bpb, token_byte_lengths

    train_docs, val_docs = load_corpus(data, val_frac)
    with tempfile.TemporaryDirectory() as tmp:
        where = cache_dir if cache_dir is not None else Path(tmp)
        train = _token_stream(train_docs, tok, where / "train.bin")
        val = _token_stream(val_docs, tok, where / "val.bin")
    if max_tokens:
        val = val[:max_tokens + 1]
    nbytes = token_byte_lengths(tok.tok)
    device = next(model.parameters()).device
    stride = stride or max(seq_len // 2, 1)
    ours = bits_per_byte(lambda ids: model(ids.to(device)), val, nbytes, seq_len, stride=stride)
    bigram = bigram_bpb(train, val, nbytes, tok.vocab_size)
    higher = {f"kn{n}_bpb": ngram_bpb(train, val, nbytes, tok.vocab_size, order=n).bpb
              if tok.vocab_size ** n < 2**63 else None for n in (3, 4)}  # None: a vocabulary too large for the keys
    return {"bpb": ours.bpb, "bigram_bpb": bigram.bpb, **higher, "val_tokens": ours.tokens, "val_bytes": ours.bytes,
            "val_files": len(val_docs), "nats_per_token": ours.nats_per_token, "window": seq_len, "stride": stride}


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


def settled(cfg: TrainedOn | None, data: str | None, val_frac: float | None, seq_len: int | None) -> TrainedOn:
    """The corpus, held-out share and window to evaluate on: those given, else the checkpoint's, else the defaults."""
    return TrainedOn(data if data is not None else (cfg.data if cfg else None),
                     val_frac or (cfg.val_frac if cfg else 0.03), seq_len or (cfg.seq_len if cfg else 512))


def report_bpb(model, tok, on: TrainedOn, max_tokens: int, cache: Path | None, stride: int | None = None) -> dict:
    r = heldout_bpb(model, tok, on.data, on.val_frac, on.seq_len, max_tokens or None, cache, stride)
    grams = ", ".join(f"{n}-gram {r[f'kn{n}_bpb']:.4f}" for n in (3, 4) if r[f"kn{n}_bpb"] is not None)
    print(f"held-out bits per byte: {r['bpb']:.4f}   (Kneser-Ney baselines: bigram {r['bigram_bpb']:.4f}"
          f"{', ' + grams if grams else ''}; {r['val_tokens']} tokens, {r['val_bytes']} bytes"
          f" of {r['val_files']} files never trained on, read in {r['window']}-token windows every {r['stride']})")
    return r


def report_samples(model, tok) -> list[dict]:
    samples = sample_completions(model, tok)
    for s in samples:
        print(f"\n----- {s['mode']}: {s['prompt']!r}\n{s['prompt'] if s['mode'] == 'raw' else ''}{s['completion']}")
    return samples


def report_syntax(model, tok, on: TrainedOn) -> dict:
    """Greedy bodies for held-out function signatures, checked with ast (dsv4.eval.syntax)."""
    from dsv4.data.corpus import load_corpus, read_doc
    from dsv4.eval.syntax import syntax_check

    _, val_docs = load_corpus(on.data, on.val_frac)
    r = syntax_check(model, tok, (read_doc(d) for d in val_docs))  # sources that do not parse are skipped
    print(f"\nsyntax: {r['parsed']}/{r['signatures']} greedy bodies of held-out function signatures parse "
          f"({r['ended']} ended within the token budget)")
    return r


def report_humaneval(model, tok, max_new_tokens: int, limit: int | None) -> dict:
    r = humaneval(model, tok, max_new_tokens, limit)
    print(f"\nHumanEval pass@1 (greedy): {r['pass@1']:.4f}  ({r['passed']}/{r['problems']})")
    return r


def heldout_tokens(tok, data: str | None, val_frac: float):
    """The held-out split's tokens (a numpy array): the haystacks NIAH cuts its prompts from."""
    import numpy as np

    from dsv4.data.corpus import load_corpus, load_tokens, tokenize_corpus

    _, val_docs = load_corpus(data, val_frac)
    with tempfile.TemporaryDirectory() as tmp:
        tokenize_corpus(val_docs, tok, Path(tmp) / "val.bin", progress=False)
        return np.array(load_tokens(Path(tmp) / "val.bin"))


def report_niah(model, tok, filler, lengths: list[int], depths: int, samples: int, seed: int,
                out: str | os.PathLike) -> dict:
    """The needle-in-a-haystack grid with a progress bar, printed by length and written to `out` as niah.json +
    niah.png -> the report without its per-prompt results."""
    import numpy as np

    from dsv4.eval.niah import needle_in_a_haystack, write_report

    where = np.linspace(0, 1, depths).round(4).tolist() if depths > 1 else [0.5]
    with tqdm(total=len(lengths) * len(where) * samples, desc="needle in a haystack", unit="prompt",
              file=sys.stderr) as bar:
        def tick(r):
            bar.set_postfix_str(f"{r['length']} tokens, depth {r['depth']:.0%}: {'ok' if r['correct'] else 'miss'}")
            bar.update()
        report = needle_in_a_haystack(model, tok, filler, lengths, where, samples, seed=seed, progress=tick)
    json_path, png = write_report(report, out)
    print("\nneedle in a haystack (pass key), retrieved by context length:")
    for L, acc in zip(report["lengths"], report["by_length"]):
        print(f"  {L:>8} tokens: {acc:.0%}")
    print(f"({json_path}, {png})")
    return {k: v for k, v in report.items() if k != "results"}


def evaluate(ckpt: str | os.PathLike, *, data: str | None = None, val_frac: float | None = None,
             seq_len: int | None = None, stride: int | None = None, max_tokens: int = 0, bpb: bool = True,
             samples: bool = True, humaneval: bool = False, humaneval_limit: int | None = None,
             max_new_tokens: int = 128, niah: bool = False, niah_lengths: Sequence[int] = NIAH_LENGTHS,
             niah_depths: int = 5, niah_samples: int = 2, niah_seed: int = 0, niah_out: str | os.PathLike | None = None,
             device: str | None = None, dtype: str = "auto", json_path: str | os.PathLike | None = None) -> dict:
    """`dsv4 eval`: what is asked of held-out bpb (on the data the checkpoint was trained with unless `data` says
    otherwise; max_tokens 0 = all), sample completions, HumanEval pass@1 and the NIAH grid (written to niah_out,
    default the checkpoint), each printed as it finishes -> the report (also written to json_path if given)."""
    from dsv4.device import parse_device, resolve_dtype

    device = parse_device(device)
    model, tok, cfg = load(ckpt, device, resolve_dtype(dtype, device))
    on = settled(cfg, data, val_frac, seq_len)
    report: dict = {"ckpt": ckpt}
    if bpb:
        cache = Path(ckpt).parent / "data" if cfg and data is None else None  # the trainer's token files
        report["bpb"] = report_bpb(model, tok, on, max_tokens, cache, stride)
    if samples:
        report["samples"] = report_samples(model, tok)
        report["syntax"] = report_syntax(model, tok, on)
    if humaneval:  # (the flag; the function of that name runs in report_humaneval)
        report["humaneval"] = report_humaneval(model, tok, max_new_tokens, humaneval_limit)
    if niah:
        filler = heldout_tokens(tok, on.data, on.val_frac)
        report["niah"] = report_niah(model, tok, filler, list(niah_lengths), niah_depths, niah_samples, niah_seed,
                                     niah_out or ckpt)
    if json_path:
        atomic_text(json_path, json.dumps(report, indent=1))
    return report
