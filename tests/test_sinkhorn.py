"""The Sinkhorn kernel (dsv4.kernels.sinkhorn) against the reference loop (dsv4.model.hyper.sinkhorn)."""

import pytest
import torch

from dsv4.kernels.sinkhorn import sinkhorn as fast
from dsv4.model.hyper import sinkhorn as plain


@pytest.mark.parametrize("shape,iters", [((2, 5, 4, 4), 20), ((7, 3, 3), 1), ((3, 2, 6, 4, 4), 3), ((4, 2, 2), 0)])
def test_values_and_gradients_match_the_reference(shape, iters):
    torch.manual_seed(iters)
    comb = (torch.softmax(torch.randn(shape, dtype=torch.float64), -1) + 1e-6).requires_grad_()
    grad = torch.randn(shape, dtype=torch.float64)
    ref = plain(comb, iters, 1e-6)
    (ref_grad,) = torch.autograd.grad(ref, comb, grad)
    out = fast(comb, iters, 1e-6)
    (out_grad,) = torch.autograd.grad(out, comb, grad)
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out_grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_gradcheck_and_doubly_stochastic():
    torch.manual_seed(0)
    comb = (torch.rand(3, 4, 4, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda c: fast(c, 5, 1e-6), (comb,))
    out = fast(comb, 50, 1e-9)
    torch.testing.assert_close(out.sum(-1), torch.ones(3, 4, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.sum(-2), torch.ones(3, 4, dtype=torch.float64), atol=1e-6, rtol=0)


def test_fp32_matches_the_reference_bitwise():
    """The forward runs the very same operations per element, only in another memory layout."""
    torch.manual_seed(1)
    comb = torch.softmax(torch.randn(4, 64, 4, 4), -1) + 1e-6
    assert torch.equal(fast(comb, 20, 1e-6), plain(comb, 20, 1e-6))
