"""The training objective of DeepSeek-V4, as one function the trainer calls per micro-batch.

    loss = CE(next token) + mtp_weight * mean_j CE_j(token i+2+j)        (MTP, V3 sec. 2.2: lambda 0.3, later 0.1)
         + sum_layers aux_loss                                            (optional sequence-wise balance loss)
         + indexer_weight * sum_layers KL(main attention || indexer)     (lightning indexer, V3.2; its input is
                                                                           detached, so this reaches only the indexer)
The aux-loss-free balancing bias is not a loss: the trainer calls `dsv4.model.moe.update_balance_bias` after the
optimizer step, from the per-layer loads recorded in the forward.
"""

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


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i CE(x_i W^T, t_i) without the [N, V] logits: rows go `chunk` at a time, logits in the compute dtype
    as the head computes them, soft-max in fp32; the backward recomputes each chunk's logits (one extra head
    matmul) instead of keeping them, and writes the logits' gradient straight into the two matmuls."""

    @staticmethod
    def forward(ctx, x, weight, targets, token_weight, chunk):
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32 soft-max (fp64 stays fp64)
        lse = torch.empty(x.shape[0], dtype=acc, device=x.device)
        losses = torch.empty_like(lse)
        for i in range(0, x.shape[0], chunk):
            logits = (x[i:i + chunk] @ weight.t()).to(acc)
            lse[i:i + chunk] = torch.logsumexp(logits, -1)
            losses[i:i + chunk] = lse[i:i + chunk] - logits.gather(-1, targets[i:i + chunk, None])[:, 0]
        ctx.save_for_backward(x, weight, targets, token_weight, lse)
        ctx.chunk = chunk
        return (losses * token_weight).sum()

    @staticmethod
    def backward(ctx, grad):
        x, weight, targets, token_weight, lse = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        scale = token_weight * grad
        for i in range(0, x.shape[0], ctx.chunk):
            xc, t = x[i:i + ctx.chunk], targets[i:i + ctx.chunk]
            g = (xc @ weight.t()).to(lse.dtype).sub_(lse[i:i + ctx.chunk, None]).exp_()  # soft-max
            g.scatter_add_(-1, t[:, None], g.new_full((t.shape[0], 1), -1.0))  # - one-hot
            g = g.mul_(scale[i:i + ctx.chunk, None]).to(x.dtype)
            if need_x:
                grad_x[i:i + ctx.chunk] = g @ weight
            if need_w:
                grad_w += g.t() @ xc
        return grad_x, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         mask: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """`cross_entropy(x @ weight^T, targets, mask)` fused with the head: x [B, S, D] (the head's input), weight
    [V, D]. Same value and gradients, without materialising [B*S, V] logits (or their fp32 copy and gradient),
    which for a small model is a large part of the step's memory traffic."""
    N, V = targets.numel(), weight.shape[0]
    chunk = chunk or max(256, 2 ** 22 // V)  # ~16 MB of fp32 logits at a time
    weights = _token_weights(targets, mask, torch.promote_types(x.dtype, torch.float32))
    return _LinearCrossEntropy.apply(x.reshape(N, -1), weight, targets.reshape(N), weights, chunk)


def training_loss(model, ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
                  mtp_weight: float = 0.3, indexer_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """ids, targets [B, S] (targets[:, i] = the token after ids[:, i]); mask [B, S] or None.
    -> (scalar loss to backpropagate, metrics as floats). The head is fused into the loss (`linear_cross_entropy`)."""
    use_mtp = mtp_weight > 0 and len(model.mtp) > 0
    out = model(ids, mtp=use_mtp, hidden=True)
    hidden, mtp_hidden = out if use_mtp else (out, [])
    head = model.head.weight
    ce = linear_cross_entropy(hidden, head, targets, mask)
    loss, metrics = ce, {"ce": ce.item()}
    if mtp_hidden:
        mtp_ces = []
        for j, mh in enumerate(mtp_hidden):  # row i predicts token i+2+j = targets[:, i+1+j]
            if mh.shape[1] == 0:
                continue
            mtp_ces.append(linear_cross_entropy(mh, head, targets[:, 1 + j:],
                                                None if mask is None else mask[:, 1 + j:]))
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
