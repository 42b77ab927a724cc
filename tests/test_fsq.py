"""dsv4.tokenizers.fsq: the grid has exactly prod(L) points, every id maps to a grid point and back, every input lands
on the grid and its id is the grid point's, the rounding's gradient passes straight through, and a bad id is refused."""

import itertools

import pytest
import torch

from dsv4.tokenizers.fsq import FSQ


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (2, 3), (7, 6, 4), (16,)])
def test_ids_and_grid_points_are_one_to_one(levels):
    fsq = FSQ(levels)
    ids = torch.arange(fsq.codebook_size)
    codes = fsq.indices_to_codes(ids)
    assert codes.shape == (fsq.codebook_size, len(levels)) and codes.abs().max() <= 1
    assert torch.equal(fsq.codes_to_indices(codes), ids)
    assert len({tuple(c) for c in codes.tolist()}) == fsq.codebook_size  # distinct points
    for i, n in enumerate(levels):  # each channel takes exactly n evenly spaced values
        values = codes[:, i].unique()
        assert len(values) == n and torch.allclose(values.diff(), values.diff()[0].expand(n - 1))


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (7, 6, 4)])
def test_every_input_lands_on_the_grid_and_reaches_every_point(levels):
    fsq = FSQ(levels)
    z = torch.randn(20000, len(levels), generator=torch.Generator().manual_seed(0)) * 1.5
    q = fsq(z)
    ids = fsq.codes_to_indices(q)
    torch.testing.assert_close(fsq.indices_to_codes(ids), q)  # q is exactly a grid point
    assert ids.unique().numel() == fsq.codebook_size  # wide inputs use the whole codebook
    # the grid point is the rounding of bound(z): the nearest level to the bounded value
    b = fsq.bound(z)
    digits = (q * fsq._half_width).round()
    assert bool(((b - digits).abs() <= 0.5 + 1e-5).all())
    corners = torch.tensor(list(itertools.product(*[(-50.0, 50.0)] * len(levels))))
    assert fsq(corners).abs().max() <= 1  # saturated inputs stay on the grid


def test_rounding_passes_the_gradient_straight_through():
    fsq = FSQ((8, 5))
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), requires_grad=True)
    fsq(z).sum().backward()
    zz = z.detach().requires_grad_(True)
    (fsq.bound(zz) / fsq._half_width).sum().backward()
    torch.testing.assert_close(z.grad, zz.grad)
    assert bool((z.grad > 0).all())


def test_bad_levels_and_ids_are_refused():
    with pytest.raises(ValueError, match=">= 2"):
        FSQ((8, 1))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        FSQ((8, 5, 5, 5)).indices_to_codes(torch.tensor([0, 1000]))
