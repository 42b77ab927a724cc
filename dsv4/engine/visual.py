"""Images and clips from a multimodal checkpoint (`dsv4 multimodal`'s OUT/final), through the engine (issue 22).

    text->image    BOS caption BOI  -> the span's 64 codes, constrained (SpanConstraint), guided by BOS BOI
    text->video    BOS caption BOV  -> BOF codes ... for `steps` latent steps, guided by BOS BOV
    image->video   BOS "moving left" BOV BOF <the image's codes>  -> the remaining steps, guided by BOS BOV BOF <codes>
Each sample is one engine request with its own seed; with a guidance scale != 1 each also runs its unconditional
row (`dsv4.engine.guidance`). The codes go back to pixels through the checkpoint's pixel tokenizer.
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

        ckpt = Path(ckpt)
        if not (ckpt / "multimodal.json").exists():
            raise FileNotFoundError(f"{ckpt} is not a multimodal checkpoint (no multimodal.json): train one with "
                                    "`dsv4 multimodal`")
        model = from_pretrained(ckpt, device=device, dtype=dtype).eval()
        vocab = VisualVocab(**json.loads((ckpt / "multimodal.json").read_text()))
        return cls(model, Tokenizer.from_file(ckpt / "tokenizer.json"), vocab,
                   load_pixels(ckpt / "pixels", next(model.parameters()).device))


def _run(vm: VisualModel, prompt: list[int], uncond: list[int], n: int, constraint, params: SamplingParams,
         cfg_scale: float, seed: int) -> list[list[int]]:
    """n constrained (and, unless cfg_scale == 1, guided) samples of one prompt -> their generated ids."""
    guided = cfg_scale != 1.0
    spans = [constraint() for _ in range(n)]
    # the cache holds just these rows: the prompt and the span
    engine = Engine(vm.model, vm.tok, max_batch=max(2, n * (2 if guided else 1)),
                    max_len=len(prompt) + spans[0].length + 1)
    reqs = [engine.submit(prompt, dataclasses.replace(params, seed=seed + i), max_new_tokens=span.length,
                          ignore_eos=True, processor=span, guidance=(uncond, cfg_scale) if guided else None)
            for i, span in enumerate(spans)]
    while engine.has_work():
        engine.step()
    return [r.output for r in reqs]


def generate_images(vm: VisualModel, caption: str, n: int = 1, params: SamplingParams | None = None,
                    cfg_scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    """n images of `caption` -> uint8 [n, H, W, 3]."""
    v, tok = vm.vocab, vm.tok
    outs = _run(vm, [tok.bos_id, *tok.encode(caption), v.boi], [tok.bos_id, v.boi], n,
                lambda: SpanConstraint(v), params or SamplingParams(), cfg_scale, seed)
    spans = [v.parse([v.boi, *o])[0][1] for o in outs]
    g = vm.pixels.args.grid
    return to_uint8(vm.pixels.decode(torch.stack(spans).view(n, 1, g, g)))[:, 0]


def generate_clips(vm: VisualModel, caption: str, n: int = 1, steps: int = 3, image: torch.Tensor | None = None,
                   params: SamplingParams | None = None, cfg_scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    """n clips of `steps` latent steps (1 + (steps - 1) t frames) -> uint8 [n, F, H, W, 3]. With `image` (uint8
    [H, W, 3]) the clip starts from it (image->video: its codes are the first step, `caption` names the motion)."""
    v, tok = vm.vocab, vm.tok
    head = [v.bov]
    if image is not None:
        codes = vm.pixels.encode(to_unit(image)[None, None].to(next(vm.pixels.parameters()).device))
        head = v.video(codes[0, :1])[:-1]  # BOV BOF <codes>, without EOV
    rest = steps - (image is not None)
    outs = _run(vm, [tok.bos_id, *tok.encode(caption), *head], [tok.bos_id, *head], n,
                lambda: SpanConstraint(v, steps=rest, video=True), params or SamplingParams(), cfg_scale, seed)
    spans = [v.parse([*head, *o])[0][1] for o in outs]
    g = vm.pixels.args.grid
    return to_uint8(vm.pixels.decode(torch.stack(spans).view(n, steps, g, g)))


def save_media(x: torch.Tensor, path: str | Path, scale: int = 4, numbered: bool = False, fps: int = 6) -> list[str]:
    """Write uint8 images [n, H, W, 3] as PNGs or clips [n, F, H, W, 3] as GIFs, each pixel `scale` x `scale`
    (atomically) -> the paths written: `path` itself, or PATH_0.EXT ... with `numbered`."""
    from PIL import Image

    from dsv4.atomic import atomic_path

    path = Path(path)
    clip = x.dim() == 5
    want = ".gif" if clip else ".png"
    if path.suffix.lower() != want:
        raise ValueError(f"{path}: {'a clip is written as a .gif' if clip else 'an image is written as a .png'}")
    if len(x) > 1 and not numbered:
        raise ValueError(f"{len(x)} samples need numbered files")
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for i, sample in enumerate(x):
        target = path.with_name(f"{path.stem}_{i}{path.suffix}") if numbered else path
        frames = [Image.fromarray(f.cpu().numpy()).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST)
                  for f in (sample if clip else sample[None])]
        with atomic_path(target) as tmp:
            if clip:
                frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=1000 // fps,
                               loop=0)
            else:
                frames[0].save(tmp, format="PNG")
        written.append(str(target))
    return written


def read_image_file(path: str | Path, size: int) -> torch.Tensor:
    """An image file -> uint8 [size, size, 3] (RGB, resized when it is another size)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(im).copy())
