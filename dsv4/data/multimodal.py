"""Training rows for the one multimodal model (issue 22): text, text->image, text->video, image->video and
image->caption, in the joint vocabulary of `dsv4.tokenizers.multimodal`, each with a loss weight per target token.

    text             a window of the text corpus                                    every target, weight `text`
    text->image      BOS caption  BOI codes EOI  EOS                                 caption: `text`, span: `visual`
    text->video      BOS caption  BOV (BOF codes)*T EOV  EOS                         caption: `text`, span: `visual`
    image->video     BOS "moving left"  BOV BOF <the image's codes> (BOF codes)*(T-1) EOV  EOS
                     the given first step weighs 0; the caption names only the motion, as `dsv4 animate` will
    image->caption   BOS  BOI codes EOI  caption EOS                                 only the caption: `text`
A caption is dropped (the row keeps BOS and the span alone) with probability `drop_caption`, so that the model also
learns the unconditional distribution that classifier-free guidance subtracts. Training packs visual examples (each
BOS ... EOS) into a row while they fit (`MultimodalMix.packed_row`); rows are padded to seq_len + 1 tokens with
weight 0. Row k of a seed is always the same row (`MultimodalMix.row`), so a resumed run continues
exactly. `CaptionedSampler` draws the captioned pixels (shapes and MNIST-5k digits, images and clips) that the pixel
tokenizer trains on and that become the rows' visual items.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from dsv4.data import digits as digit_data
from dsv4.data.visual import DIRECTIONS, all_image_specs, all_video_specs, draw_image, draw_video
from dsv4.tokenizers.multimodal import VisualVocab
from dsv4.tokenizers.text import Tokenizer

TASKS = ("text", "text->image", "text->video", "image->video", "image->caption")
# rows per task: text a fifth (its quality is reported, not the goal here); pictures most, the hardest to get right
DEFAULT_MIX = {"text": 0.2, "text->image": 0.35, "text->video": 0.2, "image->video": 0.15, "image->caption": 0.1}


PACK = 8  # examples drawn per packed row, at most

VISUAL_KINDS = ("shapes", "digits", "shape clips", "digit clips")


class CaptionedSampler:
    """Captioned samples of each of VISUAL_KINDS from a generator: shapes drawn afresh, digits from one split of
    MNIST-5k ("train" or "held_out"), clips of `frames` frames."""

    def __init__(self, size: int, frames: int, digit_split: str):
        images, labels = digit_data.load_mnist()
        train, held_out = digit_data.split(labels)
        pick = train if digit_split == "train" else held_out
        self.size, self.frames, self.digits, self.labels = size, frames, images[pick], labels[pick]
        self.image_specs, self.video_specs = all_image_specs(), all_video_specs()

    def sample(self, kind: str, g: torch.Generator) -> tuple[str, str | None, torch.Tensor]:
        """(caption, its motion words or None, uint8 pixels [F, H, W, 3]) (F = 1 for the image kinds)."""
        def pick(n: int) -> int:
            return int(torch.randint(n, (), generator=g))

        if kind == "shapes":
            spec = self.image_specs[pick(len(self.image_specs))]
            return spec.caption, None, draw_image(spec, self.size, g)[None]
        if kind == "shape clips":
            spec = self.video_specs[pick(len(self.video_specs))]
            return spec.caption, f"moving {spec.direction}", draw_video(spec, self.frames, self.size, g)
        if kind not in VISUAL_KINDS:
            raise ValueError(f"unknown kind {kind!r}; one of {VISUAL_KINDS}")
        k = pick(len(self.digits))
        digit, label = self.digits[k], int(self.labels[k])
        if kind == "digits":
            return digit_data.caption(label), None, digit_data.digit_image(digit, self.size)[None]
        direction = list(DIRECTIONS)[pick(4)]
        return (digit_data.caption(label, direction), f"moving {direction}",
                digit_data.digit_video(digit, direction, self.frames, self.size, g))


@dataclass(frozen=True)
class VisualItem:
    """One captioned sample, already tokenized by the pixel tokenizer: FSQ ids [T, h w] (T = 1: an image)."""
    caption: str
    codes: torch.Tensor
    motion: str | None = None  # the caption's motion words ("moving left") for a clip, used by image->video


@dataclass
class Weights:
    """Loss weight of text targets and of visual-span targets (codes, frame markers, the closing tokens)."""
    text: float = 1.0
    visual: float = 1.0


def row(task: str, item: VisualItem | None, tok: Tokenizer, vocab: VisualVocab, weights: Weights,
        drop: bool = False, text: list[int] | None = None) -> tuple[list[int], list[float]]:
    """One example -> (token ids, weight of each id as a target: weights[i] is how much predicting ids[i] counts;
    the first id is never predicted). `drop` leaves the caption out; `text` is the window of a text row."""
    if task == "text":
        return list(text), [0.0] + [weights.text] * (len(text) - 1)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; one of {TASKS}")
    words = item.motion if task == "image->video" else item.caption
    if task == "image->video" and words is None:
        raise ValueError("image->video needs a clip with its motion words")
    caption = [] if drop else tok.encode(words)
    if task == "image->caption":
        span = vocab.image(item.codes[0])
        return [tok.bos_id, *span, *caption, tok.eos_id], [0.0] * (1 + len(span)) + [weights.text] * (len(caption) + 1)
    span = vocab.image(item.codes[0]) if task == "text->image" else vocab.video(item.codes)
    span_w = [weights.visual] * len(span)
    if task == "image->video":  # BOV BOF and the first step's codes are given
        span_w[:2 + vocab.step_codes] = [0.0] * (2 + vocab.step_codes)
    ids = [tok.bos_id, *caption, *span, tok.eos_id]
    return ids, [0.0] + [weights.text] * len(caption) + span_w + [weights.visual]


@dataclass
class MultimodalMix:
    """Endless batches of rows of `seq_len + 1` tokens: each row a task drawn with probability `mix[task]`, its sample
    drawn from `images` (for text->image, image->caption) or `clips` (text->video, image->video), or a window of
    `text_tokens`. Batches are (ids, targets, weights) [B, seq_len], as the trainer's masked loss takes them."""
    tok: Tokenizer
    vocab: VisualVocab
    text_tokens: torch.Tensor
    images: list[VisualItem]
    clips: list[VisualItem]
    seq_len: int
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    drop_caption: float = 0.1
    weights: Weights = field(default_factory=Weights)
    pack: bool = True  # several visual examples per row (`packed_row`)

    def __post_init__(self):
        unknown = set(self.mix) - set(TASKS)
        if unknown or not self.mix or min(self.mix.values()) < 0:
            raise ValueError(f"a task mix weighs some of {TASKS} (>= 0), got {self.mix}")
        self._tasks = list(self.mix)
        self._p = torch.tensor([self.mix[t] for t in self._tasks], dtype=torch.float64)

    def example(self, k: int, seed: int = 0) -> tuple[str, list[int], list[float]]:
        """Example k of `seed`, unpadded -> (task, ids, weights); a text example is a whole row's window."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        task = self._tasks[int(torch.multinomial(self._p, 1, generator=g))]
        if task == "text":
            start = int(torch.randint(0, len(self.text_tokens) - self.seq_len - 1, (), generator=g))
            ids, w = row(task, None, self.tok, self.vocab, self.weights,
                         text=self.text_tokens[start:start + self.seq_len + 1].tolist())
        else:
            pool = self.images if task in ("text->image", "image->caption") else self.clips
            item = pool[int(torch.randint(0, len(pool), (), generator=g))]
            drop = task != "image->caption" and float(torch.rand((), generator=g)) < self.drop_caption
            ids, w = row(task, item, self.tok, self.vocab, self.weights, drop=drop)
        if len(ids) > self.seq_len + 1:
            raise ValueError(f"a {task} row has {len(ids)} tokens, more than seq_len + 1 = {self.seq_len + 1}")
        return task, ids, w

    def _padded(self, task: str, ids: list[int], w: list[float]) -> tuple[str, torch.Tensor, torch.Tensor]:
        pad = self.seq_len + 1 - len(ids)
        return task, torch.tensor(ids + [self.tok.pad_id] * pad), torch.tensor(w + [0.0] * pad)

    def row(self, k: int, seed: int = 0) -> tuple[str, torch.Tensor, torch.Tensor]:
        """Row k of `seed`, one example -> (task, ids [seq_len + 1], weights [seq_len + 1]); too long an example is
        an error."""
        return self._padded(*self.example(k, seed))

    def packed_row(self, k: int, seed: int = 0) -> tuple[str, torch.Tensor, torch.Tensor]:
        """Row k of `seed`, packed: example k PACK of `seed` decides; a text window fills the row alone, a visual
        example is followed by the next visual examples (k PACK + 1, ...; text ones skipped, so a row is text as
        often as `mix` says) while they fit, each from its BOS to its EOS -> (the first example's task, ids,
        weights). Visual rows are ~130 tokens, so a 256-token row holds ~1.6 where it held one."""
        task, ids, w = self.example(k * PACK, seed)
        for j in range(1, PACK if task != "text" else 1):
            more, more_ids, more_w = self.example(k * PACK + j, seed)
            if more == "text":
                continue
            if len(ids) + len(more_ids) > self.seq_len + 1:
                break
            ids, w = ids + more_ids, w + more_w  # its BOS weighs 0: never a target
        return self._padded(task, ids, w)

    def batches(self, batch_size: int, seed: int = 0, start_step: int = 0
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        step = start_step
        while True:
            make = self.packed_row if self.pack else self.row
            rows = [make(step * batch_size + j, seed) for j in range(batch_size)]
            ids = torch.stack([r[1] for r in rows])
            w = torch.stack([r[2] for r in rows])
            yield ids[:, :-1], ids[:, 1:], w[:, 1:]
            step += 1
