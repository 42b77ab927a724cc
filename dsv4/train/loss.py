"""The training objective of DeepSeek-V4, as one function the trainer calls per micro-batch.

    loss = CE(next token) + mtp_weight * mean_j CE_j(token i+2+j)        (MTP, V3 sec. 2.2: lambda 0.3, later 0.1)
         + aux_alpha * sum_layers balance_l                               (optional sequence-wise balance loss)
         + indexer_weight * sum_layers KL_l(main attention || indexer)   (lightning indexer, V3.2; its input is
                                                                           detached, so this reaches only the indexer)
The per-layer statistics come from the forward (`dsv4.model.stats.TrainStats`, filled in by the blocks); the weights
are applied here. The aux-loss-free balancing bias is not a loss: the trainer updates it after the optimizer step
(`dsv4.train.trainer.update_balance_bias`) from the expert loads the same statistics carry. The head is fused into
the cross-entropy (`dsv4.kernels.cross_entropy.linear_cross_entropy`).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsv4.kernels.cross_entropy import linear_cross_entropy
from dsv4.model.stats import TrainStats


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean token cross-entropy in nats, in fp32; `mask` [B, S] selects the tokens that count (e.g. answers only)."""
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    if mask is None:
        return losses.mean()
    mask = mask.flatten().to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1)


def training_loss(model, ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
                  mtp_weight: float = 0.3, indexer_weight: float = 1.0, aux_alpha: float = 0.0,
                  stats: TrainStats | None = None, compiled: bool = False,
                  share: Callable[[torch.Tensor | None], float] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """ids, targets [B, S] (targets[:, i] = the token after ids[:, i]); mask [B, S] or None.
    -> (scalar loss to backpropagate, metrics as floats). stats: what the forward reports into (the indexer's
    training stage, whether to compute the balance statistic; the caller reads the expert loads from it afterwards);
    None = a fresh one (indexer not trained; the balance statistic when aux_alpha > 0). compiled: run the fused head's
    chunks torch.compiled (as with compiled blocks). share(mask): what a token-mean term over `mask` counts for here
    (a rank's share of the global batch's tokens, dsv4.train.trainer; default 1): the cross-entropies are scaled by
    it, the per-sequence and per-query means (balance, indexer KL) are not."""
    share = share or (lambda mask: 1.0)
    stats = TrainStats(balance=aux_alpha > 0) if stats is None else stats
    use_mtp = mtp_weight > 0 and len(model.mtp) > 0
    out = model(ids, mtp=use_mtp, hidden=True, stats=stats)
    hidden, mtp_hidden = out if use_mtp else (out, [])
    head = model.head.weight
    ce = linear_cross_entropy(hidden, head, targets, mask, compiled=compiled) * share(mask)
    loss, metrics = ce, {"ce": ce.item()}
    if mtp_hidden:
        mtp_ces = []
        for j, mh in enumerate(mtp_hidden):  # row i predicts token i+2+j = targets[:, i+1+j]
            if mh.shape[1] == 0:
                continue
            shifted = None if mask is None else mask[:, 1 + j:]
            mtp_ces.append(linear_cross_entropy(mh, head, targets[:, 1 + j:], shifted, compiled=compiled)
                           * share(shifted))
        if mtp_ces:
            mtp_ce = torch.stack(mtp_ces).mean()
            loss = loss + mtp_weight * mtp_ce
            metrics["mtp_ce"] = mtp_ce.item()
    balances = stats.collect("seq_balance")
    if balances:
        aux_total = torch.stack([aux_alpha * b for b in balances.values()]).sum()  # weighted per layer, then summed
        loss = loss + aux_total
        metrics["balance_loss"] = aux_total.item()
    kls = stats.collect("indexer_kl")
    if kls:
        kl_total = torch.stack(list(kls.values())).sum()
        loss = loss + indexer_weight * kl_total
        metrics["indexer_kl"] = kl_total.item()
    return loss, metrics
