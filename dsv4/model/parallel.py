"""Expert parallelism: each of `size` ranks owns E/size of a layer's routed experts; tokens travel to them and back.

    rank r owns experts [r * E/size, (r+1) * E/size)            (w13 / w2 as DTensors Shard(0) on the EP mesh)
    dispatch: sort this rank's N*K assignments by expert (hence by owner), exchange the per-expert counts
              (all_to_all of [size, E/size] ints), then the rows (all_to_all_single, with autograd)
    compute:  the received rows sorted by local expert -> the grouped GEMM of `Experts.grouped` -> unsorted
    combine:  the reverse all_to_all brings each output home; the routing weights (which carry the router's
              gradient) are applied here, at home, and the K outputs of a token summed
The router, the expert loads and the shared expert stay local (the trainer all-reduces the loads). Gradients of the
experts arrive summed over every rank's loss: the trainer divides them by the world size (and sums them over the
ranks that hold the same experts) so that they equal one process's. dsv4.train.distributed sets this up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol
from torch.distributed.tensor import DTensor


@dataclass
class ExpertParallel:
    """The EP group of one rank: `size` ranks, this one `rank` among them, each owning `local` experts."""
    group: dist.ProcessGroup
    size: int
    rank: int
    local: int

    @classmethod
    def over(cls, group: dist.ProcessGroup, n_experts: int) -> ExpertParallel:
        size = dist.get_world_size(group)
        if n_experts % size:
            raise ValueError(f"--expert-parallel {size} must divide the {n_experts} routed experts")
        return cls(group, size, dist.get_rank(group), n_experts // size)


def local_weight(w: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a (DTensor) expert stack, differentiable; a plain tensor as it is."""
    return w.to_local() if isinstance(w, DTensor) else w


def exchange_counts(counts_E: torch.Tensor, ep: ExpertParallel) -> torch.Tensor:
    """counts_E [E]: rows this rank sends to each expert -> [size, local]: rows each source rank sends to each of
    this rank's experts."""
    received = torch.empty_like(counts_E)
    dist.all_to_all_single(received, counts_E.contiguous(), group=ep.group)
    return received.view(ep.size, ep.local)


def expert_parallel_forward(experts, x_ND: torch.Tensor, w_NK: torch.Tensor, idx_NK: torch.Tensor,
                            ep: ExpertParallel) -> torch.Tensor:
    """The routed experts' output [N, D] for this rank's tokens when the experts are spread over `ep` (see the
    module's docstring). `experts` is the layer's `dsv4.model.moe.Experts` holding this rank's slice."""
    N, K = idx_NK.shape
    E = ep.size * ep.local
    flat = idx_NK.flatten()
    order_A = flat.argsort(stable=True)
    token_A = order_A // K
    counts_E = torch.zeros(E, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    received_SL = exchange_counts(counts_E, ep)
    send = counts_E.view(ep.size, ep.local).sum(1).tolist()
    recv = received_SL.sum(1).tolist()
    x_RD = funcol.all_to_all_single_autograd(x_ND[token_A], recv, send, ep.group)
    x_RD = funcol.wait_tensor(x_RD) if isinstance(x_RD, funcol.AsyncCollectiveTensor) else x_RD
    # rows arrive grouped by source rank, each group sorted by expert: sort them by local expert for the GEMM
    expert_R = torch.arange(ep.local, device=flat.device).repeat(ep.size).repeat_interleave(received_SL.flatten())
    order_R = expert_R.argsort(stable=True)
    w13, w2 = local_weight(experts.w13), local_weight(experts.w2)
    y_sorted = experts.grouped(x_RD[order_R], expert_R[order_R], received_SL.sum(0), w13, w2)
    y_RD = y_sorted[order_R.argsort()]
    y_AD = funcol.all_to_all_single_autograd(y_RD, send, recv, ep.group)
    y_AD = funcol.wait_tensor(y_AD) if isinstance(y_AD, funcol.AsyncCollectiveTensor) else y_AD
    y_AD = y_AD * w_NK.flatten()[order_A, None].to(y_AD.dtype)
    return torch.zeros_like(x_ND).index_add_(0, token_A, y_AD)
