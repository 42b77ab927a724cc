"""What a training forward reports, for the loss and the trainer to use: the model itself keeps none of it.

    load_l       [E] assignments per routed expert in MoE layer l            -> the aux-loss-free bias update
    balance_l    mean over sequences of  sum_i f_i P_i,  f_i = E / (K T) * #tokens of the sequence routed to i,
                 P_i = mean_t s_i / sum_j s_j     (DeepSeek-V3's sequence-wise balance loss, before its weight alpha)
    indexer_kl_l mean over queries of KL(main attention || lightning indexer) on compressed-sparse layer l (V3.2)

The caller makes one `TrainStats` per forward, `model(ids, stats=stats)`, and reads its `layers` afterwards; each
block fills in its own `LayerStats` (a fresh object per call, so a compiled block sees the same types every step and
writes its results as graph outputs). The weights (alpha, the indexer's) belong to the loss (dsv4.train.loss), the
bias update to the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerStats:
    """One block's report. The first two fields are what it is asked for (copied from `TrainStats`)."""
    indexer: str | None = None
    balance: bool = False
    load: torch.Tensor | None = None  # [E] fp32 (every MoE layer, hash-routed ones included)
    seq_balance: torch.Tensor | None = None  # scalar fp32, only when `balance`
    indexer_kl: torch.Tensor | None = None  # scalar fp32, compressed-sparse layers in an indexer training stage


@dataclass
class TrainStats:
    """indexer: the lightning indexer's training stage. None: not trained, attention runs exactly as at inference;
    "dense" (warm-up): compressed-sparse layers attend to every visible entry and the indexer learns the main
    attention's distribution through the KL; "sparse": top-k attention, KL on the selected entries. In both stages
    the indexer's input is detached, so it learns from the KL alone and the LM loss never reaches it.
    balance: also compute the sequence-wise balance statistic (when the loss weighs it)."""
    indexer: str | None = None
    balance: bool = False
    layers: dict[int, LayerStats] = field(default_factory=dict)

    def __post_init__(self):
        if self.indexer not in (None, "dense", "sparse"):
            raise ValueError(f"indexer stage must be None, 'dense' or 'sparse', got {self.indexer!r}")

    def layer(self, layer_id: int) -> LayerStats:
        """A fresh report for block `layer_id` (main blocks 0.., then the MTP blocks)."""
        self.layers[layer_id] = LayerStats(self.indexer, self.balance)
        return self.layers[layer_id]

    def collect(self, name: str) -> dict[int, torch.Tensor]:
        """{layer id: tensor} of one field ("load", "seq_balance", "indexer_kl") over the layers that reported it."""
        return {i: getattr(s, name) for i, s in self.layers.items() if getattr(s, name) is not None}


class RouteTrace:
    """The experts every token is routed to, per MoE layer, while the trace is open (forward hooks on the gates):

        with RouteTrace(model) as trace:
            model(ids)
        trace.routes            {module name of the MoE layer: [[N, K] expert ids] one per forward that ran it}
        trace.experts(name)     those concatenated: [N, K] over every forward

    An inference-time probe (e.g. expert load per modality); the model keeps nothing of it."""

    def __init__(self, model: torch.nn.Module):
        from dsv4.model.moe import MoE

        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, MoE)}
        self.routes: dict[str, list[torch.Tensor]] = {name: [] for name in self.layers}
        self._hooks: list = []

    def __enter__(self) -> RouteTrace:
        for name, moe in self.layers.items():
            self._hooks.append(moe.gate.register_forward_hook(
                lambda _m, _inp, out, name=name: self.routes[name].append(out[1].detach())))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def experts(self, name: str) -> torch.Tensor:
        """[N, K] over every forward so far of layer `name`."""
        return torch.cat(self.routes[name])
