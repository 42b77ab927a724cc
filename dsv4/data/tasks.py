"""Synthetic long-context tasks: retrieval a model can only do by reading far back. Mixed into long-context training
(at <= 8K tokens) and used by the needle-in-a-haystack evaluation (dsv4.eval.niah, to 128K and beyond).

    passkey       "# The pass key is 48213. Remember it. 48213 is the pass key." hidden in the filler at a depth;
                  at the end "# What is the pass key? The pass key is" -> " 48213."
    kv            "# 3fa9c1 -> 7b0d4e" lines spread through the filler (a key-value store the model must look up);
                  at the end several "# 3fa9c1 ->" questions, each followed by its value
    multi_needle  several "# The magic number for <word> is <n>." needles at random depths; asked for some of them
    recall        a note (a span of the filler) at a depth; at the end its first tokens as a cue, then the rest of it:
                  a dense signal (every answer token is a look-up far back)
    copy          a span of filler tokens drawn at random (shuffled text) at a depth, then the same span again at the
                  end: nothing but a look-up far back predicts it, the plainest signal to learn copying (induction)

Samples are assembled from token ids: the haystack is a window of real text (a token stream of the training corpus,
so it looks like what the model reads) and the needles, questions and answers are encoded on their own and spliced in
at whole-token boundaries, so the sample has exactly the requested length. `answer_mask` marks the answer tokens;
`prompt_len` is where the first answer starts (what an evaluation prompts with).
Everything is drawn from a numpy Generator: the same seed gives the same samples.

Needle depths drawn at random are uniform, except that a share `edge_frac` of the single-needle samples (passkey,
recall, copy) put the needle at an edge: depth 0 (the first tokens, where attention sinks) or 1 (just before the
question, inside the sliding window). Uniform draws land there rarely (a needle within the last 64 of 1K tokens is
~6% of them), yet every needle-in-a-haystack grid has a row at each edge; models trained without them missed there.

In training (`LongContextMix`) a task sample trains on every token, and its few answer tokens weigh as much as all the
others together: the text keeps the language model intact (answers alone wreck it within a few hundred steps) and
the answers carry the retrieval signal (at a plain 5x weight they were a few percent of the gradient, and nothing
was learned).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

KINDS = ("passkey", "kv", "multi_needle", "recall", "copy")
ONE_NEEDLE = ("passkey", "recall", "copy")  # the kinds whose needle's depth `sample` takes
WORDS = ("apple", "river", "falcon", "copper", "lantern", "meadow", "quartz", "harbor", "violet", "summit", "ember",
         "glacier", "orchid", "thunder", "saffron", "marble", "willow", "comet", "cedar", "tundra")


def _fraction(name: str, value: float) -> float:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


@dataclass
class TaskSample:
    kind: str
    ids: list[int]  # the whole sequence
    answer_mask: list[int]  # 1 on the tokens of the answers
    prompt_len: int  # tokens before the first answer
    answers: list[str] = field(default_factory=list)  # expected answer texts, in order
    depths: list[float] = field(default_factory=list)  # where the needles sit (0 = start, 1 = just before the end)


class TaskGenerator:
    """Samples of the tasks above over a filler token stream (e.g. `dsv4.data.load_tokens(...)` of the corpus)."""

    def __init__(self, tokenizer, filler: np.ndarray, seed: int = 0, edge_frac: float = 0.0):
        if len(filler) < 64:
            raise ValueError(f"the filler stream has {len(filler)} tokens; the tasks need at least 64")
        self.tok, self.filler, self.rng = tokenizer, np.asarray(filler), np.random.default_rng(seed)
        self.edge_frac = _fraction("edge_frac", edge_frac)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def haystack(self, n: int) -> list[int]:
        """n tokens of filler from a random offset (wrapping around a short stream)."""
        if n <= 0:
            return []
        start = int(self.rng.integers(len(self.filler)))
        idx = (start + np.arange(n)) % len(self.filler)
        return self.filler[idx].astype(np.int64).tolist()

    def sample(self, kind: str, length: int, depth: float | None = None) -> TaskSample:
        """One sample of exactly `length` tokens; `depth` fixes the (first) needle's position (passkey)."""
        if kind not in KINDS:
            raise ValueError(f"unknown task {kind!r}; choose one of {', '.join(KINDS)}")
        # (edge_frac 0 draws nothing: the same seed gives the same samples as before the option existed)
        if depth is None and kind in ONE_NEEDLE and self.edge_frac and self.rng.random() < self.edge_frac:
            depth = float(self.rng.integers(2))  # at an edge: the start or just before the question
        return getattr(self, kind)(length, depth)

    # --- the tasks: needles [(text ids)], then questions and answers at the end ---
    def passkey(self, length: int, depth: float | None = None) -> TaskSample:
        key = str(int(self.rng.integers(10000, 100000)))
        needle = self.encode(f"\n# The pass key is {key}. Remember it. {key} is the pass key.\n")
        qa = [(self.encode("\n# What is the pass key? The pass key is"), self.encode(f" {key}."), key)]
        return self._assemble("passkey", length, [needle], qa, [depth])

    def kv(self, length: int, depth: float | None = None) -> TaskSample:
        n = int(np.clip(length // 256, 4, 400))
        keys = [self.rng.bytes(3).hex() for _ in range(n)]
        values = [self.rng.bytes(3).hex() for _ in range(n)]
        needles = [self.encode(f"\n# {k} -> {v}\n") for k, v in zip(keys, values)]
        asked = self.rng.choice(n, size=min(4, n), replace=False)
        qa = [(self.encode(f"\n# {keys[i]} ->"), self.encode(f" {values[i]}"), values[i]) for i in asked]
        return self._assemble("kv", length, needles, qa, [None] * n)

    def multi_needle(self, length: int, depth: float | None = None) -> TaskSample:
        n = min(int(self.rng.integers(3, 9)), max(length // 128, 1))  # short samples hold fewer needles
        words = self.rng.choice(len(WORDS), size=n, replace=False)
        numbers = [str(int(self.rng.integers(100, 10000))) for _ in range(n)]
        needles = [self.encode(f"\n# The magic number for {WORDS[w]} is {x}.\n") for w, x in zip(words, numbers)]
        asked = self.rng.choice(n, size=min(3, n), replace=False)
        qa = [(self.encode(f"\n# The magic number for {WORDS[words[i]]} is"), self.encode(f" {numbers[i]}."),
               numbers[i]) for i in asked]
        return self._assemble("multi_needle", length, needles, qa, [None] * n)

    def recall(self, length: int, depth: float | None = None) -> TaskSample:
        n = int(np.clip(length // 16, 16, 64))  # the note's tokens: the first CUE are asked with, the rest answered
        note = self.haystack(n)
        needle = self.encode("\n# Note: ") + note + self.encode("\n")
        qa = [(self.encode("\n# Recall the note: ") + note[: self.CUE], note[self.CUE:],
               self.tok.decode(note[self.CUE:]))]
        return self._assemble("recall", length, [needle], qa, [depth])

    CUE = 4  # tokens of the note given with the recall question

    def copy(self, length: int, depth: float | None = None) -> TaskSample:
        n = int(np.clip(length // 16, 16, 48))
        span = self.filler[self.rng.integers(len(self.filler), size=n)].astype(np.int64).tolist()
        return self._assemble("copy", length, [span], [(span[:1], span[1:], self.tok.decode(span[1:]))], [depth])

    def _assemble(self, kind: str, length: int, needles: list[list[int]], qa: list[tuple[list[int], list[int], str]],
                  depths: list[float | None]) -> TaskSample:
        tail = sum(len(q) + len(a) for q, a, _ in qa)
        room = length - tail - sum(len(n) for n in needles)
        if room < 0:
            raise ValueError(f"a {kind} sample needs more than {length} tokens ({length - room})")
        depths = [float(self.rng.random()) if d is None else float(d) for d in depths]
        if any(not 0 <= d <= 1 for d in depths):
            raise ValueError(f"needle depths must be in [0, 1], got {depths}")
        cuts = sorted((round(d * room), i) for i, d in enumerate(depths))  # filler tokens before each needle
        hay = self.haystack(room)
        ids, at = [], 0
        for cut, i in cuts:
            ids += hay[at:cut] + needles[i]
            at = cut
        ids += hay[at:]
        mask = [0] * len(ids)
        prompt_len = None
        for q, a, _ in qa:
            ids += q
            mask += [0] * len(q)
            prompt_len = len(ids) if prompt_len is None else prompt_len
            ids += a
            mask += [1] * len(a)
        return TaskSample(kind, ids, mask, prompt_len, [text for _, _, text in qa], depths)


class LongContextMix:
    """Training batches for the long-context stage: each step is, with probability `task_frac`, a batch of synthetic
    task samples (loss everywhere, the answers of a row weighing as much as the rest of it) and otherwise plain
    windows of the corpus (loss everywhere), both `seq_len` tokens. The mask is the per-token loss weight; edge_frac
    is the generator's share of needles at depth 0 or 1. Step k depends only on (seed, k), as the trainer's resume
    requires."""

    def __init__(self, tokenizer, tokens: np.ndarray, seq_len: int, task_frac: float = 0.5,
                 kinds: tuple[str, ...] = KINDS, edge_frac: float = 0.0):
        _fraction("task_frac", task_frac), _fraction("edge_frac", edge_frac)  # checked now, not at a task step
        if not kinds or any(k not in KINDS for k in kinds):
            raise ValueError(f"tasks must be some of {', '.join(KINDS)}, got {', '.join(kinds) or 'none'}")
        if len(tokens) < seq_len + 1:
            raise ValueError(f"{len(tokens)} corpus tokens are fewer than one window of {seq_len + 1}")
        self.tok, self.tokens, self.seq_len, self.task_frac, self.kinds = tokenizer, tokens, seq_len, task_frac, kinds
        self.edge_frac = edge_frac

    def batch(self, batch_size: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([seed, step])
        T = self.seq_len
        if rng.random() < self.task_frac:
            gen = TaskGenerator(self.tok, self.tokens, seed=int(rng.integers(2 ** 63)), edge_frac=self.edge_frac)
            rows = [gen.sample(self.kinds[int(rng.integers(len(self.kinds)))], T + 1) for _ in range(batch_size)]
            ids = torch.tensor([r.ids for r in rows])
            answers = torch.tensor([r.answer_mask for r in rows], dtype=torch.float32)[:, 1:]
            n = answers.sum(1, keepdim=True)  # the answers weigh as much as the rest of their row
            mask = torch.where(answers > 0, (T - n) / n.clamp(min=1), torch.ones_like(answers))
        else:
            starts = rng.integers(0, len(self.tokens) - T - 1, size=batch_size)
            ids = torch.from_numpy(np.stack([self.tokens[s: s + T + 1] for s in starts]).astype(np.int64))
            mask = torch.ones(batch_size, T)
        return ids[:, :-1], ids[:, 1:], mask

    def batches(self, batch_size: int, seed: int = 0, start_step: int = 0
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        step = start_step
        while True:
            yield self.batch(batch_size, seed, step)
            step += 1
