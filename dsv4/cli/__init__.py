"""The `dsv4` command. One flat subcommand per job; each is an `add_<name>(subparsers)` function that declares its
options and sets `run`, which calls one package function, so a new command is one function plus one entry in COMMANDS.

    dsv4 info --preset v4-flash [--json]        parameters, FLOPs per token and cache bytes of a configuration
    dsv4 info --ckpt DIR                        the same for a checkpoint's config.json, plus its stored tensors
                                                (dsv4.weights.info.describe)
    dsv4 train [--preset v4-2m --time-budget 10m] tokenizer, pretraining, fine-tuning -> runs/PRESET/final
    dsv4 eval --ckpt DIR [--humaneval] [--niah] held-out bits-per-byte vs a bigram, sample completions, HumanEval,
                                                needle-in-a-haystack retrieval heat map (dsv4.eval.run.evaluate)
    dsv4 generate --ckpt DIR "prompt"           stream a continuation to stdout (the inference engine); long prompts
                                                with --prompt-file, a whole source tree with --context-dir
                                                (dsv4.engine.generate)
    dsv4 chat --ckpt DIR                        terminal chat: history, chat template, streaming, /reset
                                                (dsv4.engine.chat)
    dsv4 serve --ckpt DIR                       the OpenAI-compatible API and the web chat page (dsv4.serve.lifecycle)
    dsv4 engram --ckpt DIR --text TEXT [--json] the Engram memory rows a text reads (dsv4.weights.engram)
    dsv4 pixels [--out DIR --time-budget 5m]    the pixel tokenizer: images/clips <-> FSQ codes (dsv4.train.pixels)
    dsv4 multimodal [--time-budget 45m]         one model on text, images and clips (dsv4.train.multimodal)
    dsv4 image|video|animate --ckpt DIR ...     images and clips from a multimodal checkpoint (dsv4.engine.visual)
    dsv4 quantize --ckpt DIR --to int8 -o OUT   a copy kept quantized in memory: int8, int4, fp8, fp4
                                                (dsv4.weights.convert)
"""

import argparse
import os
import sys
import time

from dsv4.config import PRESETS
from dsv4.data.tasks import KINDS
from dsv4.device import tune_cpu_allocator

DEFAULT_BUDGET = "10m"  # `dsv4 train` without --steps or --time-budget: what `make run` trains


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
    from dsv4.weights.info import describe

    print(describe(preset=opts.preset, ckpt=opts.ckpt, contexts=opts.context, cache_dtype=opts.cache_dtype,
                   as_json=opts.json))
    return 0


