"""Procedural images and videos with exact captions, for text->image / text->video / image->video (issue 22).

    image   one solid shape on black: colour in COLOURS, shape in SHAPES (the square axis-aligned, the triangle
            pointing up), inside one quadrant, its side >= 1/4 of the image      "a red circle in the top left"
    video   one shape crossing the frame in a DIRECTIONS direction, at least a quarter of the frame over the clip
                                                                              "a blue square moving down"
Pixels are uint8 [H, W, 3] (an image) or [F, H, W, 3] (a clip), drawn from a `torch.Generator`, so sample k of a seed
is always the same. Every caption names exactly what was drawn; `dsv4.eval.visual` reads the pixels back and
checks a generated sample against its caption.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
SHAPES = ("circle", "square", "triangle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (rows, columns) per unit of travel
MIN_SIZE = 32  # below, a shape's side (>= 1/4 of the image) is under 8 pixels: a small circle rasterises as a square


@dataclass(frozen=True)
class ShapeSpec:
    """What one image shows (or one clip, with `direction` set instead of `quadrant`)."""
    colour: str
    shape: str
    quadrant: str | None = None
    direction: str | None = None

    def __post_init__(self):
        if self.colour not in COLOURS or self.shape not in SHAPES:
            raise ValueError(f"unknown colour or shape in {self}; colours {list(COLOURS)}, shapes {list(SHAPES)}")
        if (self.quadrant is None) == (self.direction is None):
            raise ValueError(f"a spec has a quadrant (an image) or a direction (a clip), not both or neither: {self}")
        if self.quadrant is not None and self.quadrant not in QUADRANTS:
            raise ValueError(f"unknown quadrant {self.quadrant!r}; one of {list(QUADRANTS)}")
        if self.direction is not None and self.direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {self.direction!r}; one of {list(DIRECTIONS)}")

    @property
    def caption(self) -> str:
        if self.quadrant is not None:
            return f"a {self.colour} {self.shape} in the {self.quadrant}"
        return f"a {self.colour} {self.shape} moving {self.direction}"


_CAPTION = re.compile(rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) "
                      rf"(?:in the ({'|'.join(QUADRANTS)})|moving ({'|'.join(DIRECTIONS)}))")


def parse_caption(text: str) -> ShapeSpec:
    """The spec a caption of this module's grammar names (ValueError for any other text)."""
    m = _CAPTION.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a shape caption: {text!r} (e.g. 'a red circle in the top left', "
                         "'a blue square moving down')")
    return ShapeSpec(m[1], m[2], quadrant=m[3], direction=m[4])


def all_image_specs() -> list[ShapeSpec]:
    return [ShapeSpec(c, s, quadrant=q) for c in COLOURS for s in SHAPES for q in QUADRANTS]


def all_video_specs() -> list[ShapeSpec]:
    return [ShapeSpec(c, s, direction=d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]


def shape_mask(shape: str, size: int, top: float, left: float, side: float) -> torch.Tensor:
    """bool [size, size]: the pixels whose centres fall inside `shape`, whose bounding box is side x side with its
    top-left corner at (top, left) (fractional pixels)."""
    y = torch.arange(size, dtype=torch.float32)[:, None] + 0.5
    x = torch.arange(size, dtype=torch.float32)[None, :] + 0.5
    inside_y, inside_x = (y >= top) & (y < top + side), (x >= left) & (x < left + side)
    if shape == "square":
        return inside_y & inside_x
    if shape == "circle":
        r = side / 2
        return (y - top - r) ** 2 + (x - left - r) ** 2 <= r * r
    # triangle pointing up: apex at the top centre, base along the bottom edge
    half_width = (y - top) / side * (side / 2)
    return inside_y & ((x - left - side / 2).abs() <= half_width)


def _check_size(size: int) -> None:
    if size < MIN_SIZE:
        raise ValueError(f"images and frames are at least {MIN_SIZE} pixels wide (got {size}): smaller shapes "
                         "cannot be told apart")


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def draw_image(spec: ShapeSpec, size: int = 32, g: torch.Generator | None = None) -> torch.Tensor:
    """uint8 [size, size, 3]: `spec`'s shape in its quadrant, side uniform in [size/4, size/2 - 1], placed uniformly
    where it fits inside the quadrant."""
    if spec.quadrant is None:
        raise ValueError("draw_image draws an image spec (with a quadrant); use draw_video for a clip")
    _check_size(size)
    g = g or torch.Generator().manual_seed(0)
    half = size / 2
    side = _uniform(g, size / 4, half - 1)
    row0 = 0.0 if spec.quadrant.startswith("top") else half
    col0 = 0.0 if spec.quadrant.endswith("left") else half
    top, left = row0 + _uniform(g, 0, half - side), col0 + _uniform(g, 0, half - side)
    return paint(shape_mask(spec.shape, size, top, left, side), spec.colour)


def paint(mask: torch.Tensor, colour: str) -> torch.Tensor:
    """uint8 [..., H, W, 3]: `colour` where mask, black elsewhere."""
    return mask[..., None].to(torch.uint8) * torch.tensor(COLOURS[colour], dtype=torch.uint8)


def travel_boxes(direction: str, frames: int, size: int, side: float, g: torch.Generator | None = None,
                 whole_pixels: bool = False) -> list[tuple[float, float]]:
    """(top, left) in each frame of a side x side box travelling in a straight line in `direction`, by between 1/4
    and 1/2 of the frame from the first frame to the last, never leaving the frame; its position across the motion
    is random and fixed. `whole_pixels` rounds the positions (for pasting a sprite)."""
    g = g or torch.Generator().manual_seed(0)
    travel = _uniform(g, size / 4, min(size / 2, size - side))
    dr, dc = DIRECTIONS[direction]
    across = _uniform(g, 0, size - side)  # the coordinate that does not move
    start = _uniform(g, 0, size - side - travel)  # along the motion, in the direction of travel
    boxes = []
    for f in range(frames):
        along = start + travel * f / max(frames - 1, 1)
        pos = along if dr + dc > 0 else size - side - along  # moving left/up: count from the far edge
        box = (pos, across) if dr else (across, pos)
        boxes.append(tuple(round(v) for v in box) if whole_pixels else box)
    return boxes


def draw_video(spec: ShapeSpec, frames: int = 8, size: int = 32, g: torch.Generator | None = None) -> torch.Tensor:
    """uint8 [frames, size, size, 3]: `spec`'s shape (side in [size/4, size/3]) on the path of `travel_boxes`."""
    if spec.direction is None:
        raise ValueError("draw_video draws a clip spec (with a direction); use draw_image for an image")
    _check_size(size)
    g = g or torch.Generator().manual_seed(0)
    side = _uniform(g, size / 4, size / 3)
    masks = [shape_mask(spec.shape, size, top, left, side)
             for top, left in travel_boxes(spec.direction, frames, size, side, g)]
    return paint(torch.stack(masks), spec.colour)
