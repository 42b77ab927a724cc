"""One vocabulary for text, images and clips (Emu3 / Chameleon style): the text tokenizer's ids, then a frame marker,
then the pixel tokenizer's FSQ codes, so that one embedding and one output head serve every modality (issue 22).

    ids [0, text_size)                       the BPE tokenizer's (its specials BOI, EOI, BOV, EOV included)
    id  text_size                            BOF: begins each latent step of a clip
    ids [text_size + 1, + codebook)          visual code c -> text_size + 1 + c

    an image   BOI  c_1 ... c_{h w}  EOI                                  (h w = 64 codes for 32 x 32 pixels)
    a clip     BOV  BOF c_1 ... c_{h w}  BOF ...  (T latent steps)  EOV    (its first step is its first frame's image)

`SpanConstraint` is the grammar a decoder follows inside a visual span: only visual codes, exactly h w of them per
step, BOF before each step of a clip, and the closing token after the last one; outside a span, any text token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4.tokenizers.text import BOI, BOV, EOI, EOV, Tokenizer


@dataclass(frozen=True)
class VisualVocab:
    """Where the visual tokens sit in the joint vocabulary (see the module docstring)."""
    text_size: int
    codebook: int
    step_codes: int  # codes per latent step (h w)
    boi: int
    eoi: int
    bov: int
    eov: int

    @classmethod
    def build(cls, tok: Tokenizer, codebook: int, step_codes: int) -> VisualVocab:
        return cls(tok.vocab_size, codebook, step_codes, *(tok.token_id(t) for t in (BOI, EOI, BOV, EOV)))

    @property
    def bof(self) -> int:
        return self.text_size

    @property
    def code0(self) -> int:
        return self.text_size + 1

    @property
    def size(self) -> int:
        return self.text_size + 1 + self.codebook

    def is_code(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.code0) & (ids < self.size)

    def image(self, codes: torch.Tensor) -> list[int]:
        """FSQ ids [h, w] (or one latent step [1, h, w]) -> BOI codes EOI."""
        flat = self._codes(codes.reshape(-1))
        return [self.boi, *flat, self.eoi]

    def video(self, codes: torch.Tensor) -> list[int]:
        """FSQ ids [T, h, w] -> BOV (BOF step)*T EOV."""
        steps = codes.reshape(codes.shape[0], -1)
        out = [self.bov]
        for step in steps:
            out += [self.bof, *self._codes(step)]
        return out + [self.eov]

    def _codes(self, flat: torch.Tensor) -> list[int]:
        if flat.numel() != self.step_codes:
            raise ValueError(f"a latent step has {self.step_codes} codes, got {flat.numel()}")
        if int(flat.min()) < 0 or int(flat.max()) >= self.codebook:
            raise ValueError(f"visual codes lie in [0, {self.codebook})")
        return (flat + self.code0).tolist()

    def parse(self, ids: list[int]) -> list[tuple[str, torch.Tensor]]:
        """The visual spans of a sequence, in order: ("image", FSQ ids [1, step_codes]) or ("video", [T,
        step_codes]). A span that breaks the grammar (a wrong count, a stray token, no closing token) is a
        ValueError naming where."""
        spans, i = [], 0
        while i < len(ids):
            if ids[i] == self.boi:
                codes, i = self._step(ids, i + 1), i + 1 + self.step_codes
                self._expect(ids, i, self.eoi, "end of image")
                spans.append(("image", codes[None]))
            elif ids[i] == self.bov:
                steps, i = [], i + 1
                while i < len(ids) and ids[i] == self.bof:
                    steps.append(self._step(ids, i + 1))
                    i += 1 + self.step_codes
                self._expect(ids, i, self.eov, "BOF or end of video")
                if not steps:
                    raise ValueError(f"the clip opened at {i - 1} has no latent step")
                spans.append(("video", torch.stack(steps)))
            elif ids[i] == self.bof or self.code0 <= ids[i] < self.size or ids[i] in (self.eoi, self.eov):
                raise ValueError(f"visual token {ids[i]} at {i} outside an image or a clip")
            i += 1
        return spans

    def _step(self, ids: list[int], start: int) -> torch.Tensor:
        step = torch.tensor(ids[start:start + self.step_codes])
        if step.numel() != self.step_codes or not bool(self.is_code(step).all()):
            raise ValueError(f"expected {self.step_codes} visual codes from position {start}")
        return step - self.code0

    @staticmethod
    def _expect(ids: list[int], i: int, token: int, what: str) -> None:
        if i >= len(ids) or ids[i] != token:
            raise ValueError(f"expected {what} at position {i}")


@dataclass
class SpanConstraint:
    """The decoding grammar of one visual span, opened by BOI (an image) or BOV (a clip of `steps` latent steps).
    `allowed()` is the id range the next token must come from, [lo, hi); `advance(id)` takes the chosen one.
    `done` once the closing token has been taken."""
    vocab: VisualVocab
    steps: int = 1  # latent steps of a clip (1 for an image)
    video: bool = False
    _step: int = 0
    _codes: int = 0  # codes taken in the current step (-1: its BOF is still due)
    done: bool = False

    def __post_init__(self):
        if self.video:
            self._codes = -1

    @property
    def length(self) -> int:
        """Tokens the whole span still writes after its opening token (codes, frame markers, the closing token)."""
        return self.steps * (self.vocab.step_codes + int(self.video)) + 1

    def allowed(self) -> tuple[int, int]:
        v = self.vocab
        if self.done:
            raise ValueError("the span is closed")
        if self._step == self.steps:
            closing = v.eov if self.video else v.eoi
            return closing, closing + 1
        if self._codes == -1:
            return v.bof, v.bof + 1
        return v.code0, v.size

    def advance(self, token: int) -> None:
        lo, hi = self.allowed()
        if not lo <= token < hi:
            raise ValueError(f"token {token} breaks the span's grammar: expected one of [{lo}, {hi})")
        if self._step == self.steps:
            self.done = True
        elif self._codes == -1:
            self._codes = 0
        else:
            self._codes += 1
            if self._codes == self.vocab.step_codes:
                self._step += 1
                self._codes = -1 if self.video and self._step < self.steps else 0

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [..., V] with every id outside `allowed()` set to -inf."""
        lo, hi = self.allowed()
        out = torch.full_like(logits, float("-inf"))
        out[..., lo:hi] = logits[..., lo:hi]
        return out


@dataclass
class TextOnly:
    """The grammar of a text reply from a multimodal model: any text id, never a frame marker or visual code (what
    the server's chat and completions ask of such a model). Never done."""
    text_size: int
    done: bool = False

    def allowed(self) -> tuple[int, int]:
        return 0, self.text_size

    def advance(self, token: int) -> None:
        if not 0 <= token < self.text_size:
            raise ValueError(f"token {token} is not a text id (< {self.text_size})")

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_fill(-1, torch.arange(self.text_size, logits.shape[-1], device=logits.device),
                                 float("-inf"))
