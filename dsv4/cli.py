"""The `dsv4` command. One flat subcommand per job; each is an `add_<name>(subparsers)` function that declares its
options and sets `run`, so a new command is one function plus one entry in COMMANDS.

    dsv4 info --preset v4-flash [--json]        parameters, FLOPs per token and cache bytes of a configuration
    dsv4 info --ckpt DIR                        the same for a checkpoint's config.json, plus its stored tensors
"""

import argparse
import json
import sys

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


COMMANDS = (add_info,)


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
