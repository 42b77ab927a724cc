"""The dsv4 training pipeline: tokenizer -> token files -> pretraining -> fine-tuning -> a checkpoint directory.

    out/tokenizer.json                    byte-level BPE trained on the training split (reused when present)
    out/data/{train,val}.bin              memory-mapped token files (+ .json sidecars), reused when unchanged
    out/pretrain/step-*/                  snapshots (model, optimizer, RNG, data position), atomic and checksummed
    out/pretrain/metrics.jsonl            one JSON object per step; loss.png, lr.png, expert_load.png beside it
    out/longctx/...                       optional (--longctx-steps): long-context training at up to 8K tokens on the
                                          corpus mixed with synthetic retrieval tasks (dsv4.data.tasks), the indexer
                                          trained with its recipe (dense warm-up with KL, then sparse); between the two
    out/sft/...                           the same for fine-tuning (docstring -> function chat pairs)
    out/final/                            config.json + safetensors + tokenizer.json + plots: any dsv4 command loads it

Each stage is a `dsv4.train.trainer.Trainer` (optimizer steps, validation, snapshots, exact resume). Launched on
several processes (`dsv4 train --nproc N`, or torchrun), every rank runs this same pipeline on a model sharded by
dsv4.train.distributed: rank 0 prepares the tokenizer and token files first, times the dtype, writes the run's files
and exports `final` from the last (resharded) snapshot.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from dsv4.atomic import atomic_dir, atomic_text
from dsv4.config import ModelArgs
from dsv4.data.tasks import LongContextMix
from dsv4.device import can_compile, parse_device
from dsv4.model.transformer import Transformer
from dsv4.train.autodtype import training_dtype
from dsv4.train.budget import StepBudget
from dsv4.train.config import StageConfig, TrainConfig
from dsv4.train.snapshot import list_snapshots, load_latest
from dsv4.train.trainer import Batch, Trainer
from dsv4.weights.checkpoint import save_pretrained

DONE = "DONE"  # marker file in out/final once the whole pipeline has finished


def model_args(cfg: TrainConfig, tok) -> tuple[ModelArgs, object]:
    """The preset's ModelArgs, with Engram when the preset has it or --engram asks: its compressed vocabulary comes
    from the tokenizer (-> (args, the compression [vocab_size] or None))."""
    args = ModelArgs.from_name(cfg.preset)
    if cfg.engram is None and not args.engram:
        return args, None
    from dsv4.model.engram import compress_vocab

    lookup = compress_vocab(tok, args.vocab_size)
    return args.with_engram(**(cfg.engram or {}), compressed_vocab=int(lookup.max()) + 1), lookup


def model_builder(cfg: TrainConfig, tok, device: torch.device) -> tuple[ModelArgs, Callable[[], Transformer]]:
    """(the run's ModelArgs, a function that builds its freshly initialised fp32 model, Engram's vocabulary set)."""
    args, lookup = model_args(cfg, tok)

    def build() -> Transformer:
        model = build_model(args, device, cfg.init_seed)
        if lookup is not None:
            model.set_engram_vocab(lookup)
        return model

    return args, build


def build_model(args: ModelArgs, device: torch.device, seed: int) -> Transformer:
    """A freshly initialised fp32 model on `device` (built on meta, then materialised: no double allocation)."""
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights(seed=seed)
    model.init_rope()
    return model


# settings a resumed run may change: where it runs and how, not what it computes (the process count is not a setting:
# a sharded snapshot reshards)
RESUMABLE_CHANGES = ("out", "device", "compile", "expert_parallel", "activation_checkpointing")


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
                     and k not in RESUMABLE_CHANGES)
    if changed:
        raise ValueError(f"--resume with a different configuration ({', '.join(changed)} changed) would not continue "
                         f"the same run; use the original settings or another --out")


def prepare_data(cfg: TrainConfig, out: Path, vocab_size: int, progress: bool = True):
    """Tokenizer (trained once on the training split) and the train/val token files -> (tokenizer, train, val docs,
    train token file, val token file)."""
    from dsv4.data.corpus import load_corpus, read_doc, tokenize_corpus
    from dsv4.tokenizers.text import Tokenizer

    train_docs, val_docs = load_corpus(cfg.data, cfg.val_frac)
    if not train_docs or not val_docs:
        raise ValueError(f"the corpus split into {len(train_docs)} train and {len(val_docs)} val documents; "
                         f"both need at least one (more data or another --val-frac)")
    out.mkdir(parents=True, exist_ok=True)
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
    from dsv4.weights.checkpoint import from_pretrained

    model = from_pretrained(path, device=device, dtype=torch.float32)
    if model.args != args:
        raise ValueError(f"--init {path} is not a {args.n_layers}-layer model of this preset's shape; "
                         "continue it with the same --preset")
    return model


COMPILE_MIN_STEPS = 50  # --compile auto: a stage of fewer steps would spend more time compiling than it saves
COMPILE_MIN_BUDGET = 1800.0  # --compile auto with --time-budget: seconds from which compiling pays off (see below)
EAGER_OVER_COMPILED = 1.27  # eager / compiled seconds per training token of v4-3m (bf16, 16 x 256: 0.94 / 0.74 s)


def compile_enabled(setting: str, device: torch.device, dtype: torch.dtype, steps: int | None = None,
                    budget: float | None = None) -> bool:
    """--compile on|off|auto; auto = on for bf16 training on CUDA or on a CPU with a C++ compiler (inductor's CPU
    backend), for stages of at least COMPILE_MIN_STEPS steps or, sized by a time budget (`steps` None), of at least
    COMPILE_MIN_BUDGET seconds: a cold compile of v4-3m takes ~200 s on 2 cores and then saves 1 - 1/1.27 of each
    step, so it breaks even after ~15 min. Not auto in fp32: compiled, the routed experts run dense (grouped GEMM
    compiles only in bf16). A stage compiles its own graphs (fine-tuning's masked loss is another graph than
    pretraining's)."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"--compile must be auto, on or off, got {setting!r}")
    if setting != "auto":
        return setting == "on"
    long_enough = (budget or 0) >= COMPILE_MIN_BUDGET if steps is None else steps >= COMPILE_MIN_STEPS
    return dtype == torch.bfloat16 and can_compile(device) and long_enough


def pretrain_source(token_file: Path, stage: StageConfig):
    from dsv4.data.corpus import PackedDataset

    ds = PackedDataset(token_file, stage.seq_len)
    return lambda start: ds.batches(stage.batch_size, stage.seed, start)


def fixed_val(batches: Iterator[Batch], n: int) -> list[Batch]:
    return [next(batches) for _ in range(n)]


def stage_data(name: str, stage: StageConfig, cfg: TrainConfig, tok, docs: tuple, files: tuple[Path, Path]):
    """A stage's batch source (start -> batches, so that a resumed stage continues exactly) and its fixed validation
    batches: packed corpus windows (pretrain), windows mixed with retrieval tasks (longctx), or chat pairs (sft)."""
    from dsv4.data.corpus import PackedDataset, SFTDataset, docstring_pairs, load_tokens

    (train_docs, val_docs), (train_file, val_file) = docs, files
    if name == "pretrain":
        val = PackedDataset(val_file, stage.seq_len).batches(stage.batch_size, seed=1234)
        return pretrain_source(train_file, stage), fixed_val(val, stage.eval_batches)
    if name == "longctx":
        mix, val_mix = (LongContextMix(tok, load_tokens(f), stage.seq_len, cfg.longctx_task_frac, cfg.longctx_tasks,
                                       cfg.longctx_edge_frac) for f in (train_file, val_file))
        return (lambda start: mix.batches(stage.batch_size, stage.seed, start),
                fixed_val(val_mix.batches(stage.batch_size, seed=1234), stage.eval_batches))
    ds = SFTDataset(docstring_pairs(train_docs), tok, stage.seq_len, drop_long=True)
    try:
        val_ds = SFTDataset(docstring_pairs(val_docs), tok, stage.seq_len, drop_long=True)
    except ValueError:  # no held-out pair fits: validate on training pairs rather than not at all
        val_ds = ds
    return (lambda start: ds.batches(stage.batch_size, stage.seed, start),
            fixed_val(val_ds.batches(stage.batch_size, seed=1234), stage.eval_batches))


def check_budget(cfg: TrainConfig) -> None:
    if not cfg.time_budget:
        return
    if cfg.time_budget <= 0:
        raise ValueError(f"--time-budget must be positive, got {cfg.time_budget} s")
    pre = cfg.pretrain
    if pre.schedule == "cosine" and pre.warmup < 4:
        raise ValueError(f"--time-budget measures the step time during the warm-up, which needs >= 4 steps with the "
                         f"cosine schedule (--warmup {pre.warmup}); raise --warmup or use --schedule wsd")


def stage_budget(cfg: TrainConfig, name: str, stages: list, out: Path, started: float,
                 compiled: bool) -> StepBudget | None:
    """With --time-budget: pretraining's StepBudget, which keeps time for the stages after it (at pretraining's
    measured speed; a later stage too short to compile runs eagerly, slower per token when pretraining compiled)."""
    if not cfg.time_budget or name != "pretrain":
        return None
    stage = cfg.pretrain
    slower = EAGER_OVER_COMPILED if compiled else 1.0
    later = sum(s.steps * s.tokens_per_step * (1.0 if s.steps >= COMPILE_MIN_STEPS else slower)
                for n, s in stages if n != "pretrain")
    return StepBudget(deadline=started + cfg.time_budget, path=out / name / "budget.json",
                      tokens_per_step=stage.tokens_per_step, schedule=stage.schedule, warmup=stage.warmup,
                      decay_frac=stage.decay_frac, reserve_tokens=later)


def throughput(last: dict, args: ModelArgs, train_file: Path) -> str:
    """What pretraining saw: tokens, epochs of the corpus, tokens/s, tokens per (active) parameter."""
    from dsv4.data.corpus import load_tokens
    from dsv4.weights.info import Count, count_params, meta_model

    main = sum(count_params(meta_model(args))["main"].values(), Count())
    seen, corpus = last.get("tokens", 0), len(load_tokens(train_file))
    return (f"pretrain: {seen / 1e6:.2f}M tokens seen ({seen / corpus:.2f} epochs of {corpus / 1e6:.2f}M), "
            f"{last.get('tok_per_s', 0):.0f} tokens/s, {seen / main.total:.2f} tokens per parameter "
            f"({seen / main.active:.1f} per active parameter; {main.total / 1e6:.1f}M total, "
            f"{main.active / 1e6:.1f}M active without MTP)")


def run(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run (or continue, or reuse) the whole pipeline; returns the final checkpoint directory."""
    out = Path(cfg.out)
    final = out / "final"
    if (final / DONE).exists():
        if resume:
            print(f"{final} is complete; reusing it (delete it or choose another --out to train again)")
            return final
        raise ValueError(f"{out} already holds a finished run; pass --resume to reuse it or choose another --out")
    started = time.monotonic()
    stages = [(name, getattr(cfg, name)) for name in TrainConfig.STAGES
              if getattr(cfg, name).steps > 0 or (name == "pretrain" and cfg.time_budget)]
    check_budget(cfg)
    if not stages and not cfg.init:
        raise ValueError("every stage has 0 steps: nothing to train (--steps, --longctx-steps, --sft-steps)")
    from dsv4.train import distributed

    d = distributed.init(cfg.device, cfg.expert_parallel)
    main = d is None or d.main
    progress = progress and main
    device = d.device if d is not None else parse_device(cfg.device)
    tok, train_docs, val_docs, train_file, val_file = begin(cfg, out, resume, stages, d, progress)
    meta = {"train_config": cfg.to_dict(), "tokenizer_hash": tok.hash()}

    args, build = model_builder(cfg, tok, device)  # (Engram's vocabulary from the tokenizer)
    dtype = training_dtype(cfg.dtype, device, build, stages[0][1] if stages else cfg.pretrain, out / "dtype.json",
                           budgeted=bool(cfg.time_budget), progress=progress) if main else None
    if d is not None:
        dtype = d.broadcast(dtype)  # rank 0 timed it

    def plain(weights: dict | None = None) -> Transformer:
        model = build()
        if weights is not None:
            model.load_state_dict(weights)
        return model

    def fresh(weights: dict | None = None) -> Transformer:
        """A model for a stage: built, given `weights`, and sharded in a distributed run."""
        model = plain(weights)
        if d is not None:
            return distributed.parallelize(model, d, dtype, cfg.activation_checkpointing)
        if cfg.activation_checkpointing:
            distributed.checkpoint_blocks(model)
        return model

    start = initial_weights(cfg.init, args, device).state_dict() if cfg.init else None
    model = fresh(start) if stages else plain(start)
    for i, (name, stage) in enumerate(stages):
        batches, val = stage_data(name, stage, cfg, tok, (train_docs, val_docs), (train_file, val_file))
        trainer = Trainer(model, stage, out / name, batches, val, dtype, meta=meta, progress=progress, desc=name,
                          dist=d)
        trainer.resume()
        budgeted = bool(cfg.time_budget) and name == "pretrain"
        use_compile = compile_enabled(cfg.compile, device, dtype, steps=None if budgeted else stage.steps,
                                      budget=cfg.time_budget if budgeted else None)
        budget = stage_budget(cfg, name, stages, out, started, use_compile)
        if use_compile and (budget or trainer.step < stage.steps):
            trainer.compile()
        if progress:
            announce(trainer, cfg, dtype, d, bool(budget), use_compile)
        last = trainer.fit(budget)
        if progress and last:
            print(f"{name}: step {last.get('step')} train ce {last.get('ce', float('nan')):.4f} "
                  f"val {last.get('val_loss', float('nan')):.4f}", flush=True)
            if name == "pretrain":
                print(throughput(last, args, train_file), flush=True)
        # the next stage (and `final`) starts from this one's final weights at full precision (read whole)
        if i + 1 < len(stages) or main:
            weights = load_latest(out / name)["model"]
            model = fresh(weights) if i + 1 < len(stages) else plain(weights)
    if main:
        export(model, out, dtype, tok, stages, cfg, final)
    if d is not None:
        d.barrier()
    return final


def begin(cfg: TrainConfig, out: Path, resume: bool, stages: list, d, progress: bool):
    """Check the run directory and write its config (rank 0, once every rank has checked), then the tokenizer and
    token files (rank 0 first; the others read what it wrote) -> prepare_data's result."""
    main = d is None or d.main
    _check_resume(out, cfg, resume)
    if d is not None:
        d.barrier()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_text(out / "train_config.json", json.dumps(cfg.to_dict(), indent=1))
    args = ModelArgs.from_name(cfg.preset)
    seq = max((stage.seq_len for _, stage in stages), default=0)
    if seq > args.max_seq_len:
        raise ValueError(f"seq_len {seq} exceeds the {cfg.preset} preset's max_seq_len {args.max_seq_len}")
    if d is not None and not main:
        d.barrier()
    data = prepare_data(cfg, out, args.vocab_size, progress)
    if d is not None and main:
        d.barrier()
    return data


def announce(trainer: Trainer, cfg: TrainConfig, dtype: torch.dtype, d, budgeted: bool, compiled: bool) -> None:
    """The line a stage starts with: the model, where it runs, how many steps of how many tokens."""
    stage = trainer.cfg
    n = sum(p.numel() for p in dict.fromkeys(trainer.model.parameters()))
    steps = f"steps sized to end {cfg.time_budget / 60:.1f} min after the start" if budgeted else f"{stage.steps} steps"
    ranks = f" x {d.world} processes" + (f", experts over {d.ep}" if d.ep > 1 else "") if d else ""
    print(f"{trainer.desc}: {cfg.preset} ({n / 1e6:.1f}M parameters, {str(dtype).removeprefix('torch.')} on "
          f"{trainer.device.type}{ranks}), {steps} x {stage.tokens_per_step} tokens"
          + (f", resuming at step {trainer.step}" if trainer.step else "")
          + (" (compiled: the first steps include compilation)" if compiled else ""), flush=True)


def export(model: Transformer, out: Path, dtype: torch.dtype, tok, stages: list, cfg: TrainConfig, final: Path):
    """Write `final`: the model in its compute dtype, the tokenizer, the stages' plots, the config."""
    from dsv4.train.plots import plot_run

    model.to_dtype(dtype)
    with atomic_dir(final) as tmp:
        tmp = Path(tmp)
        save_pretrained(model, tmp)
        tok.save(tmp / "tokenizer.json")
        for name, _ in stages:
            for png in plot_run(out / name / "metrics.jsonl", out / name):
                shutil.copy(png, tmp / f"{name}_{Path(png).name}")
        (tmp / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        (tmp / DONE).write_text("")
