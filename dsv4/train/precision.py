"""Mixed precision for training: compute weights in a fast dtype, fp32 masters and optimizer state."""

from __future__ import annotations

import torch

from dsv4.model.transformer import Transformer


class MixedPrecision:
    """Compute weights in a fast dtype (bf16), fp32 master weights and optimizer state.

    The model's floating parameters are cast to `dtype` (except the ones the release keeps fp32: hyper-connections,
    norms, sinks, ...); each cast one gets an fp32 master copy. After every micro-batch's backward, `accumulate`
    adds the compute grads into the masters' fp32 grads (accumulation in bf16 would lose small updates); the optimizer
    steps the masters; `sync` copies them back. With dtype fp32 the parameters are their own masters."""

    def __init__(self, model: Transformer, dtype: torch.dtype):
        params = list(dict.fromkeys(model.parameters()))  # unique (tied weights once)
        full = {id(p): p.detach().float().clone() for p in params if p.is_floating_point()} \
            if dtype != torch.float32 else {}  # the masters keep the values from before the cast
        model.to_dtype(dtype)
        self.pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self._master: dict[int, torch.Tensor] = {}
        for p in params:
            if p.is_floating_point() and p.dtype != torch.float32:
                m = full[id(p)].requires_grad_(True)
                self.pairs.append((p, m))
                self._master[id(p)] = m
        del full

    def master(self, p: torch.nn.Parameter) -> torch.Tensor:
        return self._master.get(id(p), p)

    @torch.no_grad()
    def accumulate(self):
        for p, m in self.pairs:
            if p.grad is not None:
                if m.grad is None:
                    m.grad = p.grad.float()
                else:
                    m.grad.add_(p.grad)
                p.grad = None

    @torch.no_grad()
    def sync(self):
        for p, m in self.pairs:
            p.copy_(m)

    def state_dict(self, model: torch.nn.Module) -> dict:
        """The model's state dict with fp32 masters in place of the compute weights (what a snapshot stores)."""
        sd = model.state_dict(keep_vars=True)
        return {k: self._master.get(id(v), v).detach() for k, v in sd.items()}

    @torch.no_grad()
    def load_state_dict(self, model: torch.nn.Module, sd: dict):
        model.load_state_dict(sd)  # casts into the compute dtype
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, v in sd.items():
            if name in params and id(params[name]) in self._master:
                self._master[id(params[name])].copy_(v)

    def parameters(self) -> list[torch.Tensor]:
        return [m for _, m in self.pairs]
