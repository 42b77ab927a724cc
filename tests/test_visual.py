"""dsv4.data.visual and dsv4.eval.visual: every procedural image and clip reads back as its caption says, over all
specs, many seeds and several sizes; captions round-trip; what a caption does not say is refused."""

import pytest
import torch

from dsv4.data.visual import (
    QUADRANTS,
    SHAPES,
    ShapeSpec,
    all_image_specs,
    all_video_specs,
    draw_image,
    draw_video,
    parse_caption,
    shape_mask,
)
from dsv4.eval.visual import Reading, largest_component, matches, movable, read_image, read_motion, room


@pytest.mark.parametrize("size", [32, 48, 64])
def test_every_image_reads_back_as_its_caption(size):
    g = torch.Generator().manual_seed(size)
    for spec in all_image_specs():
        for _ in range(4):
            img = draw_image(spec, size, g)
            assert img.shape == (size, size, 3) and img.dtype == torch.uint8
            assert read_image(img) == Reading(spec.colour, spec.shape, spec.quadrant), spec.caption
            assert matches(img, spec.caption)


def test_images_keep_to_the_captioned_geometry():
    """The shape lies inside its quadrant, its bounding box is >= 1/4 of the image, and the triangle points up."""
    g = torch.Generator().manual_seed(1)
    for spec in all_image_specs():
        img = draw_image(spec, 32, g)
        rows, cols = (img.amax(-1) > 0).nonzero(as_tuple=True)
        top, left = QUADRANTS.index(spec.quadrant) // 2, QUADRANTS.index(spec.quadrant) % 2
        assert rows.min() >= 16 * top and rows.max() < 16 * (top + 1)
        assert cols.min() >= 16 * left and cols.max() < 16 * (left + 1)
        assert max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) >= 8 - 1  # rasterised side >= 1/4
    tri = shape_mask("triangle", 32, 4.0, 4.0, 20.0)
    widths = tri.sum(1)[tri.any(1)]
    assert widths[0] < widths[-1] and bool((widths[1:] >= widths[:-1]).all())  # widening downwards: points up


def test_every_clip_moves_as_captioned_and_stays_in_frame():
    g = torch.Generator().manual_seed(2)
    for size, frames in ((32, 8), (32, 5), (48, 6)):
        for spec in all_video_specs():
            for _ in range(3):
                clip = draw_video(spec, frames, size, g)
                assert clip.shape == (frames, size, size, 3)
                assert read_motion(clip) == spec.direction and matches(clip, spec.caption), spec.caption
                mask = clip.amax(-1) > 0
                assert bool(mask.flatten(1).any(1).all())  # the object is in every frame
                first, last = (m.nonzero().float().mean(0) for m in (mask[0], mask[-1]))
                assert float((last - first).abs().max()) >= size / 4 - 1  # a quarter of the frame at least


def test_room_is_the_gap_to_each_edge_and_every_training_clip_starts_with_room_to_move():
    img = torch.zeros(32, 32, 3, dtype=torch.uint8)
    assert room(img) == dict.fromkeys(("left", "right", "up", "down"), 0.0) and movable(img) == []
    img[2:6, 0:4] = 255  # rows 2-5, columns 0-3: touching the left edge
    assert room(img) == {"left": 0.0, "right": 28 / 32, "up": 2 / 32, "down": 26 / 32}
    assert movable(img) == ["right", "down"]  # 2 pixels up is less than MIN_TRAVEL (4 of 32)
    img[2:6, 4:8] = 255
    img[2:6, 0:4] = 0
    assert movable(img) == ["left", "right", "down"]
    # the data asks only for motions the object has room for: image->video's requests keep to the same rule
    g = torch.Generator().manual_seed(5)
    for spec in all_video_specs():
        for _ in range(3):
            clip = draw_video(spec, 9, 32, g)
            assert spec.direction in movable(clip[0]), spec.caption
            assert room(clip[0])[spec.direction] >= 1 / 4 - 1 / 32  # the whole travel, a quarter of the frame


def test_a_sample_that_shows_something_else_does_not_match():
    g = torch.Generator().manual_seed(3)
    img = draw_image(ShapeSpec("red", "circle", quadrant="top left"), 32, g)
    for wrong in ("a green circle in the top left", "a red square in the top left", "a red circle in the top right",
                  "a red triangle in the bottom left"):
        assert not matches(img, wrong)
    black = torch.zeros(32, 32, 3, dtype=torch.uint8)
    assert read_image(black) == Reading(None, None, None) and not matches(black, "a red circle in the top left")
    still = draw_image(ShapeSpec("blue", "square", quadrant="top left"), 32, g)[None].repeat(6, 1, 1, 1)
    assert read_motion(still) is None and not matches(still, "a blue square moving right")
    clip = draw_video(ShapeSpec("blue", "square", direction="right"), 8, 32, g)
    assert not matches(clip, "a blue square moving left") and not matches(clip.flip(0), "a blue square moving right")
    assert not matches(clip, "a blue circle moving right")


def test_the_object_is_the_largest_region_and_specks_elsewhere_do_not_count():
    g = torch.Generator().manual_seed(5)
    for spec in all_image_specs():
        img = draw_image(spec, 32, g)
        mask = img.amax(-1) > 0
        specked = img.clone()
        free = (~mask).nonzero()
        for r, c in free[torch.randperm(len(free), generator=g)[:3]]:  # 3 stray pixels in other colours
            specked[r, c] = torch.tensor([255, 255, 255] if int(r) % 2 else [0, 0, 200], dtype=torch.uint8)
        assert matches(specked, spec), spec.caption
    # two separate squares: the larger one is the object, wherever the smaller one is
    two = torch.zeros(32, 32, 3, dtype=torch.uint8)
    two[2:12, 2:12] = torch.tensor([0, 200, 0], dtype=torch.uint8)  # 100 pixels, top left
    two[20:26, 22:28] = torch.tensor([200, 0, 0], dtype=torch.uint8)  # 36 pixels, bottom right
    assert read_image(two) == Reading("green", "square", "top left")
    big = largest_component(torch.rand(32, 32, generator=g) > 0.5)
    assert bool(big.any()) and int(big.sum()) <= 32 * 32
    ring = torch.zeros(16, 16, dtype=torch.bool)  # a region that reaches around: one component
    ring[2, 2:14] = ring[13, 2:14] = ring[2:14, 2] = ring[2:14, 13] = True
    assert torch.equal(largest_component(ring), ring)


def test_captions_round_trip_and_other_text_is_refused():
    for spec in all_image_specs() + all_video_specs():
        assert parse_caption(spec.caption) == spec
    assert len({s.caption for s in all_image_specs()}) == 4 * len(SHAPES) * 4
    for bad in ("a purple circle in the top left", "a red circle", "the digit 7", "a red circle moving sideways",
                "a red circle in the top left moving up"):
        with pytest.raises(ValueError, match="not a shape caption"):
            parse_caption(bad)
    with pytest.raises(ValueError, match="not both or neither"):
        ShapeSpec("red", "circle", quadrant="top left", direction="up")
    with pytest.raises(ValueError, match="use draw_video"):
        draw_image(ShapeSpec("red", "circle", direction="up"))
    with pytest.raises(ValueError, match="at least 32 pixels"):
        draw_image(ShapeSpec("red", "circle", quadrant="top left"), size=16)
