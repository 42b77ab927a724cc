"""The dsv4 trainer: tokenizer -> token files -> pretraining -> supervised fine-tuning -> a checkpoint directory.

    out/tokenizer.json                    byte-level BPE trained on the training split (reused when present)
    out/data/{train,val}.bin              memory-mapped token files (+ .json sidecars), reused when unchanged
    out/pretrain/step-*/                  snapshots (model, optimizer, RNG, data position), atomic and checksummed
    out/pretrain/metrics.jsonl            one JSON object per step; loss.png, lr.png, expert_load.png beside it
    out/longctx/...                       optional (--longctx-steps): long-context training at up to 8K tokens on the
                                          corpus mixed with synthetic retrieval tasks (dsv4.tasks), the indexer trained
                                          with its recipe (dense warm-up with KL, then sparse); between the two
    out/sft/...                           the same for fine-tuning (docstring -> function chat pairs)
    out/final/                            config.json + safetensors + tokenizer.json + plots: any dsv4 command loads it

One optimizer step = `grad_accum` micro-batches of `batch_size` x `seq_len` tokens:
    set_lr(step) -> for each micro-batch: training_loss / grad_accum -> backward -> (mixed precision: add the bf16
    grads into fp32 master grads) -> clip -> optimizer step on the masters -> copy masters into the compute weights ->
    aux-loss-free bias update from the micro-batches' summed expert load
Batch k of a stage depends only on (seed, k), and a snapshot holds everything else that changes (weights, optimizer
moments, routing biases, RNG), so `--resume` after a kill continues with exactly the losses of an uninterrupted run.
The same loop will drive distributed training: everything device- or rank-specific goes through `MixedPrecision`,
the batch source and `update_balance_bias` (which would all-reduce the load first).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from dsv4.config import ModelArgs
from dsv4.device import can_compile, default_device, resolve_dtype
from dsv4.loss import cross_entropy, training_loss
from dsv4.model.attention import Attention
from dsv4.model.moe import update_balance_bias
from dsv4.model.transformer import Transformer
from dsv4.optim import build_optimizer, clip_grad_norm, set_lr
from dsv4.snapshot import list_snapshots, load_latest, save_snapshot, set_rng_state
from dsv4.tasks import KINDS, LongContextMix

DONE = "DONE"  # marker file in out/final once the whole pipeline has finished


@dataclass
class StageConfig:
    """Hyper-parameters of one training stage (pretraining or fine-tuning). The defaults are the one-command run's
    pretraining of `small` (100 steps x 4096 tokens: 14 minutes on a 2-core CPU with bf16 matmuls, 3 of them
    compiling); `TrainConfig.sft` holds the fine-tuning stage's (20 steps). Muon at 3e-3 is what a short sweep
    picked (README, "The one-command training run")."""
    steps: int = 100
    batch_size: int = 8               # sequences per micro-batch
    grad_accum: int = 1               # micro-batches per optimizer step
    seq_len: int = 512
    optimizer: str = "muon"           # muon (hidden matrices; AdamW for the rest) | adamw
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 10
    schedule: str = "cosine"          # cosine | wsd
    min_lr_ratio: float = 0.1
    clip: float = 1.0                 # max global grad norm (0 = off)
    balance_gamma: float = 1e-3       # aux-loss-free bias step per optimizer step (0 = off)
    aux_alpha: float = 1e-4           # sequence-wise balance loss weight (0 = off)
    mtp_weight: float = 0.3           # lambda of the MTP loss (0 = MTP off)
    indexer_warmup: int = 20          # steps of dense indexer warm-up (KL to the main attention); then sparse
    indexer_weight: float = 1.0       # weight of the indexer KL
    eval_every: int = 25              # validation loss every N steps (and at the end)
    eval_batches: int = 4
    save_every: int = 25              # snapshot every N steps (and at the end)
    keep: int = 2                     # snapshots kept
    seed: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


@dataclass
class TrainConfig:
    """The whole pipeline: model, data, both stages, where it goes."""
    out: str = "runs/small"
    preset: str = "small"
    data: str | None = None           # None = the interpreter's standard library; a folder; or a .jsonl with "text"
    val_frac: float = 0.03
    device: str | None = None         # None = the accelerator if any, else the CPU
    dtype: str = "auto"               # compute dtype; auto = bf16 where the device does it fast, else fp32
    compile: str = "auto"             # torch.compile the blocks: on | off | auto (on where a compiler backend exists)
    init_seed: int = 0
    init: str | None = None           # a checkpoint directory to start from (its weights and tokenizer)
    pretrain: StageConfig = field(default_factory=StageConfig)
    longctx: StageConfig = field(default_factory=lambda: StageConfig(
        steps=0, batch_size=1, seq_len=8192, lr=1e-3, warmup=5, indexer_warmup=20, mtp_weight=0.0, eval_every=50,
        save_every=25, eval_batches=4))
    longctx_task_frac: float = 0.5    # share of long-context steps that train on synthetic retrieval tasks
    longctx_tasks: tuple[str, ...] = KINDS  # which of them (dsv4.tasks.KINDS)
    longctx_edge_frac: float = 0.2    # share of single-needle tasks with the needle at depth 0 or 1 (dsv4.tasks)
    sft: StageConfig = field(default_factory=lambda: StageConfig(steps=20, lr=1e-3, warmup=3, indexer_warmup=0,
                                                                 eval_every=25, save_every=25))

    STAGES = ("pretrain", "longctx", "sft")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        stages = {k: StageConfig(**d.pop(k)) for k in cls.STAGES if k in d}
        if "longctx_tasks" in d:
            d["longctx_tasks"] = tuple(d["longctx_tasks"])
        return cls(**d, **stages)


# ---- mixed precision ----
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


# ---- one stage ----
Batch = tuple[torch.Tensor, ...]  # (ids, targets) or (ids, targets, mask), each [B, T]


class Trainer:
    """Runs one stage on `model` from its latest snapshot in `run_dir` (or from the model as given)."""

    def __init__(self, model: Transformer, cfg: StageConfig, run_dir: str | os.PathLike,
                 batches: Callable[[int], Iterator[Batch]], val: list[Batch], dtype: torch.dtype,
                 meta: dict | None = None, progress: bool = True, desc: str = "train"):
        self.model, self.cfg, self.run_dir = model, cfg, Path(run_dir)
        self.batches, self.val, self.meta, self.progress, self.desc = batches, val, meta or {}, progress, desc
        self.device = next(model.parameters()).device
        self.mp = MixedPrecision(model, dtype)
        ns_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32  # Muon's Newton-Schulz is robust in bf16
        self.optimizer = build_optimizer(model, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                         ns_dtype=ns_dtype, master=self.mp.master)
        self.params = [self.mp.master(p) for p in dict.fromkeys(model.parameters()) if p.requires_grad]
        blocks = [*model.layers, *model.mtp]
        self.moes, self.moe_layers = [b.ffn for b in blocks], [b.layer_id for b in blocks]
        self.attns = [m for m in model.modules() if isinstance(m, Attention) and m.indexer is not None]
        for m in self.moes:
            m.aux_alpha = cfg.aux_alpha
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.step = 0

    # -- state --
    def resume(self) -> bool:
        """Load the newest good snapshot of this stage; False when there is none."""
        snap = load_latest(self.run_dir)
        if snap is None:
            return False
        self.mp.load_state_dict(self.model, snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        set_rng_state(snap["rng"])
        self.step = snap["step"]
        self._truncate_metrics(self.step)
        return True

    def save(self):
        meta = {**self.meta, "stage_config": dataclasses.asdict(self.cfg),
                "data_position": {"seed": self.cfg.seed, "next_batch": self.step * self.cfg.grad_accum}}
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
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics_path)

    def _log(self, row: dict):
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    # -- steps --
    def _set_indexer_stage(self):
        stage = "dense" if self.step < self.cfg.indexer_warmup else "sparse"
        if self.cfg.indexer_weight == 0:  # indexer not trained: attention runs exactly as at inference
            stage = None
        for a in self.attns:
            a.indexer_train = stage

    def train_step(self, micro: Iterator[Batch]) -> tuple[dict, list[torch.Tensor]]:
        """One optimizer step over grad_accum micro-batches -> (metrics row, summed expert load per MoE layer)."""
        cfg = self.cfg
        self.model.train()
        self._set_indexer_stage()
        lr_mult = set_lr(self.optimizer, self.step, cfg.warmup, cfg.steps, cfg.schedule, min_lr_ratio=cfg.min_lr_ratio)
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        load = [torch.zeros(m.gate.n_experts, device=self.device) for m in self.moes]
        for _ in range(cfg.grad_accum):
            batch = [t.to(self.device, non_blocking=True) for t in next(micro)]
            ids, targets, mask = batch[0], batch[1], batch[2] if len(batch) > 2 else None
            loss, metrics = training_loss(self.model, ids, targets, mask, mtp_weight=cfg.mtp_weight,
                                          indexer_weight=cfg.indexer_weight)
            (loss / cfg.grad_accum).backward()
            self.mp.accumulate()
            metrics["loss"] = loss.item()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
            for acc, m in zip(load, self.moes):
                if m.load is not None:
                    acc += m.load
        if not math.isfinite(totals["loss"]):
            raise FloatingPointError(f"{self.desc}: loss is {totals['loss']} at step {self.step}; lower --lr or "
                                     "resume from the last snapshot")
        grad_norm = clip_grad_norm(self.params, cfg.clip)
        self.optimizer.step()
        self.mp.sync()
        for acc, m in zip(load, self.moes):
            m.load = acc
        if cfg.balance_gamma > 0:
            update_balance_bias(self.model, cfg.balance_gamma)
        self.step += 1
        row = {"step": self.step, **totals, "grad_norm": grad_norm,
               "lr": lr_mult * self.optimizer.param_groups[0]["base_lr"]}
        return row, load

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss (CE, mask-aware) on the fixed validation batches, in inference mode."""
        self.model.eval()
        losses = []
        with torch.compiler.set_stance("force_eager"):  # compiled blocks would compile an eval variant for this
            for batch in self.val:
                batch = [t.to(self.device) for t in batch]
                mask = batch[2] if len(batch) > 2 else None
                losses.append(cross_entropy(self.model(batch[0]), batch[1], mask).item())
        self.model.train()
        return sum(losses) / max(len(losses), 1)

    def fit(self) -> dict:
        """Train from self.step to cfg.steps; snapshots, metrics, plots. Ctrl-C saves a snapshot and re-raises."""
        from dsv4.plots import plot_run

        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        last: dict = {}
        if self.step >= cfg.steps:
            return self._last_row()
        micro = self.batches(self.step * cfg.grad_accum)
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.desc, unit="step", disable=not self.progress,
                   dynamic_ncols=True)
        tokens_done, t_start = 0, time.perf_counter()
        try:
            while self.step < cfg.steps:
                row, load = self.train_step(micro)
                tokens_done += cfg.tokens_per_step
                elapsed = time.perf_counter() - t_start
                row["tokens"] = self.step * cfg.tokens_per_step
                row["tok_per_s"] = tokens_done / elapsed
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    row["val_loss"] = self.evaluate()
                    row["expert_load"] = {str(i): n.tolist() for i, n in zip(self.moe_layers, load)}
                self._log(row)
                last = row
                val = f" val {row['val_loss']:.3f}" if "val_loss" in row else ""
                bar.set_postfix_str(f"ce {row['ce']:.3f}{val} {row['tok_per_s']:.0f} tok/s")
                bar.update(1)
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save()
                    plot_run(self.metrics_path, self.run_dir)
        except KeyboardInterrupt:
            bar.close()
            if self.step > 0 and not os.path.isdir(os.path.join(self.run_dir, f"step-{self.step:09d}")):
                self.save()
                print(f"\ninterrupted: saved step {self.step} to {self.run_dir}; continue with --resume")
            raise
        bar.close()
        return last

    def _last_row(self) -> dict:
        from dsv4.plots import read_metrics

        rows = read_metrics(self.metrics_path) if self.metrics_path.exists() else []
        return rows[-1] if rows else {}