def add_train(subparsers):
    from dsv4.train.config import StageConfig, TrainConfig

    d, pre, sft = TrainConfig(), StageConfig(), TrainConfig().sft
    p = subparsers.add_parser("train", help="train a tokenizer and pretrain + fine-tune a model (one command)",
                              description="Train the byte-level BPE tokenizer, pretrain on the corpus, fine-tune on "
                              "docstring -> function chat pairs, and write OUT/final (config.json, safetensors, "
                              "tokenizer.json, plots). Snapshots go to OUT/pretrain and OUT/sft; --resume continues "
                              "exactly where a killed run stopped, and reuses a finished one.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default=d.preset, choices=list(PRESETS))
    p.add_argument("--out", default=None, help="run directory (default: runs/PRESET)")
    p.add_argument("--data", default=d.data, help="folder of text/code files or .jsonl with a 'text' field "
                   "(default: this Python's standard library)")
    p.add_argument("--val-frac", type=float, default=d.val_frac, help="share of files held out for validation")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps, ... (default: the accelerator if any)")
    p.add_argument("--dtype", default=d.dtype,
                   help="compute dtype: auto (where bf16 is native, the faster of a few timed bf16 and fp32 steps), "
                        "bf16, fp32")
    p.add_argument("--compile", default=d.compile, choices=("auto", "on", "off"),
                   help="torch.compile the blocks (about 2x faster steps after a minute or two of compiling; "
                        "auto = where a compiler backend exists)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (or reuse it when finished)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_parallel_options(p)
    g = p.add_argument_group("pretraining")
    g.add_argument("--steps", type=int, default=None,
                   help="a fixed number of optimizer steps, for exact reproduction (instead of --time-budget)")
    g.add_argument("--time-budget", metavar="DURATION", default=None,
                   help=f"end the whole run in this time (10m, 90s, 1h30m): pretraining's steps and schedule are "
                        f"measured to fit after its first steps on this machine (default {DEFAULT_BUDGET} unless "
                        f"--steps)")
    g.add_argument("--batch-size", type=int, default=pre.batch_size, help="sequences per micro-batch")
    g.add_argument("--grad-accum", type=int, default=pre.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--seq-len", type=int, default=pre.seq_len)
    g.add_argument("--optimizer", default=pre.optimizer, choices=("muon", "adamw"))
    g.add_argument("--lr", type=float, default=pre.lr, help="peak learning rate (AdamW, and Muon unless --muon-lr)")
    g.add_argument("--muon-lr", type=float, default=pre.muon_lr, help="Muon's peak learning rate (hidden matrices)")
    g.add_argument("--memory-lr", type=float, default=pre.memory_lr,
                   help="peak learning rate of Engram's tables (default: --lr)")
    g.add_argument("--weight-decay", type=float, default=pre.weight_decay)
    g.add_argument("--warmup", type=int, default=pre.warmup, help="warm-up steps")
    g.add_argument("--schedule", default=pre.schedule, choices=("cosine", "wsd"))
    g.add_argument("--decay-frac", type=float, default=pre.decay_frac,
                   help="wsd: the share of the steps over which the lr decays")
    g.add_argument("--clip", type=float, default=pre.clip, help="max gradient norm (0 = off)")
    g.add_argument("--gamma", type=float, default=pre.balance_gamma, help="aux-loss-free balancing bias step")
    g.add_argument("--aux-alpha", type=float, default=pre.aux_alpha, help="sequence-wise balance loss weight")
    g.add_argument("--mtp-weight", type=float, default=pre.mtp_weight, help="MTP loss weight lambda (0 = off)")
    g.add_argument("--indexer-warmup", type=int, default=pre.indexer_warmup,
                   help="steps of dense lightning-indexer warm-up before sparse attention")
    g.add_argument("--eval-every", type=int, default=pre.eval_every)
    g.add_argument("--save-every", type=int, default=pre.save_every)
    g.add_argument("--seed", type=int, default=pre.seed)
    g.add_argument("--init", metavar="CKPT", help="start from this checkpoint's weights and tokenizer (e.g. to "
                   "add long-context training to a finished run: --init runs/small/final --steps 0 --sft-steps 0 "
                   "--longctx-steps 300)")
    lc = d.longctx
    g = p.add_argument_group("long-context training (corpus windows mixed with synthetic retrieval tasks; the indexer "
                             "warms up dense with its KL loss, then trains sparse)")
    g.add_argument("--longctx-steps", type=int, default=lc.steps, help="0 = no long-context stage")
    g.add_argument("--longctx-seq-len", type=int, default=lc.seq_len)
    g.add_argument("--longctx-batch-size", type=int, default=lc.batch_size)
    g.add_argument("--longctx-lr", type=float, default=lc.lr)
    g.add_argument("--longctx-indexer-warmup", type=int, default=lc.indexer_warmup,
                   help="dense indexer warm-up steps before sparse training")
    g.add_argument("--longctx-task-frac", type=float, default=d.longctx_task_frac,
                   help="share of steps on synthetic tasks (pass key, key-value lookup, multi-needle, recall, copy)")
    g.add_argument("--longctx-tasks", nargs="+", default=list(d.longctx_tasks), choices=KINDS, metavar="TASK",
                   help=f"which synthetic tasks ({', '.join(KINDS)}; dsv4/tasks.py describes each)")
    g.add_argument("--longctx-edge-frac", type=float, default=d.longctx_edge_frac,
                   help="share of pass-key / recall / copy samples with the needle at an edge (depth 0 or 1) rather "
                        "than uniform")
    g = p.add_argument_group("fine-tuning (docstring -> function chat pairs, loss on answers)")
    g.add_argument("--sft-steps", type=int, default=sft.steps, help="0 = no fine-tuning")
    g.add_argument("--sft-lr", type=float, default=sft.lr)
    g.add_argument("--sft-batch-size", type=int, default=sft.batch_size)
    g.add_argument("--sft-seq-len", type=int, default=sft.seq_len)
    add_engram_options(p)
    p.set_defaults(run=run_train)


def add_parallel_options(p):
    g = p.add_argument_group("several processes (FSDP2 + expert parallelism; docs/scaling.md; several machines: "
                             "torchrun -m dsv4 train ...)")
    g.add_argument("--nproc", type=int, default=1, help="processes on this machine (one per accelerator; on the "
                   "CPU they share the cores); the global batch is the same as one process's")
    g.add_argument("--expert-parallel", type=int, default=1, metavar="E",
                   help="spread each layer's routed experts over E ranks (all-to-all dispatch); divides --nproc")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward (less memory, ~1/3 more compute)")


def add_engram_options(p):
    g = p.add_argument_group("Engram conditional memory (hashed n-gram tables read before attention; off unless "
                             "--engram; each option's default fits the preset: dsv4.config.engram_defaults)")
    g.add_argument("--engram", action="store_true", help="add Engram to the preset")
    g.add_argument("--engram-layers", type=int, nargs="+", metavar="LAYER",
                   help="main layers that read the memory (default: the second, and one a third down in deep models)")
    g.add_argument("--engram-max-ngram", type=int, help="n-gram orders 2..N (default 3)")
    g.add_argument("--engram-heads", type=int, help="hash heads (tables) per order (default 4, 8 from dim 512)")
    g.add_argument("--engram-vocab", type=int, nargs="+", metavar="ROWS",
                   help="rows per head for each order, or one number for every order (default 5x the vocabulary)")
    g.add_argument("--engram-dim", type=int, help="width per order, split over its heads (default half the model's)")
    g.add_argument("--engram-seed", type=int, help="seed of the hash multipliers (default 0)")
    g.add_argument("--engram-conv", action=argparse.BooleanOptionalAction, default=None,
                   help="the paper's causal short convolution (default on; V4.1 ships without it)")


ENGRAM_OPTIONS = ("layers", "max_ngram", "heads", "vocab", "dim", "seed", "conv")


def engram_options(opts) -> dict | None:
    """--engram and its options -> TrainConfig.engram (None: off; the options given, the rest default)."""
    given = {k: getattr(opts, f"engram_{k}") for k in ENGRAM_OPTIONS if getattr(opts, f"engram_{k}") is not None}
    if given and not opts.engram:
        flags = ", ".join(f"--engram-{k.replace('_', '-')}" for k in given)
        raise ValueError(f"{flags} configure Engram, which is off: add --engram")
    return given if opts.engram else None


def train_config(opts):
    """The TrainConfig the `train` options describe."""
    import dataclasses

    from dsv4.train.budget import parse_duration
    from dsv4.train.config import TrainConfig

    if opts.steps is not None and opts.time_budget is not None:
        raise ValueError("give --steps (a fixed number of steps) or --time-budget (steps that fit the time), not both")
    budget = DEFAULT_BUDGET if opts.steps is None and opts.time_budget is None else opts.time_budget
    d = TrainConfig()
    shared = dict(optimizer=opts.optimizer, weight_decay=opts.weight_decay, clip=opts.clip,
                  balance_gamma=opts.gamma, aux_alpha=opts.aux_alpha, mtp_weight=opts.mtp_weight,
                  eval_every=opts.eval_every, save_every=opts.save_every, seed=opts.seed)
    pretrain = dataclasses.replace(d.pretrain, steps=0 if budget else opts.steps, batch_size=opts.batch_size,
                                   grad_accum=opts.grad_accum, seq_len=opts.seq_len, lr=opts.lr,
                                   muon_lr=opts.muon_lr, memory_lr=opts.memory_lr, warmup=opts.warmup,
                                   schedule=opts.schedule, decay_frac=opts.decay_frac,
                                   indexer_warmup=opts.indexer_warmup, **shared)
    sft = dataclasses.replace(d.sft, steps=opts.sft_steps, lr=opts.sft_lr, batch_size=opts.sft_batch_size,
                              seq_len=opts.sft_seq_len, grad_accum=opts.grad_accum, **shared)
    longctx = dataclasses.replace(d.longctx, steps=opts.longctx_steps, seq_len=opts.longctx_seq_len,
                                  batch_size=opts.longctx_batch_size, lr=opts.longctx_lr,
                                  indexer_warmup=opts.longctx_indexer_warmup, grad_accum=opts.grad_accum,
                                  **{**shared, "mtp_weight": 0.0})  # the MTP module is left as it was
    return TrainConfig(time_budget=parse_duration(budget) if budget else None,
                       out=opts.out or f"runs/{opts.preset}", preset=opts.preset, data=opts.data,
                       val_frac=opts.val_frac, device=opts.device,
                       dtype=opts.dtype, compile=opts.compile, init=opts.init, pretrain=pretrain, longctx=longctx,
                       longctx_task_frac=opts.longctx_task_frac, longctx_tasks=tuple(opts.longctx_tasks),
                       longctx_edge_frac=opts.longctx_edge_frac, sft=sft, engram=engram_options(opts),
                       expert_parallel=opts.expert_parallel, activation_checkpointing=opts.activation_checkpointing)


def run_train(opts) -> int:
    from dsv4.train import distributed
    from dsv4.train import pipeline as train

    cfg = train_config(opts)  # (checked before any process starts)
    if opts.nproc > 1 and distributed.world_size() == 1:
        from dsv4.train.launch import launch

        if opts.nproc % cfg.expert_parallel:
            raise ValueError(f"--expert-parallel {cfg.expert_parallel} must divide --nproc {opts.nproc}")
        return launch(opts.nproc, opts.argv)
    start = time.perf_counter()
    try:
        final = train.run(cfg, resume=opts.resume, progress=not opts.quiet)
    except KeyboardInterrupt:
        return 130
    finally:
        distributed.shutdown()
    if distributed.world_size() == 1 or int(os.environ.get("RANK", "0")) == 0:
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
    p.add_argument("--stride", type=int, default=None,
                   help="bpb windows start every STRIDE tokens (default: half the window, so every token after the "
                   "first window is read with at least half a window of context; = --seq-len: back to back)")
    p.add_argument("--max-tokens", type=int, default=0,
                   help="score only the first N held-out tokens (0 = all: the same bytes whatever the vocabulary)")
    p.add_argument("--no-bpb", action="store_true")
    p.add_argument("--no-samples", action="store_true")
    p.add_argument("--humaneval", action="store_true",
                   help="run HumanEval (164 problems, about a minute on 2 cores for `small`)")
    p.add_argument("--humaneval-limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--niah", action="store_true", help="needle in a haystack: pass-key retrieval over context "
                   "lengths x needle depths, haystacks of held-out text -> niah.json + niah.png (heat map)")
    p.add_argument("--niah-lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536,
                                                                     131072], metavar="TOKENS")
    p.add_argument("--niah-depths", type=int, default=5, help="needle depths, evenly spaced from 0%% to 100%%")
    p.add_argument("--niah-samples", type=int, default=2, help="prompts per (length, depth) cell")
    p.add_argument("--niah-seed", type=int, default=0,
                   help="draws the keys and haystacks (another seed: other prompts)")
    p.add_argument("--niah-out", metavar="DIR", help="where niah.json / niah.png go (default: the checkpoint)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="HumanEval completion budget")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON here")
    p.set_defaults(run=run_eval)


def run_eval(opts) -> int:
    from dsv4.eval.run import evaluate

    evaluate(opts.ckpt, data=opts.data, val_frac=opts.val_frac, seq_len=opts.seq_len, stride=opts.stride,
             max_tokens=opts.max_tokens, bpb=not opts.no_bpb, samples=not opts.no_samples, humaneval=opts.humaneval,
             humaneval_limit=opts.humaneval_limit, max_new_tokens=opts.max_new_tokens, niah=opts.niah,
             niah_lengths=opts.niah_lengths, niah_depths=opts.niah_depths, niah_samples=opts.niah_samples,
             niah_seed=opts.niah_seed, niah_out=opts.niah_out, device=opts.device, dtype=opts.dtype,
             json_path=opts.json)
    return 0


def add_engine_args(p, max_len_help: str):
    """Options shared by generate, chat and serve: the checkpoint and the engine."""
    p.add_argument("--ckpt", required=True, metavar="DIR", help="checkpoint directory (config.json, *.safetensors, "
                   "tokenizer.json): ours, one written by transformers, or the released V4 layout")
    p.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=None,
                   help="MTP speculative decoding when the model has an MTP module (default: on when not compiling; "
                        "compiled plain steps are so cheap that a draft + verify round costs about two of them)")
    p.add_argument("--max-len", type=int, default=None, help=max_len_help)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="decode steps through torch.compile: ~5x faster tokens after a first-use compile of a minute "
                        "or two, cached on disk (default: on where torch.compile has a backend here, e.g. a C++ "
                        "compiler on the CPU; --no-compile: the eager steps, no compile)")
    p.add_argument("--cpp-wrapper", action="store_true", help="with --compile: also inductor's C++ wrapper "
                   "(~10%% faster steps for about twice the compile time)")
    p.add_argument("--device", default=None)
    p.add_argument("--device-map", metavar="auto|PATH|JSON", default=None,
                   help="place parts of the model on different devices instead of --device (routed experts in host "
                        "RAM computing on the CPU, layers split over cards): auto (the placement `dsv4 plan` finds "
                        "for this machine's free memory, printed to stderr), a JSON file (a map, or a `dsv4 plan "
                        "--json` report), or the map itself, e.g. '{\"\": \"accel:0\", \"layers.*.ffn.experts\": "
                        "\"cpu\"}' (dsv4.weights.placement)")
    p.add_argument("--dtype", default="auto", help="compute dtype (auto: the fastest this device has)")
    p.add_argument("--prefix-cache-gb", type=float, default=1.0, metavar="GB",
                   help="keep the state of served prompts and answers (within this many GiB, least recently used "
                        "evicted) and start a prompt that shares a prefix with one from it: a chat's next turn "
                        "prefills only the new message; 0 = off")


