"""dsv4.model.hyper: the hyper-connection and its head against the docstring's formulas written as loops, with the
plain and the fused products."""

import pytest
import torch

from dsv4.kernels.fused import Fused, Products
from dsv4.model.hyper import HyperConnection, HyperHead, hc_post


def rmsnorm_mix(h, fn, eps):
    x = h.flatten(-2)
    return (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)) @ fn.t()


def reference_hc(hc: HyperConnection, h: torch.Tensor):
    """pre / post / comb from the module docstring, one token at a time; Sinkhorn as columns, then (rows, columns)."""
    n, eps = hc.n, hc.hc_eps
    mix = rmsnorm_mix(h, hc.fn, hc.norm_eps)
    B, S = h.shape[:2]
    xs, posts, combs = torch.empty(B, S, h.shape[-1]), torch.empty(B, S, n), torch.empty(B, S, n, n)
    for b in range(B):
        for s in range(S):
            m = mix[b, s]
            pre = torch.sigmoid(m[:n] * hc.scale[0] + hc.base[:n]) + eps
            posts[b, s] = 2 * torch.sigmoid(m[n:2 * n] * hc.scale[1] + hc.base[n:2 * n])
            c = torch.softmax((m[2 * n:] * hc.scale[2] + hc.base[2 * n:]).view(n, n), -1) + eps
            c = c / (c.sum(0, keepdim=True) + eps)
            for _ in range(hc.iters - 1):
                c = c / (c.sum(1, keepdim=True) + eps)
                c = c / (c.sum(0, keepdim=True) + eps)
            combs[b, s] = c
            xs[b, s] = sum(pre[j] * h[b, s, j] for j in range(n))
    return xs, posts, combs


@pytest.mark.parametrize("ops", [Products, Fused])
@pytest.mark.parametrize("n", [1, 4])
def test_hyper_connection_is_the_formula(ops, n):
    torch.manual_seed(n)
    hc = HyperConnection(dim=16, hc_mult=n, sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-6)
    with torch.no_grad():
        hc.fn.normal_(0, 0.3)
        hc.base.normal_(0, 0.5)
        hc.scale.uniform_(0.5, 1.5)
    hc.ops = ops
    h = torch.randn(2, 3, n, 16)
    with torch.no_grad():
        x, post, comb = hc(h)
    want_x, want_post, want_comb = reference_hc(hc, h)
    torch.testing.assert_close(x, want_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(post, want_post, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(comb, want_comb, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(comb.sum(-2), torch.ones(2, 3, n), atol=1e-4, rtol=0)  # columns sum to 1
    if n > 1:
        torch.testing.assert_close(comb.sum(-1), torch.ones(2, 3, n), atol=0.02, rtol=0)  # rows: nearly


def test_hc_post_writes_back_with_the_transposed_comb():
    """h'_k = post_k * y + sum_j comb[j, k] h_j."""
    g = torch.Generator().manual_seed(0)
    y, h = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 4, 8, generator=g)
    post, comb = torch.rand(2, 3, 4, generator=g), torch.rand(2, 3, 4, 4, generator=g)
    want = torch.stack([post[..., k, None] * y + sum(comb[..., j, k, None] * h[..., j, :] for j in range(4))
                        for k in range(4)], dim=2)
    torch.testing.assert_close(hc_post(y, h, post, comb), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("ops", [Products, Fused])
def test_hyper_head_collapses_with_sigmoid_weights(ops):
    torch.manual_seed(0)
    head = HyperHead(dim=16, hc_mult=4, hc_eps=1e-6, norm_eps=1e-6)
    with torch.no_grad():
        head.fn.normal_(0, 0.3)
        head.base.normal_(0, 0.5)
        head.scale.fill_(0.7)
    head.ops = ops
    h = torch.randn(2, 5, 4, 16)
    w = torch.sigmoid(rmsnorm_mix(h, head.fn, 1e-6) * 0.7 + head.base) + 1e-6  # [B, S, n]
    with torch.no_grad():
        torch.testing.assert_close(head(h), (w[..., None] * h).sum(2), atol=1e-5, rtol=1e-5)
