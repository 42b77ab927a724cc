"""The training objective of DeepSeek-V4, as one function the trainer calls per micro-batch.

    loss = CE(next token) + mtp_weight * mean_j CE_j(token i+2+j)        (MTP, V3 sec. 2.2: lambda 0.3, later 0.1)
         + sum_layers aux_loss                                            (optional sequence-wise balance loss)
         + indexer_weight * sum_layers KL(main attention || indexer)     (lightning indexer, V3.2; its input is
                                                                           detached, so this reaches only the indexer)
The aux-loss-free balancing bias is not a loss: the trainer calls `dsv4.model.moe.update_balance_bias` after the
optimizer step, from the per-layer loads recorded in the forward.
"""

import functools

import torch
import torch.nn.functional as F

from dsv4.model.attention import Attention
from dsv4.model.moe import MoE


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean token cross-entropy in nats, in fp32; `mask` [B, S] selects the tokens that count (e.g. answers only)."""
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    if mask is None:
        return losses.mean()
    mask = mask.flatten().to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1)


def _token_weights(targets: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """[N] weights that turn summed token losses into `cross_entropy`'s mean (1/N, or mask / mask count)."""
    if mask is None:
        return torch.full((targets.numel(),), 1.0 / max(targets.numel(), 1), dtype=dtype, device=targets.device)
    mask = mask.flatten().to(dtype)
    return mask / mask.sum().clamp(min=1)


def _chunk_loss(xc, weight, t, acc: torch.dtype):
    """One chunk of rows' (logsumexp, token loss): logits in the compute dtype, soft-max in `acc`."""
    logits = (xc @ weight.t()).to(acc)
    lse = torch.logsumexp(logits, -1)
    return lse, lse - logits.gather(-1, t[:, None])[:, 0]


def _chunk_grad(xc, weight, t, lse, scale, grad_w):
    """One chunk's backward: g = scale * (softmax - onehot) from recomputed logits; -> (g @ W, grad_w + g^T xc)."""
    logits = (xc @ weight.t()).to(lse.dtype)
    hit = torch.arange(logits.shape[-1], device=t.device) == t[:, None]
    g = ((logits - lse[:, None]).exp() - hit.to(lse.dtype)) * scale[:, None]
    g = g.to(xc.dtype)
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
    """`cross_entropy(x @ weight^T, targets, mask)` fused with the head: x [B, S, D] (the head's input), weight
    [V, D]. Same value and gradients, without materialising [B*S, V] logits (or their fp32 copy and gradient),
    which for a small model is a large part of the step's memory traffic. compiled=True runs each chunk's
    element-wise work torch.compiled (one fused pass instead of several; the first call per chunk shape compiles)."""
    N, V = targets.numel(), weight.shape[0]
    chunk = chunk or max(256, 2 ** 22 // V)  # ~16 MB of fp32 logits at a time
    weights = _token_weights(targets, mask, torch.promote_types(x.dtype, torch.float32))
    return _LinearCrossEntropy.apply(x.reshape(N, -1), weight, targets.reshape(N), weights, chunk, compiled)


def training_loss(model, ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
                  mtp_weight: float = 0.3, indexer_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """ids, targets [B, S] (targets[:, i] = the token after ids[:, i]); mask [B, S] or None.
    -> (scalar loss to backpropagate, metrics as floats). The head is fused into the loss (`linear_cross_entropy`)."""
    use_mtp = mtp_weight > 0 and len(model.mtp) > 0
    out = model(ids, mtp=use_mtp, hidden=True)
    hidden, mtp_hidden = out if use_mtp else (out, [])
    head, compiled = model.head.weight, model.blocks_compiled  # the loss compiles along with the blocks
    ce = linear_cross_entropy(hidden, head, targets, mask, compiled=compiled)
    loss, metrics = ce, {"ce": ce.item()}
    if mtp_hidden:
        mtp_ces = []
        for j, mh in enumerate(mtp_hidden):  # row i predicts token i+2+j = targets[:, i+1+j]
            if mh.shape[1] == 0:
                continue
            mtp_ces.append(linear_cross_entropy(mh, head, targets[:, 1 + j:],
                                                None if mask is None else mask[:, 1 + j:], compiled=compiled))
        if mtp_ces:
            mtp_ce = torch.stack(mtp_ces).mean()
            loss = loss + mtp_weight * mtp_ce
            metrics["mtp_ce"] = mtp_ce.item()
    aux = [m.aux_loss for m in model.modules() if isinstance(m, MoE) and m.aux_loss is not None]
    if aux:
        aux_total = torch.stack(aux).sum()
        loss = loss + aux_total
        metrics["balance_loss"] = aux_total.item()
    kls = [m.indexer_kl for m in model.modules() if isinstance(m, Attention) and m.indexer_train
           and m.indexer_kl is not None]
    if kls:
        kl_total = torch.stack(kls).sum()
        loss = loss + indexer_weight * kl_total
        metrics["indexer_kl"] = kl_total.item()
    return loss, metrics
