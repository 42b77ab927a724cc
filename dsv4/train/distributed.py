"""Training on many processes with PyTorch's own engine: a DeviceMesh, FSDP2 (`fully_shard`) for every parameter,
expert parallelism for the routed experts, and the reductions that make N ranks train as one process would.

    mesh "dp" [world]             FSDP2: each block (and the MTP blocks, and the rest at the root) sharded over all
                                  ranks; the sharded fp32 parameters are the masters, a MixedPrecisionPolicy gives
                                  bf16 compute and fp32 gradient reduction where the device has bf16
    mesh ("edp", "ep") [world/E, E]  --expert-parallel E: each routed expert stack [E_total, ...] is a DTensor
                                  Shard(0) on "ep" (rank r holds E_total/E experts; dsv4.model.parallel moves tokens
                                  with all-to-all), and FSDP2 shards it further over "edp"
One process and N see the same global batch: each rank takes its rows of every micro-batch (`Dist.rows`), so the
per-rank mean losses average to the global mean, FSDP's reduce-scatter averages the gradients, and the experts'
gradients (summed over every rank's tokens by the all-to-all) are divided by the world size. The aux-loss-free bias
moves by the all-reduced expert load, the clip uses the norm over every shard, and metrics are all-reduced means.
The backend comes from dsv4.device (gloo on the CPU, the accelerator's collective library elsewhere).
"""

from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from dsv4.device import distributed_backend, parse_device
from dsv4.model.hyper import HyperConnection, HyperHead
from dsv4.model.parallel import ExpertParallel
from dsv4.model.transformer import Transformer

TIMEOUT_S = 600  # a collective that waits longer than this fails (a hung peer); a dead peer ends the run at once