def add_sampling(p, temperature: float):
    """Options shared by generate and chat: the engine and the sampling settings."""
    add_engine_args(p, "context length to allocate the cache for (default: prompt + max new tokens for generate, "
                       "8192 for chat)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    add_sampling_flags(p, temperature)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")


def add_sampling_flags(p, temperature: float):
    """The sampling settings every generation command takes (sampling_params reads them back)."""
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="reproducible sampling")


def sampling_params(opts):
    from dsv4.engine.sampling import SamplingParams

    return SamplingParams(temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k, min_p=opts.min_p,
                          repetition_penalty=opts.repetition_penalty, seed=opts.seed)


def engine_options(opts) -> dict:
    """The keywords add_engine_args' options give dsv4.engine.load (and the commands that open an engine)."""
    if opts.prefix_cache_gb < 0:
        raise SystemExit(f"--prefix-cache-gb must be >= 0, got {opts.prefix_cache_gb}")
    return dict(max_len=opts.max_len, device=opts.device, dtype=opts.dtype, speculative=opts.speculative,
                compile=("auto" if opts.compile is None else "max" if opts.compile and opts.cpp_wrapper
                         else opts.compile), device_map=opts.device_map,
                prefix_cache_gb=opts.prefix_cache_gb)


def add_generate(subparsers):
    p = subparsers.add_parser("generate", help="stream a continuation of a prompt to stdout",
                              description="Continue a prompt (the text as given, no chat template) with the "
                              "inference engine and stream the text to stdout as it is generated; a summary "
                              "(tokens, speed, MTP acceptance) goes to stderr.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompt", nargs="?", help="the prompt (or --prompt-file; may be left out with --context-dir)")
    p.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a file (long prompts: up to the "
                   "model's context, prefilled in chunks with a progress bar)")
    add_context_dir(p, "before the prompt")
    add_sampling(p, temperature=0.0)
    p.set_defaults(run=run_generate)


