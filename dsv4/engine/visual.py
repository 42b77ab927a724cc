"""Images and clips from a multimodal checkpoint (`dsv4 multimodal`'s OUT/final), through the engine (issue 22).

    text->image    BOS caption BOI  -> the span's 64 codes, constrained (SpanConstraint), guided by BOS BOI
    text->video    BOS caption BOV  -> BOF codes ... for `steps` latent steps, guided by BOS BOV
    image->video   BOS "moving left" BOV BOF <the image's codes>  -> the remaining steps, guided by BOS BOV BOF <codes>
A `VisualJob` is one such prompt: what to submit to an engine for each sample (`requests`: its own seed, its span
grammar and, with a guidance scale != 1, its unconditional row, `dsv4.engine.guidance`) and how the generated ids
become pixels (`decode`, through the checkpoint's pixel tokenizer). `generate_images` / `generate_clips` run jobs on
an engine of their own; the server submits the same requests to the engine it serves text with.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv4.engine.engine import Engine
from dsv4.engine.sampling import SamplingParams
from dsv4.tokenizers.multimodal import SpanConstraint, VisualVocab
from dsv4.tokenizers.pixels import PixelTokenizer, load_pixels, to_uint8, to_unit
from dsv4.tokenizers.text import Tokenizer

# the sampling that `dsv4 image` / `video` / `animate` and the server use unless told otherwise: chosen on the 40-minute
# `make run-multimodal` model with bench/multimodal.py (seed 0), where a lower temperature and a milder guidance
# than 1.0 / 3.0 drew cleaner shapes (docs/NOTES.md, issue 22's second pass)
TEMPERATURE = 0.7
CFG_SCALE = 2.0


@dataclass
class VisualModel:
    model: torch.nn.Module
    tok: Tokenizer
    vocab: VisualVocab
    pixels: PixelTokenizer

    @classmethod
    def load(cls, ckpt: str | Path, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> VisualModel:
        from dsv4.weights.checkpoint import from_pretrained

        vocab = read_vocab(ckpt)
        model = from_pretrained(ckpt, device=device, dtype=dtype).eval()
        return cls(model, Tokenizer.from_file(Path(ckpt) / "tokenizer.json"), vocab,
                   load_pixels(Path(ckpt) / "pixels", next(model.parameters()).device))

    @property
    def size(self) -> int:
        """The side of the images, in pixels."""
        return self.pixels.args.size


def read_vocab(ckpt: str | Path) -> VisualVocab:
    """A multimodal checkpoint's joint vocabulary; FileNotFoundError for a text-only checkpoint."""
    path = Path(ckpt) / "multimodal.json"
    if not path.exists():
        raise FileNotFoundError(f"{ckpt} is not a multimodal checkpoint (no multimodal.json): train one with "
                                "`dsv4 multimodal`")
    return VisualVocab(**json.loads(path.read_text()))


@dataclass
class VisualJob:
    """One prompt's engine requests and how their outputs become pixels."""
    prompt: list[int]
    uncond: list[int]    # the prompt without its words, for classifier-free guidance
    head: list[int]      # the span's given start (BOI; BOV; BOV BOF <an image's codes>)
    steps: int           # latent steps of the decoded result (1: an image)
    new_steps: int       # of which the engine generates
    video: bool

    def span(self, vocab: VisualVocab) -> SpanConstraint:
        return SpanConstraint(vocab, steps=self.new_steps, video=self.video)

    def max_len(self, vocab: VisualVocab) -> int:
        """Cache positions one request needs: the prompt and the span."""
        return len(self.prompt) + self.span(vocab).length + 1

    def requests(self, vm: VisualModel, n: int, params: SamplingParams, cfg_scale: float,
                 seed: int | None) -> list[dict]:
        """`Engine.submit` keywords of n samples (seeds seed, seed + 1, ...; None: unseeded), the prompt under
        "prompt"."""
        out = []
        for i in range(n):
            span = self.span(vm.vocab)
            out.append(dict(prompt=self.prompt,
                            params=dataclasses.replace(params, seed=None if seed is None else seed + i),
                            max_new_tokens=span.length, ignore_eos=True, processor=span,
                            guidance=(self.uncond, cfg_scale) if cfg_scale != 1.0 else None))
        return out

    def decode(self, vm: VisualModel, outputs: list[list[int]]) -> torch.Tensor:
        """The engine's outputs (each a whole span's remaining ids) -> uint8 [n, H, W, 3] for an image job, else
        [n, F, H, W, 3]."""
        spans = [vm.vocab.parse([*self.head, *o])[0][1] for o in outputs]
        g = vm.pixels.args.grid
        x = to_uint8(vm.pixels.decode(torch.stack(spans).view(len(outputs), self.steps, g, g)))
        return x if self.video else x[:, 0]


def image_job(vm: VisualModel, caption: str) -> VisualJob:
    v, tok = vm.vocab, vm.tok
    return VisualJob([tok.bos_id, *tok.encode(caption), v.boi], [tok.bos_id, v.boi], [v.boi], 1, 1, False)


def clip_job(vm: VisualModel, caption: str, steps: int = 3, image: torch.Tensor | None = None) -> VisualJob:
    """A clip of `steps` latent steps (1 + (steps - 1) t frames); with `image` (uint8 [H, W, 3]) it starts from it
    (image->video: its codes are the first step, `caption` names the motion)."""
    v, tok = vm.vocab, vm.tok
    if steps < 1 + (image is not None):
        raise ValueError(f"a clip has at least {1 + (image is not None)} latent steps here, got {steps}")
    head = [v.bov]
    if image is not None:
        codes = vm.pixels.encode(to_unit(image)[None, None].to(next(vm.pixels.parameters()).device))
        head = v.video(codes[0, :1])[:-1]  # BOV BOF <codes>, without EOV
    return VisualJob([tok.bos_id, *tok.encode(caption), *head], [tok.bos_id, *head], head, steps,
                     steps - (image is not None), True)


def run_job(vm: VisualModel, job: VisualJob, n: int, params: SamplingParams | None, cfg_scale: float,
             seed: int) -> torch.Tensor:
    """n samples of one job on an engine of its own (its cache just these rows) -> pixels (`VisualJob.decode`)."""
    reqs = job.requests(vm, n, params or SamplingParams(temperature=TEMPERATURE), cfg_scale, seed)
    rows = n * (2 if cfg_scale != 1.0 else 1)  # a guided sample runs its unconditional twin
    engine = Engine(vm.model, vm.tok, max_batch=max(2, rows), max_len=job.max_len(vm.vocab))
    running = [engine.submit(r.pop("prompt"), **r) for r in reqs]
    while engine.has_work():
        engine.step()
    return job.decode(vm, [r.output for r in running])


def generate_images(vm: VisualModel, caption: str, n: int = 1, params: SamplingParams | None = None,
                    cfg_scale: float = CFG_SCALE, seed: int = 0) -> torch.Tensor:
    """n images of `caption` -> uint8 [n, H, W, 3]."""
    return run_job(vm, image_job(vm, caption), n, params, cfg_scale, seed)


def generate_clips(vm: VisualModel, caption: str, n: int = 1, steps: int = 3, image: torch.Tensor | None = None,
                   params: SamplingParams | None = None, cfg_scale: float = CFG_SCALE, seed: int = 0) -> torch.Tensor:
    """n clips of `steps` latent steps -> uint8 [n, F, H, W, 3] (`clip_job`)."""
    return run_job(vm, clip_job(vm, caption, steps, image), n, params, cfg_scale, seed)
