"""Run under torchrun with 2 processes (tests/test_distributed.py): the gradients of a sharded `tiny` with Engram
(FSDP2, then FSDP2 + expert parallelism over both ranks), each rank fed its half of a global batch, equal one
process's on the whole batch. Exits 1 naming the worst parameter otherwise."""

import sys

import torch

from dsv4.config import ModelArgs
from dsv4.model.stats import TrainStats
from dsv4.train import distributed
from dsv4.train.loss import training_loss
from dsv4.train.pipeline import build_model

TOLERANCE = 1e-4  # relative (to each gradient's norm); fp32 sums in another order differ by ~1e-5


def relative_errors(model, reference) -> dict[str, float]:
    ref = dict(reference.named_parameters())
    errors = {}
    for name, p in model.named_parameters():
        got, want = p.grad, ref[name].grad
        if got is None or want is None:
            errors[name] = 0.0 if got is None and want is None else float("inf")
            continue
        got = distributed.full(got)
        got, want = (got.to_dense(), want.to_dense()) if want.is_sparse else (got, want)
        errors[name] = ((got - want).norm() / want.norm().clamp(min=1e-30)).item()
    return errors


def main() -> int:
    d = distributed.init("cpu", expert_parallel=2)
    args = ModelArgs.from_name("tiny").with_engram(layers=[1])
    g = torch.Generator().manual_seed(0)
    ids, targets = (torch.randint(0, args.vocab_size, (4, 32), generator=g) for _ in range(2))
    stats = dict(mtp_weight=0.3, aux_alpha=1e-4)
    reference = build_model(args, d.device, 0)
    training_loss(reference, ids, targets, stats=TrainStats(indexer="dense", balance=True), **stats)[0].backward()
    worst = 0.0
    for layout, ep in (("fsdp", 1), ("fsdp+ep", 2)):
        sub = distributed.Dist(d.world, d.rank, d.device, d.mesh, ep, d.ep_mesh if ep > 1 else None)
        model = distributed.parallelize(build_model(args, d.device, 0), sub, torch.float32)
        if ep > 1:
            experts = model.layers[1].ffn.experts
            assert experts.ep is not None and experts.w13.to_local().shape[0] == args.n_routed_experts // 2
        loss, _ = training_loss(model, d.rows(ids), d.rows(targets),
                                stats=TrainStats(indexer="dense", balance=True), **stats)
        loss.backward()
        distributed.sync_replicated_grads(list(model.parameters()), sub)
        errors = relative_errors(model, reference)
        name = max(errors, key=errors.get)
        worst = max(worst, errors[name])
        if d.main:
            print(f"{layout}: worst relative gradient error {errors[name]:.2e} ({name})", flush=True)
    distributed.shutdown()
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