@dataclass
class Dist:
    """This process's place in a distributed run."""
    world: int
    rank: int
    device: torch.device
    mesh: DeviceMesh                   # "dp": every rank
    ep: int = 1                        # expert-parallel degree
    ep_mesh: DeviceMesh | None = None  # ("edp", "ep") when ep > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch tensor [B, ...] (B divisible by the world size)."""
        if t.shape[0] % self.world:
            raise ValueError(f"a batch of {t.shape[0]} sequences does not split over {self.world} ranks; choose a "
                             f"batch size divisible by --nproc")
        n = t.shape[0] // self.world
        return t[self.rank * n:(self.rank + 1) * n]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place over every rank; returns t."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of each value (every rank passes the same keys)."""
        keys = list(values)
        t = self.sum(torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device))
        return {k: v / self.world for k, v in zip(keys, t.tolist())}

    def broadcast(self, obj):
        """Rank 0's value of a picklable object, on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        dist.barrier()


def world_size() -> int:
    """The number of processes this one was launched among (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str | None, expert_parallel: int = 1) -> Dist | None:
    """Join the run this process was launched into (torchrun's environment); None when it is alone."""
    world = world_size()
    if world == 1:
        if expert_parallel > 1:
            raise ValueError(f"--expert-parallel {expert_parallel} needs as many processes: add --nproc")
        return None
    if world % expert_parallel:
        raise ValueError(f"--expert-parallel {expert_parallel} must divide the {world} processes")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = parse_device(device)
    if dev.type != "cpu":  # one accelerator per process
        dev = torch.device(dev.type, local_rank)
        torch.accelerator.set_device_index(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(distributed_backend(dev), timeout=datetime.timedelta(seconds=TIMEOUT_S))
    mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",))
    ep_mesh = (init_device_mesh(dev.type, (world // expert_parallel, expert_parallel), mesh_dim_names=("edp", "ep"))
               if expert_parallel > 1 else None)
    return Dist(world, dist.get_rank(), dev, mesh, expert_parallel, ep_mesh)


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- the model ----

def checkpoint_blocks(model: Transformer) -> None:
    """Activation checkpointing per block: each block's forward keeps only its inputs and runs again in the backward.
    The parameter names do not change (no wrapper module). A recomputed forward writes the same statistics
    (expert loads, balance, KL) into the same `LayerStats` fields, replacing them: nothing is counted twice."""
    from torch.utils.checkpoint import checkpoint

    for block in [*model.layers, *model.mtp]:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def shard_experts(model: Transformer, d: Dist) -> None:
    """Spread every layer's routed experts over the "ep" ranks: w13 / w2 become DTensors Shard(0) on "ep" and each
    `Experts` learns its group (dsv4.model.parallel)."""
    ep_mesh = d.ep_mesh["ep"]
    for block in [*model.layers, *model.mtp]:
        experts = block.ffn.experts
        experts.ep = ExpertParallel.over(ep_mesh.get_group(), experts.w13.shape[0])
        for name in ("w13", "w2"):
            w = getattr(experts, name)
            setattr(experts, name, torch.nn.Parameter(distribute_tensor(w.detach(), ep_mesh, [Shard(0)]),
                                                      requires_grad=w.requires_grad))


def fsdp_policy(dtype: torch.dtype, compute: bool = True):
    """bf16 (or fp16) compute with fp32 gradient reduction; fp32 keeps everything as it is."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    low = dtype != torch.float32 and compute
    # the blocks cast their own inputs (the residual streams stay fp32 between them)
    return MixedPrecisionPolicy(param_dtype=dtype if low else None, reduce_dtype=torch.float32,
                                cast_forward_inputs=False)


def parallelize(model: Transformer, d: Dist, dtype: torch.dtype, activation_checkpointing: bool = False
                ) -> Transformer:
    """Shard `model` (an fp32 model, the same on every rank) in place: activation checkpointing, expert parallelism,
    then FSDP2 bottom-up: hyper-connections (kept fp32 as the release keeps them), each block, the experts over
    "edp", and the root (embedding, head, final norms). MTP blocks keep their parameters gathered after their
    forward: the model reads their head norms outside it. Engram's tables (sparse gradients, which FSDP cannot
    reduce) stay whole on every rank: `sync_replicated_grads` sums their rows over the ranks."""
    from torch.distributed.fsdp import fully_shard

    if activation_checkpointing:
        checkpoint_blocks(model)
    low, fp32 = fsdp_policy(dtype), fsdp_policy(dtype, compute=False)
    if dtype != torch.float32:  # hyper-connections and heads stay fp32, each its own unit
        for m in model.modules():
            if isinstance(m, (HyperConnection, HyperHead)):
                fully_shard(m, mesh=d.mesh, mp_policy=fp32)
    if d.ep > 1:
        shard_experts(model, d)
    for block in [*model.layers, *model.mtp]:
        if d.ep > 1:
            experts = block.ffn.experts
            fully_shard(experts, mesh=d.ep_mesh["edp"], mp_policy=low)
            experts.set_gradient_divide_factor(float(d.world))
        fully_shard(block, mesh=d.mesh, mp_policy=low, reshard_after_forward=block not in model.mtp,
                    ignored_params=sparse_params(block))
    fully_shard(model, mesh=d.mesh, mp_policy=low)
    return model


def sparse_params(module: torch.nn.Module) -> set[torch.nn.Parameter]:
    """Parameters of embeddings with sparse gradients (Engram's tables)."""
    return {m.weight for m in module.modules() if isinstance(m, torch.nn.Embedding) and m.sparse}


@torch.no_grad()
def sync_replicated_grads(params: list[torch.Tensor], d: Dist) -> None:
    """Average over the ranks the gradients FSDP does not own (parameters kept whole on every rank): dense ones by an
    all-reduce, sparse ones (Engram's rows) by gathering every rank's rows and summing the duplicates."""
    for p in params:
        if p.grad is None or isinstance(p, DTensor):
            continue
        if not p.grad.is_sparse:
            p.grad = d.sum(p.grad) / d.world
            continue
        g = p.grad.coalesce()
        rows, values = g.indices()[0], g.values()
        counts = [rows.new_zeros(1) for _ in range(d.world)]
        dist.all_gather(counts, rows.new_tensor([rows.numel()]))
        n = max(int(c) for c in counts)  # all_gather takes equal sizes: pad to the longest
        rows_all = [rows.new_zeros(n) for _ in range(d.world)]
        values_all = [values.new_zeros(n, *values.shape[1:]) for _ in range(d.world)]
        dist.all_gather(rows_all, torch.cat([rows, rows.new_zeros(n - rows.numel())]))
        dist.all_gather(values_all, torch.cat([values, values.new_zeros(n - rows.numel(), *values.shape[1:])]))
        rows = torch.cat([r[:int(c)] for r, c in zip(rows_all, counts)])
        values = torch.cat([v[:int(c)] for v, c in zip(values_all, counts)])
        p.grad = torch.sparse_coo_tensor(rows[None], values / d.world, g.shape).coalesce()


class ShardedPrecision:
    """What `dsv4.train.precision.MixedPrecision` is for one process, under FSDP2: the sharded fp32 parameters are
    the masters (the policy casts them for compute), so every method is the identity or a no-op."""

    def master(self, p):
        return p

    def accumulate(self):
        pass

    def sync(self):
        pass

    def state_dict(self, model: torch.nn.Module) -> dict:
        return {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a DTensor)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (updatable in place under no_grad), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def splits_matrices(p: torch.Tensor) -> bool:
    """A DTensor whose shards cut through its [out, in] matrices (not only through the stack of them)."""
    return isinstance(p, DTensor) and any(isinstance(pl, Shard) and pl.dim >= p.dim() - 2 for pl in p.placements)


def shard_of(whole: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This rank's shard of `whole` (the same on every rank) in `like`'s layout, without communication."""
    mesh = like.device_mesh
    replicated = DTensor.from_local(whole.to(like.device), mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, like.placements).to_local()