# ---- the pipeline ----
def build_model(args: ModelArgs, device: torch.device, seed: int) -> Transformer:
    """A freshly initialised fp32 model on `device` (built on meta, then materialised: no double allocation)."""
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights(seed=seed)
    model.init_rope()
    return model


def _check_resume(out: Path, cfg: TrainConfig, resume: bool):
    saved = out / "train_config.json"
    if not saved.exists():
        if not resume and any((out / s).is_dir() and list_snapshots(out / s) for s in TrainConfig.STAGES):
            raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        return
    old = json.loads(saved.read_text())
    if not resume:
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    new, default = (json.loads(json.dumps(c.to_dict())) for c in (cfg, TrainConfig()))  # as saved (tuples: lists)
    # a key an older version did not write had its default
    changed = sorted(k for k in set(old) | set(new) if old.get(k, default.get(k)) != new.get(k)
                     and k not in ("out", "device", "compile"))
    if changed:
        raise ValueError(f"--resume with a different configuration ({', '.join(changed)} changed) would not continue "
                         f"the same run; use the original settings or another --out")


def prepare_data(cfg: TrainConfig, out: Path, vocab_size: int, progress: bool = True):
    """Tokenizer (trained once on the training split) and the train/val token files -> (tokenizer, train, val docs,
    train token file, val token file)."""
    from dsv4.data import load_corpus, read_doc, tokenize_corpus
    from dsv4.tokenizer import Tokenizer

    train_docs, val_docs = load_corpus(cfg.data, cfg.val_frac)
    if not train_docs or not val_docs:
        raise ValueError(f"the corpus split into {len(train_docs)} train and {len(val_docs)} val documents; "
                         f"both need at least one (more data or another --val-frac)")
    tok_path = out / "tokenizer.json"
    if cfg.init and not tok_path.exists():  # continuing a checkpoint: its tokenizer, not a new one
        shutil.copy(Path(cfg.init) / "tokenizer.json", tok_path)
    if tok_path.exists():
        tok = Tokenizer.from_file(tok_path)
    else:
        if progress:
            print(f"training a {vocab_size}-token byte-level BPE on {len(train_docs)} documents ...", flush=True)
        tok = Tokenizer.train((read_doc(d) for d in train_docs), vocab_size, tok_path)
    if tok.vocab_size > vocab_size:
        raise ValueError(f"{tok_path} has {tok.vocab_size} tokens but the model's vocabulary is {vocab_size}")
    files = {}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        files[split] = out / "data" / f"{split}.bin"
        tokenize_corpus(docs, tok, files[split], progress=progress)
    return tok, train_docs, val_docs, files["train"], files["val"]


