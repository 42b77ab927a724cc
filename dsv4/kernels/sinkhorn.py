"""Sinkhorn normalisation of the hyper-connections' [.., n, n] mixing matrices, with a hand-written backward.

    x_0 = comb;  x_{t+1} = x_t / (sum_axis(x_t) + eps)      axes: columns, then (rows, columns) x (iters - 1)
    backward of one step y = x / d:   dL/dx = (dL/dy - sum_axis(dL/dy * y)) / d

The plain twin is `dsv4.model.hyper.sinkhorn` (the loop as the reference writes it); tests/test_sinkhorn.py compares
the two, values and gradients, in fp64. Why a twin: every token has its own 4x4 matrix, so each of the 39 steps
is a pass over [tokens, 4, 4] whose inner dimensions are too short to vectorise, and autograd records ~4 nodes per
step. Here the matrices are laid out [n, n, tokens] (each step runs along the tokens), the forward keeps nothing
but its input, and the backward replays the steps and walks them back: ~4 passes a step instead of ~10.
"""

import torch


def _axes(iters: int) -> list[int]:
    """The summed axis of each step, in the [n(j), n(k), tokens] layout: 0 = columns (over j), 1 = rows (over k)."""
    return [0] + [1, 0] * max(iters - 1, 0)


def _steps(x: torch.Tensor, iters: int, eps: float, keep: bool) -> tuple[torch.Tensor, list]:
    """Run the steps on x [n, n, tokens] -> (result, [(output, denominator) per step] if keep else [])."""
    kept = []
    for axis in _axes(iters):
        d = x.sum(axis, keepdim=True).add_(eps)
        x = x / d
        if keep:
            kept.append((x, d))
    return x, kept


def _to_layout(m: torch.Tensor) -> torch.Tensor:
    """[..., n, n] -> [n, n, tokens] contiguous"""
    return m.reshape(-1, *m.shape[-2:]).permute(1, 2, 0).contiguous()


def _from_layout(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """[n, n, tokens] -> [..., n, n] contiguous"""
    return x.permute(2, 0, 1).contiguous().view(shape)


class _Sinkhorn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        ctx.save_for_backward(comb)
        ctx.iters, ctx.eps = iters, eps
        return _from_layout(_steps(_to_layout(comb), iters, eps, keep=False)[0], comb.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (comb,) = ctx.saved_tensors
        _, kept = _steps(_to_layout(comb), ctx.iters, ctx.eps, keep=True)  # replayed: nothing was kept forward
        g = _to_layout(grad)
        for axis, (y, d) in zip(reversed(_axes(ctx.iters)), reversed(kept)):
            g = (g - (g * y).sum(axis, keepdim=True)) / d
        return _from_layout(g, comb.shape), None, None


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """[..., n, n] positive -> [..., n, n] (nearly) doubly stochastic: the same steps and value as
    `dsv4.model.hyper.sinkhorn`, with the faster backward."""
    return _Sinkhorn.apply(comb, iters, eps)
