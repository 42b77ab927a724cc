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


def training_loss(model, ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
                  mtp_weight: float = 0.3, indexer_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """ids, targets [B, S] (targets[:, i] = the token after ids[:, i]); mask [B, S] or None.
    -> (scalar loss to backpropagate, metrics as floats)."""
    use_mtp = mtp_weight > 0 and len(model.mtp) > 0
    out = model(ids, mtp=use_mtp)
    logits, mtp_logits = out if use_mtp else (out, [])
    ce = cross_entropy(logits, targets, mask)
    loss, metrics = ce, {"ce": ce.item()}
    if mtp_logits:
        mtp_ces = []
        for j, ml in enumerate(mtp_logits):  # row i predicts token i+2+j = targets[:, i+1+j]
            if ml.shape[1] == 0:
                continue
            mtp_ces.append(cross_entropy(ml, targets[:, 1 + j:], None if mask is None else mask[:, 1 + j:]))
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
