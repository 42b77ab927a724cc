"""Linear layers that read the same input, run as one matrix product.

A decode step multiplies one token by ~100 small weight matrices; each product costs a fixed ~15 us on a CPU on top
of reading its weights, so the layers that share an input (the attention's query, key, compressor and indexer
projections; the shared expert's gate and up) are grouped. `fuse()` re-homes the group's weights into one contiguous
[sum of outputs, in] block, each weight becoming a view of its rows: no second copy, and in-place updates of the
weights stay visible. Fuse after the model has its final device and dtype (moving it re-allocates the weights).
"""

import torch
import torch.nn.functional as F
from torch import nn


class LinearGroup:
    def __init__(self, *linears: nn.Linear):
        self.linears = linears
        self.sizes = [m.out_features for m in linears]
        self.block: torch.Tensor | None = None

    @torch.no_grad()
    def fuse(self):
        weights = [m.weight for m in self.linears]
        if any(w.device.type == "meta" or w.dtype != weights[0].dtype for w in weights):
            return  # nothing to gain on meta; mixed dtypes stay separate
        block = torch.cat(weights)
        at = 0
        for m, n in zip(self.linears, self.sizes):
            m.weight.data = block[at: at + n]
            at += n
        self.block = block

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[..., in] -> each layer's output, in order."""
        if self.block is None:
            return [m(x) for m in self.linears]
        return list(F.linear(x, self.block).split(self.sizes, dim=-1))


def fuse_linear_groups(model: nn.Module) -> nn.Module:
    """Fuse every LinearGroup a module of `model` holds. Returns the model."""
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, LinearGroup):
                value.fuse()
    return model
