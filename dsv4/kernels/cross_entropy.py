"""The output head fused into the cross-entropy: the [tokens, vocabulary] logits never exist whole.

    loss = sum_i w_i (logsumexp_v(x_i . W_v) - x_i . W_{t_i})       x [N, D], W [V, D]; w_i = 1/N, or mask_i / sum(mask)
    g_i = w_i (softmax(x_i W^T) - onehot(t_i))                       dL/dx_i = g_i W,   dL/dW = sum_i g_i^T x_i

Rows go `chunk` at a time: logits in the compute dtype, as the head computes them, soft-max in fp32; the backward
recomputes each chunk's logits (one extra head matmul) instead of keeping them. The plain twin is the head followed by
`F.cross_entropy`; tests/test_loss.py compares the two in fp64 (values and gradients) and in bf16 (accuracy).
"""

import functools

import torch


def _token_weights(targets: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """[N] weights that turn summed token losses into the mean cross-entropy (1/N, or mask / mask count)."""
    if mask is None:
        return torch.full((targets.numel(),), 1.0 / max(targets.numel(), 1), dtype=dtype, device=targets.device)
    mask = mask.flatten().to(dtype)
    return mask / mask.sum().clamp(min=1)


def _chunk_loss(xc, weight, t, acc: torch.dtype):
    """One chunk of rows' (logsumexp, token loss): logits in the compute dtype, soft-max in `acc`, in place on one
    buffer (the head's logits are finite, so the row maximum is a safe shift)."""
    logits = (xc @ weight.t()).to(acc)
    target = logits.gather(-1, t[:, None])[:, 0]
    top = logits.amax(-1)
    lse = logits.sub_(top[:, None]).exp_().sum(-1).log_().add_(top)
    return lse, lse - target


def _chunk_grad(xc, weight, t, lse, scale, grad_w):
    """One chunk's backward: g = scale * (softmax - onehot) from recomputed logits; -> (g @ W, grad_w + g^T xc).
    In place on the chunk's fp32 logits: one buffer, no [rows, V] one-hot."""
    g = (xc @ weight.t()).to(lse.dtype)
    g.sub_(lse[:, None]).exp_()
    g.scatter_add_(-1, t[:, None], torch.full_like(lse[:, None], -1.0))
    g = g.mul_(scale[:, None]).to(xc.dtype)
    return g @ weight, grad_w + (g.t() @ xc).to(grad_w.dtype)


@functools.cache
def _chunk_kernels(compiled: bool):
    """The two chunk functions, eager or torch.compiled (the soft-max's element-wise passes fuse into one)."""
    if not compiled:
        return _chunk_loss, _chunk_grad
    return torch.compile(_chunk_loss, dynamic=False), torch.compile(_chunk_grad, dynamic=False)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i CE(x_i W^T, t_i) without the [N, V] logits: rows go `chunk` at a time, logits in the compute dtype
    as the head computes them, soft-max in fp32; the backward recomputes each chunk's logits (one extra head
    matmul) instead of keeping them, and writes the logits' gradient straight into the two matmuls."""

    @staticmethod
    def forward(ctx, x, weight, targets, token_weight, chunk, compiled):
        chunk_loss, _ = _chunk_kernels(compiled)
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32 soft-max (fp64 stays fp64)
        lse = torch.empty(x.shape[0], dtype=acc, device=x.device)
        losses = torch.empty_like(lse)
        for i in range(0, x.shape[0], chunk):
            lse[i:i + chunk], losses[i:i + chunk] = chunk_loss(x[i:i + chunk], weight, targets[i:i + chunk], acc)
        ctx.save_for_backward(x, weight, targets, token_weight, lse)
        ctx.chunk, ctx.compiled = chunk, compiled
        return (losses * token_weight).sum()

    @staticmethod
    def backward(ctx, grad):
        x, weight, targets, token_weight, lse = ctx.saved_tensors
        _, chunk_grad = _chunk_kernels(ctx.compiled)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)
        scale = token_weight * grad
        for i in range(0, x.shape[0], ctx.chunk):
            rows = slice(i, i + ctx.chunk)
            grad_x[rows], grad_w = chunk_grad(x[rows], weight, targets[rows], lse[rows], scale[rows], grad_w)
        return grad_x, grad_w.to(weight.dtype), None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         mask: torch.Tensor | None = None, chunk: int | None = None,
                         compiled: bool = False) -> torch.Tensor:
    """Mean cross-entropy of the logits x @ weight^T against `targets` (over the tokens `mask` selects), fused with
    the head: x [B, S, D] (the head's input), weight [V, D], targets and mask [B, S]. Same value and gradients as
    the unfused head, without materialising [B*S, V] logits (or their fp32 copy and gradient), which for a small
    model is a large part of the step's memory traffic. compiled=True runs each chunk's element-wise work
    torch.compiled (one fused pass instead of several; the first call per chunk shape compiles)."""
    N, V = targets.numel(), weight.shape[0]
    chunk = chunk or max(256, 2 ** 20 // V)  # ~4 MB of fp32 logits at a time: they stay in cache between passes
    weights = _token_weights(targets, mask, torch.promote_types(x.dtype, torch.float32))
    return _LinearCrossEntropy.apply(x.reshape(N, -1), weight, targets.reshape(N), weights, chunk, compiled)
