"""The output head fused into the cross-entropy: the [tokens, vocabulary] logits never exist whole.

    loss = sum_i w_i (logsumexp_v(x_i . W_v) - x_i . W_{t_i})       x [N, D], W [V, D]; w_i = 1/N, or mask_i / sum(mask)
    g_i = w_i (softmax(x_i W^T) - onehot(t_i))                       dL/dx_i = g_i W,   dL/dW = sum_i g_i^T x_i

Rows go `chunk` at a time: logits in the compute dtype, as the head computes them, soft-max in fp32, in place on one
cache-sized buffer. When gradients are wanted, each chunk's g is formed right there from the same soft-max and
multiplied into dL/dx and dL/dW, so the forward keeps only those two ([N, D] and [V, D]) and the backward scales
them by the incoming gradient (the loss is a scalar): no logits are kept or recomputed. The plain twin is the head
followed by `F.cross_entropy`; tests/test_loss.py compares the two in fp64 (values and gradients) and in bf16
(accuracy).
"""

import functools

import torch


def _token_weights(targets: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """[N] weights that turn summed token losses into the mean cross-entropy (1/N, or mask / mask count)."""
    if mask is None:
        return torch.full((targets.numel(),), 1.0 / max(targets.numel(), 1), dtype=dtype, device=targets.device)
    mask = mask.flatten().to(dtype)
    return mask / mask.sum().clamp(min=1)


def _chunk(xc, weight, t, w, acc: torch.dtype, grads: bool):
    """One chunk of rows: (token losses, and with `grads` (g @ W, g^T xc) for g = w (softmax - onehot)).
    Logits in the compute dtype, soft-max in `acc`, in place on one buffer (the head's logits are finite, so the
    row maximum is a safe shift)."""
    logits = (xc @ weight.t()).to(acc)
    target = logits.gather(-1, t[:, None])[:, 0]
    top = logits.amax(-1)
    p = logits.sub_(top[:, None]).exp_()
    total = p.sum(-1)
    losses = total.log().add_(top).sub_(target)
    if not grads:
        return losses, None, None
    g = p.mul_((w / total)[:, None])
    g.scatter_add_(-1, t[:, None], -w[:, None])
    g = g.to(xc.dtype)
    return losses, g @ weight, (g.t() @ xc).to(acc)


@functools.cache
def _chunk_kernel(compiled: bool):
    """The chunk function, eager or torch.compiled (the soft-max's element-wise passes fuse into one)."""
    return torch.compile(_chunk, dynamic=False) if compiled else _chunk


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i CE(x_i W^T, t_i) without the [N, V] logits: rows go `chunk` at a time; with gradients wanted, the
    forward computes them (dL/dx, dL/dW for a unit incoming gradient) and keeps only those."""

    @staticmethod
    def forward(ctx, x, weight, targets, token_weight, chunk, compiled):
        run = _chunk_kernel(compiled)
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32 soft-max (fp64 stays fp64)
        grads = any(ctx.needs_input_grad[:2])
        losses = torch.empty(x.shape[0], dtype=acc, device=x.device)
        grad_x = torch.empty_like(x) if grads else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if grads else None
        for i in range(0, x.shape[0], chunk):
            rows = slice(i, i + chunk)
            losses[rows], gx, gw = run(x[rows], weight, targets[rows], token_weight[rows], acc, grads)
            if grads:
                grad_x[rows] = gx
                grad_w += gw
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return (losses * token_weight).sum()

    @staticmethod
    def backward(ctx, grad):
        grad_x, grad_w = ctx.saved_tensors
        return (grad_x * grad.to(grad_x.dtype), (grad_w * grad).to(ctx.weight_dtype), None, None, None, None)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         mask: torch.Tensor | None = None, chunk: int | None = None,
                         compiled: bool = False) -> torch.Tensor:
    """Mean cross-entropy of the logits x @ weight^T against `targets` (over the tokens `mask` selects), fused with
    the head: x [B, S, D] (the head's input), weight [V, D], targets and mask [B, S]. Same value and gradients as
    the unfused head, without materialising [B*S, V] logits (or their fp32 copy and gradient), which for a small
    model is a large part of the step's memory traffic. compiled=True runs each chunk torch.compiled (one fused pass
    instead of several; the first call per chunk shape compiles)."""
    N, V = targets.numel(), weight.shape[0]
    chunk = chunk or max(256, 2 ** 20 // V)  # ~4 MB of fp32 logits at a time: they stay in cache between passes
    weights = _token_weights(targets, mask, torch.promote_types(x.dtype, torch.float32))
    return _LinearCrossEntropy.apply(x.reshape(N, -1), weight, targets.reshape(N), weights, chunk, compiled)
