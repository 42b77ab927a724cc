"""Engram's per-token arithmetic with hand-written backwards: the gate's logit, the causal depthwise convolution, and
the table lookup whose gradient comes out already coalesced.

    gate_logit(h, k, w)   g = <h, w k> / (rms(h) rms(k) sqrt(D))        per stream: the dot product of the two
                          RMS-normed vectors, their norm weights folded into one w = w_query * w_key
    causal_conv(x, c)     y_t = sum_j c_j x_{t - (K-1-j) dil}            per channel, zeros (or `past`) before t = 0
    lookup(table, rows)   table[rows], its gradient a coalesced sparse tensor over the rows read

Their plain twins are what the autograd of the module's formulas would do: RMSNorm twice then a product and a sum,
`F.conv1d` over the zero-padded sequence, `F.embedding(sparse=True)` then `coalesce()`; tests/test_engram.py
compares them, values and gradients, in fp64. Why: at the `make run` model's width each of these works on [tokens,
4 streams, 128] fp32 tensors with a handful of flops per element, so eager autograd's cost is its passes over memory
(a norm's backward alone is ~8): the gate here takes 4 passes forward and 6 back, the convolution K forward and
2K back without the zero-padded copies autograd makes for each shifted slice, and the lookup's backward sorts the
rows once (`torch.unique`) instead of coalescing a gradient with one entry per token and head. At 16 x 256 tokens
(forward + backward, scratch timings): the gate 4.9 ms against autograd's 13.8, the convolution 6.0 ms against
~18 (autograd of the shifted sums) and ~30 (F.conv1d).
"""

import math

import torch


class _GateLogit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, k: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        D = h.shape[-1]
        rh = torch.linalg.vector_norm(h, dim=-1).square_().div_(D).add_(eps).rsqrt_()
        rk = torch.linalg.vector_norm(k, dim=-1).square_().div_(D).add_(eps).rsqrt_()
        kw = k * w
        dot = torch.linalg.vecdot(h, kw)
        ctx.save_for_backward(h, k, w, kw, rh, rk, dot)
        return dot * rh * rk / math.sqrt(D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, k, w, kw, rh, rk, dot = ctx.saved_tensors
        D = h.shape[-1]
        a = grad * rh * rk / math.sqrt(D)  # dL/d dot, through the two rms factors' product
        dh = dk = dw = None
        if ctx.needs_input_grad[0]:  # d g / d h = a (w k - dot rh^2 / D h)
            dh = torch.addcmul(kw, h, (-dot * rh * rh / D).unsqueeze(-1)).mul_(a.unsqueeze(-1))
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            ah = h * a.unsqueeze(-1)
            if ctx.needs_input_grad[2]:
                dw = (ah * k).flatten(0, -3).sum(0)
            if ctx.needs_input_grad[1]:  # d g / d k = a (w h - dot rk^2 / D k)
                dk = ah.mul_(w).addcmul_(k, (-a * dot * rk * rk / D).unsqueeze(-1))
        return dh, dk, dw, None


def gate_logit(h: torch.Tensor, k: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """h, k [..., n, D] fp32, w [n, D] -> [..., n]: sum_d (h_d / rms(h)) (w_d k_d / rms(k)) / sqrt(D), with
    rms(x) = sqrt(mean(x^2) + eps): the product of an RMS-normed h and an RMS-normed k whose weights multiply to w."""
    return _GateLogit.apply(h, k, w, eps)


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, c: torch.Tensor, dilation: int, past: torch.Tensor | None) -> torch.Tensor:
        S, K = x.shape[1], c.shape[-1]
        P = (K - 1) * dilation
        xp = torch.cat([past.to(x.dtype) if past is not None else x.new_zeros(x.shape[0], P, x.shape[-1]), x], 1)
        taps = c.T.contiguous()  # [K, C]: each tap a contiguous row (a strided one takes a slow broadcast, ~3x)
        y = x * taps[K - 1]
        for j in range(K - 1):
            y.addcmul_(xp[:, j * dilation: j * dilation + S], taps[j])
        ctx.save_for_backward(xp, taps)
        ctx.dilation = dilation
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xp, taps = ctx.saved_tensors
        S, K, dil = grad.shape[1], taps.shape[0], ctx.dilation
        P = (K - 1) * dil
        grad = grad.contiguous()
        dx = dc = None
        if ctx.needs_input_grad[0]:  # tap j read x at t - (K-1-j) dil
            dx = grad * taps[K - 1]
            for j in range(K - 1):
                lag = P - j * dil
                if lag < S:
                    dx[:, :S - lag].addcmul_(grad[:, lag:], taps[j])
        if ctx.needs_input_grad[1]:  # sum over batch and positions of grad * the tap's input
            dc = torch.stack([torch.linalg.vecdot(grad, xp[:, j * dil: j * dil + S], dim=1).sum(0)
                              for j in range(K)], -1)
        return dx, dc, None, None


def causal_conv(x: torch.Tensor, c: torch.Tensor, dilation: int, past: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal convolution: x [B, S, C], c [C, K] (`nn.Conv1d(C, C, K, groups=C).weight[:, 0]`), past
    [B, (K-1) dilation, C] the input before x (None: zeros; no gradient reaches it) -> y [B, S, C] in x's dtype,
    y_t = sum_j c_j x_{t - (K-1-j) dilation}: F.conv1d over [past, x], as Conv1d's cross-correlation reads it."""
    if past is not None and past.requires_grad:
        raise ValueError("causal_conv: `past` is a cache's state and takes no gradient")
    return _CausalConv.apply(x, c.to(x.dtype), dilation, past)


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.shape = table.shape
        return table[rows]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        unique, inverse = torch.unique(rows, return_inverse=True)  # sorted: the order a coalesced tensor keeps
        values = grad.new_zeros(unique.numel(), grad.shape[-1]).index_add_(0, inverse.flatten(),
                                                                         grad.reshape(-1, grad.shape[-1]))
        return torch.sparse_coo_tensor(unique.unsqueeze(0), values, ctx.shape, is_coalesced=True,
                                       check_invariants=False), None


def lookup(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """table [R, d], rows [...] int64 -> table[rows] [..., d]; the table's gradient is a coalesced sparse tensor with
    one entry per distinct row read (the gradients of a row read at several places summed)."""
    return _Lookup.apply(table, rows)