def initial_weights(path: str, args: ModelArgs, device: torch.device) -> Transformer:
    """The fp32 weights of checkpoint `path` to continue training from (its config must be the preset's)."""
    from dsv4.checkpoint import from_pretrained

    model = from_pretrained(path, device=device, dtype=torch.float32)
    if model.args != args:
        raise ValueError(f"--init {path} is not a {args.n_layers}-layer model of this preset's shape; "
                         "continue it with the same --preset")
    return model


def compile_enabled(setting: str, device: torch.device, dtype: torch.dtype) -> bool:
    """--compile on|off|auto; auto = on for bf16 training on CUDA or on a CPU with a C++ compiler (inductor's CPU
    backend). Not auto in fp32: compiled, the routed experts run dense (grouped GEMM compiles only in bf16)."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"--compile must be auto, on or off, got {setting!r}")
    if setting != "auto":
        return setting == "on"
    return dtype == torch.bfloat16 and can_compile(device)


def pretrain_source(token_file: Path, stage: StageConfig):
    from dsv4.data import PackedDataset

    ds = PackedDataset(token_file, stage.seq_len)
    return lambda start: ds.batches(stage.batch_size, stage.seed, start)


def fixed_val(batches: Iterator[Batch], n: int) -> list[Batch]:
    return [next(batches) for _ in range(n)]


def run(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run (or continue, or reuse) the whole pipeline; returns the final checkpoint directory."""
    from dsv4.data import PackedDataset, SFTDataset, docstring_pairs
    from dsv4.plots import plot_run

    out = Path(cfg.out)
    final = out / "final"
    if (final / DONE).exists():
        if resume:
            print(f"{final} is complete; reusing it (delete it or choose another --out to train again)")
            return final
        raise ValueError(f"{out} already holds a finished run; pass --resume to reuse it or choose another --out")
    stages = [(name, getattr(cfg, name)) for name in TrainConfig.STAGES if getattr(cfg, name).steps > 0]
    if not stages and not cfg.init:
        raise ValueError("every stage has 0 steps: nothing to train (--steps, --longctx-steps, --sft-steps)")
    _check_resume(out, cfg, resume)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    device = torch.device(cfg.device) if cfg.device else default_device()
    dtype = resolve_dtype(cfg.dtype, device)
    args = ModelArgs.from_name(cfg.preset)
    seq = max((stage.seq_len for _, stage in stages), default=0)
    if seq > args.max_seq_len:
        raise ValueError(f"seq_len {seq} exceeds the {cfg.preset} preset's max_seq_len {args.max_seq_len}")
    tok, train_docs, val_docs, train_file, val_file = prepare_data(cfg, out, args.vocab_size, progress)
    meta = {"train_config": cfg.to_dict(), "tokenizer_hash": tok.hash()}

    use_compile = compile_enabled(cfg.compile, device, dtype)
    model = build_model(args, device, cfg.init_seed)
    if cfg.init:
        model.load_state_dict(initial_weights(cfg.init, args, device).state_dict())
    for name, stage in stages:
        if name == "pretrain":
            batches = pretrain_source(train_file, stage)
            val = fixed_val(PackedDataset(val_file, stage.seq_len).batches(stage.batch_size, seed=1234),
                            stage.eval_batches)
        elif name == "longctx":
            from dsv4.data import load_tokens

            mix, val_mix = (LongContextMix(tok, load_tokens(f), stage.seq_len, cfg.longctx_task_frac,
                                           cfg.longctx_tasks, cfg.longctx_edge_frac) for f in (train_file, val_file))
            batches = (lambda m, s: lambda start: m.batches(s.batch_size, s.seed, start))(mix, stage)
            val = fixed_val(val_mix.batches(stage.batch_size, seed=1234), stage.eval_batches)
        else:
            ds = SFTDataset(docstring_pairs(train_docs), tok, stage.seq_len, drop_long=True)
            batches = (lambda d, s: lambda start: d.batches(s.batch_size, s.seed, start))(ds, stage)
            try:
                val_ds = SFTDataset(docstring_pairs(val_docs), tok, stage.seq_len, drop_long=True)
            except ValueError:  # no held-out pair fits: validate on training pairs rather than not at all
                val_ds = ds
            val = fixed_val(val_ds.batches(stage.batch_size, seed=1234), stage.eval_batches)
        trainer = Trainer(model, stage, out / name, batches, val, dtype, meta=meta, progress=progress, desc=name)
        trainer.resume()
        if use_compile and trainer.step < stage.steps:
            model.compile_blocks()
        if progress:
            n = sum(p.numel() for p in dict.fromkeys(model.parameters()))
            print(f"{name}: {cfg.preset} ({n / 1e6:.1f}M parameters, {str(dtype).removeprefix('torch.')} on "
                  f"{device.type}), {stage.steps} steps x {stage.tokens_per_step} tokens"
                  + (f", resuming at step {trainer.step}" if trainer.step else "")
                  + (" (compiled: the first steps include compilation)" if use_compile else ""), flush=True)
        last = trainer.fit()
        if progress and last:
            print(f"{name}: step {last.get('step')} train ce {last.get('ce', float('nan')):.4f} "
                  f"val {last.get('val_loss', float('nan')):.4f}", flush=True)
        # the next stage starts from this one's final weights at full precision
        model = build_model(args, device, cfg.init_seed)
        model.load_state_dict(load_latest(out / name)["model"])

    model.to_dtype(dtype)
    tmp = out / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save(tmp / "tokenizer.json")
    for name, _ in stages:
        for png in plot_run(out / name / "metrics.jsonl", out / name):
            shutil.copy(png, tmp / f"{name}_{Path(png).name}")
    (tmp / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    (tmp / DONE).write_text("")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