def add_context_dir(p, where: str):
    p.add_argument("--context-dir", metavar="PATH", help=f"pack the text files of a source tree {where} (each under "
                   "a path header, in path order; .git, caches and binaries skipped) up to the context (--max-len, "
                   "default the model's); what did not fit is listed on stderr")


def run_generate(opts) -> int:
    from dsv4.engine.generate import generate

    generate(opts.ckpt, opts.prompt, prompt_file=opts.prompt_file, context_dir=opts.context_dir,
             params=sampling_params(opts), max_new_tokens=opts.max_new_tokens, stop=opts.stop,
             **engine_options(opts))
    return 0


def add_chat(subparsers):
    p = subparsers.add_parser("chat", help="chat with a model in the terminal",
                              description="A terminal chat: each turn is rendered with the chat template together "
                              "with the history, and the answer streams as it is generated. /reset clears the "
                              "history, /exit (or Ctrl-D) quits; Ctrl-C stops an answer without quitting.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--thinking", action="store_true", help="open the answer with the thinking marker")
    add_context_dir(p, "into the system prompt")
    add_sampling(p, temperature=0.7)
    p.set_defaults(run=run_chat)


def run_chat(opts, read=input) -> int:
    from dsv4.engine.chat import chat

    return chat(opts.ckpt, system=opts.system, thinking=opts.thinking, context_dir=opts.context_dir,
                params=sampling_params(opts), max_new_tokens=opts.max_new_tokens, stop=opts.stop, read=read,
                **engine_options(opts))


