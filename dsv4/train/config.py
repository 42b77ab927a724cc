"""What a training run is: the stages' hyper-parameters and the pipeline's settings, as flat dataclasses.

`TrainConfig` is saved with every run (train_config.json) and compared on --resume; `dsv4 train`'s options map onto
it one to one (dsv4.cli).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from dsv4.data.tasks import KINDS
from dsv4.train.optim import WSD_DECAY_FRAC


@dataclass
class StageConfig:
    """Hyper-parameters of one training stage (pretraining or fine-tuning). The defaults are pretraining's as
    `make run` uses them: 16 x 256-token windows a step (the sweep's best window at 4096 tokens a step: docs/NOTES.md,
    "Sizing the `make run` model"); `dsv4 train` sizes `steps` by its time budget (10 minutes unless told) or takes
    --steps. `TrainConfig.sft` holds the fine-tuning stage's (20 steps). A peak lr of 5e-3 (Muon and AdamW) beat 3e-3
    in 10 minutes (bench/results/budget_runs.json); evaluations and snapshots every 50 steps cost ~3% of the steps."""
    steps: int = 100
    batch_size: int = 16              # sequences per micro-batch
    grad_accum: int = 1               # micro-batches per optimizer step
    seq_len: int = 256
    optimizer: str = "muon"           # muon (hidden matrices; AdamW for the rest) | adamw
    lr: float = 5e-3                  # peak lr of AdamW (embedding, head, norms, router, mHC scalars) and of Muon
    muon_lr: float | None = None      # Muon's own peak lr (hidden matrices); None = lr
    memory_lr: float | None = None    # peak lr of Engram's tables (RowAdam); None = lr
    weight_decay: float = 0.1
    warmup: int = 10
    schedule: str = "wsd"             # wsd | cosine (wsd: a --time-budget decides the length late)
    decay_frac: float = WSD_DECAY_FRAC  # wsd: the share of the steps over which the lr decays
    min_lr_ratio: float = 0.1
    clip: float = 1.0                 # max global grad norm (0 = off)
    balance_gamma: float = 1e-3       # aux-loss-free bias step per optimizer step (0 = off)
    aux_alpha: float = 1e-4           # sequence-wise balance loss weight (0 = off)
    mtp_weight: float = 0.3           # lambda of the MTP loss (0 = MTP off)
    indexer_warmup: int = 0           # steps of dense indexer warm-up (KL to the main attention); then sparse
    indexer_weight: float = 1.0       # weight of the indexer KL
    eval_every: int = 50              # validation loss every N steps (and at the end)
    eval_batches: int = 4
    save_every: int = 50              # snapshot every N steps (and at the end)
    keep: int = 2                     # snapshots kept
    seed: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


@dataclass
class TrainConfig:
    """The whole pipeline: model, data, both stages, where it goes."""
    out: str = "runs/v4-2m-engram"
    preset: str = "v4-2m-engram"
    data: str | None = None           # None = the interpreter's standard library; a folder; or a .jsonl with "text"
    val_frac: float = 0.03
    device: str | None = None         # None = the accelerator if any, else the CPU
    dtype: str = "auto"               # compute dtype; auto = the faster training step (dsv4.train.autodtype)
    compile: str = "auto"             # torch.compile the blocks: on | off | auto (on where a compiler backend exists)
    init_seed: int = 0
    init: str | None = None           # a checkpoint directory to start from (its weights and tokenizer)
    time_budget: float | None = None  # seconds for the whole run; pretraining's steps are then measured to fit
    engram: dict | None = None        # Engram on the preset: {option: value} over engram_defaults (None = off)
    expert_parallel: int = 1          # with several processes: ranks that share each layer's routed experts
    activation_checkpointing: bool = False  # recompute each block's activations in the backward (less memory)
    pretrain: StageConfig = field(default_factory=StageConfig)
    longctx: StageConfig = field(default_factory=lambda: StageConfig(
        steps=0, batch_size=1, seq_len=8192, lr=1e-3, warmup=5, indexer_warmup=20, mtp_weight=0.0, eval_every=50,
        save_every=25, eval_batches=4))
    longctx_task_frac: float = 0.5    # share of long-context steps that train on synthetic retrieval tasks
    longctx_tasks: tuple[str, ...] = KINDS  # which of them (dsv4.data.tasks.KINDS)
    longctx_edge_frac: float = 0.2    # share of single-needle tasks with the needle at depth 0 or 1 (dsv4.data.tasks)
    sft: StageConfig = field(default_factory=lambda: StageConfig(steps=20, batch_size=8, seq_len=512, lr=1e-3,
                                                                 warmup=3, indexer_warmup=0, eval_every=25,
                                                                 save_every=25))

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
