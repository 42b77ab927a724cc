"""The `dsv4` command. One flat subcommand per job; each is an `add_<name>(subparsers)` function that declares its
options and sets `run`, so a new command is one function plus one entry in COMMANDS.

    dsv4 info --preset v4-flash [--json]        parameters, FLOPs per token and cache bytes of a configuration
    dsv4 info --ckpt DIR                        the same for a checkpoint's config.json, plus its stored tensors
    dsv4 train [--preset small --out runs/small] tokenizer, pretraining, fine-tuning -> OUT/final (see dsv4.train)
    dsv4 eval --ckpt DIR [--humaneval]          held-out bits-per-byte vs a bigram, sample completions, HumanEval
"""

import argparse
import json
import sys
import time

from dsv4.config import PRESETS
from dsv4.device import tune_cpu_allocator


def add_info(subparsers):
    p = subparsers.add_parser("info", help="parameters (total/active), FLOPs per token and cache bytes",
                              description="Count a configuration on the meta device (nothing is allocated).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=list(PRESETS), help="a named configuration")
    source.add_argument("--ckpt", metavar="DIR", help="a checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--context", type=int, nargs="+", default=[131072, 1048576], metavar="TOKENS",
                   help="context lengths for FLOPs and cache (default: 128K 1M)")
    p.add_argument("--cache-dtype", default="bf16", help="dtype of the attention cache (default: bf16)")
    p.set_defaults(run=run_info)


def run_info(opts) -> int:
    from dsv4 import info
    from dsv4.config import ModelArgs
    from dsv4.device import resolve_dtype

    if opts.preset:
        args, title = ModelArgs.from_name(opts.preset), opts.preset
    else:
        from dsv4.checkpoint import read_config

        args, title = read_config(opts.ckpt)[0], opts.ckpt
    report = info.model_info(args, contexts=opts.context, cache_dtype=resolve_dtype(opts.cache_dtype))
    report = {"name": title, **report}
    if opts.ckpt:
        report["checkpoint"] = {"path": opts.ckpt, **info.checkpoint_tensors(opts.ckpt)}
    print(json.dumps(report, indent=2) if opts.json else info.format_table(report, title))
    return 0


def add_train(subparsers):
    from dsv4.train import StageConfig, TrainConfig

    d, pre, sft = TrainConfig(), StageConfig(), TrainConfig().sft
    p = subparsers.add_parser("train", help="train a tokenizer and pretrain + fine-tune a model (one command)",
                              description="Train the byte-level BPE tokenizer, pretrain on the corpus, fine-tune on "
                              "docstring -> function chat pairs, and write OUT/final (config.json, safetensors, "
                              "tokenizer.json, plots). Snapshots go to OUT/pretrain and OUT/sft; --resume continues "
                              "exactly where a killed run stopped, and reuses a finished one.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default=d.preset, choices=list(PRESETS))
    p.add_argument("--out", default=d.out, help="run directory")
    p.add_argument("--data", default=d.data, help="folder of text/code files or .jsonl with a 'text' field "
                   "(default: this Python's standard library)")
    p.add_argument("--val-frac", type=float, default=d.val_frac, help="share of files held out for validation")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps, ... (default: the accelerator if any)")
    p.add_argument("--dtype", default=d.dtype, help="compute dtype: auto (bf16 where fast), bf16, fp32")
    p.add_argument("--compile", default=d.compile, choices=("auto", "on", "off"),
                   help="torch.compile the blocks (about 2x faster steps after a minute or two of compiling; "
                        "auto = where a compiler backend exists)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (or reuse it when finished)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("pretraining")
    g.add_argument("--steps", type=int, default=pre.steps)
    g.add_argument("--batch-size", type=int, default=pre.batch_size, help="sequences per micro-batch")
    g.add_argument("--grad-accum", type=int, default=pre.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--seq-len", type=int, default=pre.seq_len)
    g.add_argument("--optimizer", default=pre.optimizer, choices=("muon", "adamw"))
    g.add_argument("--lr", type=float, default=pre.lr, help="peak learning rate (AdamW and Muon)")
    g.add_argument("--weight-decay", type=float, default=pre.weight_decay)
    g.add_argument("--warmup", type=int, default=pre.warmup, help="warm-up steps")
    g.add_argument("--schedule", default=pre.schedule, choices=("cosine", "wsd"))
    g.add_argument("--clip", type=float, default=pre.clip, help="max gradient norm (0 = off)")
    g.add_argument("--gamma", type=float, default=pre.balance_gamma, help="aux-loss-free balancing bias step")
    g.add_argument("--aux-alpha", type=float, default=pre.aux_alpha, help="sequence-wise balance loss weight")
    g.add_argument("--mtp-weight", type=float, default=pre.mtp_weight, help="MTP loss weight lambda (0 = off)")
    g.add_argument("--indexer-warmup", type=int, default=pre.indexer_warmup,
                   help="steps of dense lightning-indexer warm-up before sparse attention")
    g.add_argument("--eval-every", type=int, default=pre.eval_every)
    g.add_argument("--save-every", type=int, default=pre.save_every)
    g.add_argument("--seed", type=int, default=pre.seed)
    g = p.add_argument_group("fine-tuning (docstring -> function chat pairs, loss on answers)")
    g.add_argument("--sft-steps", type=int, default=sft.steps, help="0 = no fine-tuning")
    g.add_argument("--sft-lr", type=float, default=sft.lr)
    g.add_argument("--sft-batch-size", type=int, default=sft.batch_size)
    g.add_argument("--sft-seq-len", type=int, default=sft.seq_len)
    p.set_defaults(run=run_train)


def train_config(opts):
    """The TrainConfig the `train` options describe."""
    import dataclasses

    from dsv4.train import TrainConfig

    d = TrainConfig()
    shared = dict(optimizer=opts.optimizer, weight_decay=opts.weight_decay, clip=opts.clip,
                  balance_gamma=opts.gamma, aux_alpha=opts.aux_alpha, mtp_weight=opts.mtp_weight,
                  eval_every=opts.eval_every, save_every=opts.save_every, seed=opts.seed)
    pretrain = dataclasses.replace(d.pretrain, steps=opts.steps, batch_size=opts.batch_size,
                                   grad_accum=opts.grad_accum, seq_len=opts.seq_len, lr=opts.lr,
                                   warmup=opts.warmup, schedule=opts.schedule,
                                   indexer_warmup=opts.indexer_warmup, **shared)
    sft = dataclasses.replace(d.sft, steps=opts.sft_steps, lr=opts.sft_lr, batch_size=opts.sft_batch_size,
                              seq_len=opts.sft_seq_len, grad_accum=opts.grad_accum, **shared)
    return TrainConfig(out=opts.out, preset=opts.preset, data=opts.data, val_frac=opts.val_frac, device=opts.device,
                       dtype=opts.dtype, compile=opts.compile, pretrain=pretrain, sft=sft)


def run_train(opts) -> int:
    from dsv4 import train

    start = time.perf_counter()
    try:
        final = train.run(train_config(opts), resume=opts.resume, progress=not opts.quiet)
    except KeyboardInterrupt:
        return 130
    print(f"checkpoint: {final}  ({time.perf_counter() - start:.0f} s)")
    return 0


def add_eval(subparsers):
    p = subparsers.add_parser("eval", help="held-out bits-per-byte, sample completions, HumanEval",
                              description="Evaluate a checkpoint directory (config.json, safetensors, "
                              "tokenizer.json): bits-per-byte on the held-out split it was trained with, next to a "
                              "Kneser-Ney bigram fit on the train split; greedy completions of a few prompts; "
                              "with --humaneval, greedy pass@1 on the 164 HumanEval problems, each candidate run in "
                              "a sandboxed process (time, memory, no network).",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, metavar="DIR")
    p.add_argument("--data", default=None, help="corpus for bpb (default: the one the checkpoint was trained on)")
    p.add_argument("--val-frac", type=float, default=None, help="(default: the checkpoint's)")
    p.add_argument("--seq-len", type=int, default=None, help="bpb window (default: the pretraining seq-len)")
    p.add_argument("--max-tokens", type=int, default=65536, help="held-out tokens scored (0 = all)")
    p.add_argument("--no-bpb", action="store_true")
    p.add_argument("--no-samples", action="store_true")
    p.add_argument("--humaneval", action="store_true", help="run HumanEval (slow without the inference engine)")
    p.add_argument("--humaneval-limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--max-new-tokens", type=int, default=128, help="HumanEval completion budget")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON here")
    p.set_defaults(run=run_eval)


def run_eval(opts) -> int:
    from pathlib import Path

    import torch

    from dsv4.device import default_device, resolve_dtype
    from dsv4.eval import run as ev

    device = torch.device(opts.device) if opts.device else default_device()
    model, tok, cfg = ev.load(opts.ckpt, device, resolve_dtype(opts.dtype, device))
    report: dict = {"ckpt": opts.ckpt}
    if not opts.no_bpb:
        data = opts.data if opts.data is not None else (cfg.data if cfg else None)
        val_frac = opts.val_frac or (cfg.val_frac if cfg else 0.03)
        seq_len = opts.seq_len or (cfg.pretrain.seq_len if cfg else 512)
        cache = Path(opts.ckpt).parent / "data" if cfg and opts.data is None else None
        r = ev.heldout_bpb(model, tok, data, val_frac, seq_len, opts.max_tokens or None, cache)
        report["bpb"] = r
        print(f"held-out bits per byte: {r['bpb']:.4f}   (bigram baseline {r['bigram_bpb']:.4f}; "
              f"{r['val_tokens']} tokens, {r['val_bytes']} bytes of {r['val_files']} files never trained on)")
    if not opts.no_samples:
        report["samples"] = ev.sample_completions(model, tok)
        for s in report["samples"]:
            print(f"\n----- {s['mode']}: {s['prompt']!r}\n{s['prompt'] if s['mode'] == 'raw' else ''}"
                  f"{s['completion']}")
    if opts.humaneval:
        r = ev.humaneval(model, tok, opts.max_new_tokens, opts.humaneval_limit)
        report["humaneval"] = r
        print(f"\nHumanEval pass@1 (greedy): {r['pass@1']:.4f}  ({r['passed']}/{r['problems']})")
    if opts.json:
        from dsv4.data import atomic_write

        atomic_write(Path(opts.json), lambda f: f.write(json.dumps(report, indent=1).encode()))
    return 0


COMMANDS = (add_info, add_train, add_eval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 in plain PyTorch")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    opts = parser.parse_args(argv)
    tune_cpu_allocator()  # process-wide, so here at the entry point and never inside the library
    try:
        return opts.run(opts)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:  # bad config or path: one line, not a traceback
        print(f"dsv4 {opts.command}: error: {e}", file=sys.stderr)
        return 2