def add_serve(subparsers):
    p = subparsers.add_parser("serve", help="serve the OpenAI-compatible API and the web chat page",
                              description="Serve a checkpoint over HTTP: the OpenAI API (/v1/models, /v1/completions, "
                              "/v1/chat/completions with streaming, tools and thinking), /health, /metrics "
                              "(Prometheus) and a web chat page at /. Binds 127.0.0.1 unless --host says otherwise.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_engine_args(p, "context length per sequence (prompt + completion) the cache is allocated for "
                       "(default: 8192; up to the model's context, e.g. 1048576: the cache takes `dsv4 info`'s "
                       "engine cache bytes per sequence for each of --max-batch slots)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("DSV4_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: $DSV4_API_KEY, unset = "
                        "no key)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (cache slots)")
    p.add_argument("--max-step-tokens", type=int, default=512, metavar="N",
                   help="what one engine step may cost, in prompt positions at no context: a prompt arriving is "
                        "prefilled in slices that fit beside the running streams' tokens (shorter at long contexts), "
                        "so the streams pause at most about one such step")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the checkpoint "
                   "directory's name)")
    p.add_argument("--drain-timeout", type=float, default=7.0, help="seconds running requests get to finish after "
                   "SIGTERM / Ctrl-C; then they are cancelled (their streams end with finish_reason 'cancelled')")
    p.set_defaults(run=run_serve)


