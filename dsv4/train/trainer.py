"""One training stage: optimizer steps over micro-batches, validation, snapshots, metrics and plots.

One optimizer step = `grad_accum` micro-batches of `batch_size` x `seq_len` tokens:
    set_lr(step) -> for each micro-batch: training_loss / grad_accum -> backward -> (mixed precision: add the bf16
    grads into fp32 master grads) -> clip -> optimizer step on the masters -> copy masters into the compute weights ->
    aux-loss-free bias update from the micro-batches' summed expert load (reported by the forward: TrainStats)
Batch k of a stage depends only on (seed, k), and a snapshot holds everything else that changes (weights, optimizer
moments, routing biases, RNG), so `--resume` after a kill continues with exactly the losses of an uninterrupted run.
With a `dsv4.train.distributed.Dist` the same loop runs on every rank of a sharded model: each rank takes its rows of
every micro-batch, gradients are synchronised on the last micro-batch only, loads, metrics and norms are reduced
over the ranks, rank 0 writes the metrics and plots, and snapshots are written by all ranks (dsv4.train.sharded).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from dsv4.atomic import atomic_text
from dsv4.kernels.compile import compile_blocks
from dsv4.model.moe import Gate
from dsv4.model.stats import TrainStats
from dsv4.model.transformer import Transformer
from dsv4.train.budget import OPEN, StepBudget
from dsv4.train.config import StageConfig
from dsv4.train.distributed import Dist, ShardedPrecision, sync_replicated_grads
from dsv4.train.loss import cross_entropy, training_loss
from dsv4.train.optim import build_optimizer, clip_grad_norm, set_lr
from dsv4.train.precision import MixedPrecision
from dsv4.train.sharded import load_in_place, save_sharded
from dsv4.train.snapshot import latest, load_latest, save_snapshot, set_rng_state

Batch = tuple[torch.Tensor, ...]  # (ids, targets) or (ids, targets, mask), each [B, T]
PLOT_EVERY_S = 120.0  # the plots in the run directory are redrawn at most this often while a stage runs, and at its end


@torch.no_grad()
def update_balance_bias(gate: Gate, load: torch.Tensor, gamma: float) -> None:
    """Aux-loss-free balancing (DeepSeek-V3 sec. 2.1.2): after each step, raise the selection bias of the experts that
    received fewer than the mean number of tokens by gamma and lower the others' by gamma. load [E]: the layer's
    assignments summed over the step's micro-batches (with data parallelism, all-reduced first). Hash-routed layers
    have no bias."""
    if not gate.hashed:
        gate.bias += gamma * torch.sign(load.mean() - load)


class Trainer:
    """Runs one stage on `model` from its latest snapshot in `run_dir` (or from the model as given)."""

    def __init__(self, model: Transformer, cfg: StageConfig, run_dir: str | os.PathLike,
                 batches: Callable[[int], Iterator[Batch]], val: list[Batch], dtype: torch.dtype,
                 meta: dict | None = None, progress: bool = True, desc: str = "train", dist: Dist | None = None):
        self.model, self.cfg, self.run_dir = model, cfg, Path(run_dir)
        self.batches, self.val, self.meta, self.progress, self.desc = batches, val, meta or {}, progress, desc
        self.dist, self.main = dist, dist is None or dist.main  # rank 0 (or the only process) logs and plots
        self.device = next(model.parameters()).device
        # a sharded model (dsv4.train.distributed.parallelize) holds its fp32 masters itself
        self.mp = ShardedPrecision() if dist else MixedPrecision(model, dtype)
        # Muon's Newton-Schulz is robust in bf16
        ns_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        self.optimizer = build_optimizer(model, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                         muon_lr=cfg.muon_lr, memory_lr=cfg.memory_lr, ns_dtype=ns_dtype,
                                         master=self.mp.master)
        self.params = [self.mp.master(p) for p in dict.fromkeys(model.parameters()) if p.requires_grad]
        blocks = [*model.layers, *model.mtp]
        self.moes, self.moe_layers = [b.ffn for b in blocks], [b.layer_id for b in blocks]
        self.compiled = False  # set by compile()
        self.stage: str | None = None  # the lightning indexer's training stage in the last step (indexer_stage)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.step = 0

    def compile(self) -> Trainer:
        """torch.compile the training step's model parts: every block whole (dsv4.kernels.compile.compile_blocks) and
        the fused head's chunks. The first steps compile (cached on disk afterwards). Returns self."""
        compile_blocks(self.model)
        self.compiled = True
        return self

    # -- state --
    def resume(self) -> bool:
        """Load the newest good snapshot of this stage, whatever number of processes wrote it; False when there is
        none."""
        if self.dist is None:
            snap = load_latest(self.run_dir)
            if snap is None:
                return False
            self.mp.load_state_dict(self.model, snap["model"])
            self.optimizer.load_state_dict(snap["optimizer"])
        else:  # each rank reads its shards in place
            found = latest(self.run_dir)
            if found is None:
                return False
            snap = load_in_place(*found, self.mp.state_dict(self.model), self.optimizer, self.dist)
        set_rng_state(snap["rng"])
        self.step = snap["step"]
        if self.main:
            self._truncate_metrics(self.step)
        return True

    def save(self):
        meta = {**self.meta, "stage_config": dataclasses.asdict(self.cfg),
                "data_position": {"seed": self.cfg.seed, "next_batch": self.step * self.cfg.grad_accum}}
        if self.dist is not None:
            save_sharded(self.run_dir, self.step, self.mp.state_dict(self.model), self.optimizer.state_dict(),
                         self.dist, meta=meta, keep=self.cfg.keep)
        else:
            save_snapshot(self.run_dir, self.step, self.mp.state_dict(self.model), self.optimizer.state_dict(),
                          meta=meta, keep=self.cfg.keep)

    def _truncate_metrics(self, step: int):
        """Drop metrics rows after `step` (written by a run that was killed before its next snapshot)."""
        if not self.metrics_path.exists():
            return
        rows = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]
        kept = []
        for line in rows:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError):
                continue
        atomic_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def _log(self, row: dict):
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    # -- steps --
    def indexer_stage(self) -> str | None:
        """The lightning indexer's training stage at this step (see dsv4.model.stats.TrainStats)."""
        if self.cfg.indexer_weight == 0:  # indexer not trained: attention runs exactly as at inference
            return None
        return "dense" if self.step < self.cfg.indexer_warmup else "sparse"

    def train_step(self, micro: Iterator[Batch]) -> tuple[dict, list[torch.Tensor]]:
        """One optimizer step over grad_accum micro-batches -> (metrics row, summed expert load per MoE layer)."""
        cfg = self.cfg
        self.model.train()
        self.stage = stage = self.indexer_stage()
        lr_mult = set_lr(self.optimizer, self.step, cfg.warmup, cfg.steps, cfg.schedule, cfg.min_lr_ratio,
                         cfg.decay_frac)
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        load = [torch.zeros(m.gate.n_experts, device=self.device) for m in self.moes]
        for i in range(cfg.grad_accum):
            ids, targets, mask = self._local(next(micro))
            if self.dist is not None:  # gradients are reduced once, after the last micro-batch
                self.model.set_requires_gradient_sync(i == cfg.grad_accum - 1)
            stats = TrainStats(indexer=stage, balance=cfg.aux_alpha > 0)
            loss, metrics = training_loss(self.model, ids, targets, mask, mtp_weight=cfg.mtp_weight,
                                          indexer_weight=cfg.indexer_weight, aux_alpha=cfg.aux_alpha, stats=stats,
                                          compiled=self.compiled, share=self._token_weight)
            (loss / cfg.grad_accum).backward()
            self.mp.accumulate()
            metrics["loss"] = loss.item()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
            loads = stats.collect("load")
            for acc, layer_id in zip(load, self.moe_layers):
                if layer_id in loads:  # (MTP layers run only with an MTP loss)
                    acc += loads[layer_id]
        if self.dist is not None:  # the global step: mean metrics, summed loads (the bias moves as in one process)
            sync_replicated_grads(self.params, self.dist)
            totals = self.dist.mean(totals)
            load = list(self.dist.sum(torch.stack(load)).unbind(0)) if load else load
        if not math.isfinite(totals["loss"]):
            raise FloatingPointError(f"{self.desc}: loss is {totals['loss']} at step {self.step}; lower --lr or "
                                     "resume from the last snapshot")
        grad_norm = clip_grad_norm(self.params, cfg.clip)
        self.optimizer.step()
        self.mp.sync()
        if cfg.balance_gamma > 0:
            for m, acc in zip(self.moes, load):
                update_balance_bias(m.gate, acc, cfg.balance_gamma)
        self.step += 1
        row = {"step": self.step, **totals, "grad_norm": grad_norm,
               "lr": lr_mult * self.optimizer.param_groups[0]["base_lr"]}
        return row, load

    def _local(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(ids, targets, mask or None) of this rank's rows of a global batch, on the device."""
        batch = [(t if self.dist is None else self.dist.rows(t)).to(self.device, non_blocking=True) for t in batch]
        return batch[0], batch[1], batch[2] if len(batch) > 2 else None

    def _token_weight(self, mask: torch.Tensor | None) -> float:
        """What this rank's mean loss counts for so that the ranks' mean is the global batch's token mean: 1 without
        a mask (every rank has as many tokens), world * tokens here / tokens everywhere with one (SFT's answers)."""
        if self.dist is None or mask is None:
            return 1.0
        here = mask.sum().double()
        return (self.dist.world * here / self.dist.sum(here.clone()).clamp(min=1)).item()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss (CE, mask-aware) on the fixed validation batches, without gradients, with the attention the last
        training step ran (during the indexer's dense warm-up the compressed-sparse layers attend to every visible
        entry, as the model being trained does then)."""
        self.model.eval()
        losses = []
        with torch.compiler.set_stance("force_eager"):  # compiled blocks would compile an eval variant for this
            for batch in self.val:
                ids, targets, mask = self._local(batch)
                logits = self.model(ids, stats=TrainStats(indexer=self.stage))
                losses.append(cross_entropy(logits, targets, mask).item() * self._token_weight(mask))
        self.model.train()
        loss = sum(losses) / max(len(losses), 1)
        return loss if self.dist is None else self.dist.mean({"val": loss})["val"]

    def fit(self, budget: StepBudget | None = None) -> dict:
        """Train from self.step to cfg.steps; snapshots, metrics, plots. Ctrl-C saves a snapshot and re-raises.
        With a `budget` (dsv4.train.budget) the number of steps is open until the budget decides it (or is the one
        an earlier try of this run decided)."""
        from dsv4.train.plots import plot_run

        decided = budget.load() if budget else None
        if budget:
            self.cfg = dataclasses.replace(self.cfg, steps=decided.steps if decided else OPEN)
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        last: dict = {}
        if self.step >= cfg.steps:
            return self._last_row()
        # where the stage starts from (the baseline its validation loss improves on), kept in the first step's row
        start = {"val_loss_start": self.evaluate()} if self.step == 0 else {}
        micro = self.batches(self.step * cfg.grad_accum)
        bar = tqdm(total=None if cfg.steps == OPEN else cfg.steps, initial=self.step, desc=self.desc, unit="step",
                   disable=not (self.progress and self.main), dynamic_ncols=True)
        tokens_done, t_start = 0, time.perf_counter()
        plotted = t_start
        try:
            while self.step < cfg.steps:
                row, load = self.train_step(micro)
                row.update(start)
                start = {}
                if budget and (self.dist is not None or cfg.steps == OPEN or budget.revisable):
                    self._budget_step(budget, bar)
                    cfg = self.cfg
                tokens_done += cfg.tokens_per_step
                elapsed = time.perf_counter() - t_start
                row["tokens"] = self.step * cfg.tokens_per_step
                row["tok_per_s"] = tokens_done / elapsed
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    row["val_loss"] = self.evaluate()
                    row["expert_load"] = {str(i): n.tolist() for i, n in zip(self.moe_layers, load)}
                if self.main:
                    self._log(row)
                last = row
                val = f" val {row['val_loss']:.3f}" if "val_loss" in row else ""
                bar.set_postfix_str(f"ce {row['ce']:.3f}{val} {row['tok_per_s']:.0f} tok/s")
                bar.update(1)
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save()
                if self.main and (self.step == cfg.steps or time.perf_counter() - plotted > PLOT_EVERY_S):
                    plot_run(self.metrics_path, self.run_dir)
                    plotted = time.perf_counter()
        except KeyboardInterrupt:
            bar.close()
            saved = os.path.isdir(os.path.join(self.run_dir, f"step-{self.step:09d}"))
            if self.dist is None and self.step > 0 and not saved:  # (ranks are stopped by their launcher)
                self.save()
                print(f"\ninterrupted: saved step {self.step} to {self.run_dir}; continue with --resume")
            raise
        bar.close()
        return last

    def _budget_step(self, budget: StepBudget, bar: tqdm) -> None:
        """Let the budget see this step; once it decides, the stage has that many steps. In a sharded run rank 0's
        clock decides for every rank."""
        decision = None
        if self.main and (self.cfg.steps == OPEN or budget.revisable):
            decision = budget.observe(self.step)
        if self.dist is not None:
            decision = self.dist.broadcast(decision)
        if decision is not None:
            self.cfg = dataclasses.replace(self.cfg, steps=decision.steps)
            if self.progress and self.main:
                tqdm.write(f"{self.desc}: {decision.sec_per_step:.2f} s a step ({decision.tokens_per_s:.0f} tokens/s) "
                           f"-> {decision.steps} steps to end on time ({decision.seconds_left:.0f} s left, "
                           f"{decision.reserved_s:.0f} s of them for the stages after this one)"
                           + (f" (revision {decision.revision})" if decision.revision else ""))
        est = budget.estimate()
        bar.total = self.cfg.steps if self.cfg.steps != OPEN else (est[1] if est else None)
        bar.refresh()

    def _last_row(self) -> dict:
        from dsv4.train.plots import read_metrics

        rows = read_metrics(self.metrics_path) if self.metrics_path.exists() else []
        return rows[-1] if rows else {}