def run_serve(opts) -> int:
    from dsv4.serve.lifecycle import serve

    if opts.max_step_tokens < 1:
        raise SystemExit(f"--max-step-tokens must be >= 1, got {opts.max_step_tokens}")
    return serve(opts.ckpt, host=opts.host, port=opts.port, api_key=opts.api_key, max_batch=opts.max_batch,
                 max_step_tokens=opts.max_step_tokens,
                 model_name=opts.model_name, drain_timeout=opts.drain_timeout, **engine_options(opts))


def add_engram(subparsers):
    p = subparsers.add_parser("engram", help="which Engram memory rows a text reads",
                              description="Tokenize TEXT with the checkpoint's tokenizer and print, per position, the "
                              "token, its compressed id and the row it reads in every (order, head) table of every "
                              "Engram layer (rows within each head's table). Reads config.json, tokenizer.json and "
                              "the stored compression; loads no weights.")
    p.add_argument("--ckpt", required=True, metavar="DIR", help="a checkpoint trained with --engram")
    p.add_argument("--text", required=True)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=run_engram)


def run_engram(opts) -> int:
    import json

    from dsv4.tokenizers.text import Tokenizer
    from dsv4.weights.engram import engram_report, format_engram

    report = engram_report(opts.ckpt, opts.text)
    if opts.json:
        print(json.dumps(report))
    else:
        tok = Tokenizer.from_file(os.path.join(opts.ckpt, "tokenizer.json"))
        print(format_engram(report, [tok.decode([i]) for i in report["token_ids"]]))
    return 0


from dsv4.cli.media import add_animate, add_image, add_multimodal, add_pixels, add_video  # noqa: E402
from dsv4.cli.plan import add_plan  # noqa: E402
from dsv4.cli.quantize import add_quantize  # noqa: E402

COMMANDS = (add_info, add_train, add_eval, add_generate, add_chat, add_serve, add_engram, add_pixels, add_multimodal,
            add_image, add_video, add_animate, add_quantize, add_plan)


def parser() -> argparse.ArgumentParser:
    """The `dsv4` command line: one sub-command per entry of COMMANDS, each naming the function that runs it."""
    p = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 in plain PyTorch")
    subparsers = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return p


def main(argv: list[str] | None = None) -> int:
    opts = parser().parse_args(argv)
    opts.argv = list(sys.argv[1:] if argv is None else argv)  # (what `dsv4 train --nproc` hands its processes)
    tune_cpu_allocator()  # process-wide, so here at the entry point and never inside the library
    try:
        return opts.run(opts)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:  # bad config or path: one line, not a traceback
        rank = f" [rank {os.environ['RANK']}]" if "RANK" in os.environ and "WORLD_SIZE" in os.environ else ""
        print(f"dsv4 {opts.command}{rank}: error: {e}", file=sys.stderr)
        return 2
